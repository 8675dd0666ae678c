"""Bad input gets a clear one-line error naming the value and the valid choices; nothing computed is lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress import KVCompressError
from kvcompress.compat import cache_arg
from kvcompress.registry import get_method, make_compressor
from kvcompress.run import main, preflight

#: a fast run: the built-in tiny random model, one short fidelity sample
FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=128", "eval.new_tokens=4",
        "print_summary=false"]
#: methods whose files take both ``ratio`` and ``budget``
SIZED = ("streaming", "random", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "expected_attention", "merge")


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(method="nope"), ["'nope'", "streaming", "random", "full"]),
        (dict(method="streaming", ratio=0.0), ["ratio=0.0", "(0, 1]"]),
        (dict(method="streaming", ratio=-0.5), ["ratio=-0.5", "(0, 1]"]),
        (dict(method="streaming", ratio=1.01), ["ratio=1.01", "(0, 1]"]),
        (dict(method="streaming", ratio="half"), ["'half'", "not a number"]),
        (dict(method="streaming", ratio=float("nan")), ["nan", "(0, 1]"]),
        (dict(method="streaming+random", ratio=0.5), ["same axis", "token", "streaming", "random"]),
        (dict(method=["full", "streaming"]), ["full"]),
        (dict(method="streaming", sink=-1), ["sink=-1", ">= 0"]),
        (dict(method="streaming", phase="sometimes"), ["'sometimes'", "decode", "prefill"]),
        (dict(method="streaming", sinks=4), ["'sinks'", "sink", "window"]),
        (dict(method="random", budget=0), ["budget=0", ">= 1"]),
        (dict(method="snapkv", ratio=0.3, budget=128), ["ratio=0.3", "budget=128", "one of them"]),
        (dict(method="layers+snapkv", ratio=0.5, params={"snapkv": {"budget": 128}}),
         ["ratio=0.5", "budget=128", "'snapkv'", "one of them"]),
    ],
)
def test_api_errors(kwargs: dict, expected: list[str]) -> None:
    model = tiny_model("llama")
    with pytest.raises(KVCompressError) as err:
        kvcompress.compress(model, **kwargs)
    msg = _one_line(err)
    for part in expected:
        assert part in msg, msg


def test_unsupported_architecture() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(KVCompressError) as err:
        kvcompress.compress(model, "streaming", ratio=0.5)
    msg = _one_line(err)
    assert "'gpt2'" in msg and "llama" in msg and "qwen3" in msg


@pytest.mark.parametrize(("lengths", "window", "row"), [((40,), 500, 0), ((8,), 20, 0), ((37, 8, 23), 20, 1)])
def test_window_larger_than_context(lengths: tuple[int, ...], window: int, row: int) -> None:
    """Checked for every row: a row too short for the window fails alone and inside a batch of longer rows."""
    model = tiny_model("llama")
    ids, mask = left_pad(prompts(lengths))
    cache = kvcompress.compress(model, "streaming", window=window)
    with pytest.raises(KVCompressError) as err, torch.no_grad():
        model(ids, attention_mask=mask, **cache_arg(cache))
    msg = _one_line(err)
    assert f"window={window}" in msg and f"batch row {row} ({lengths[row]} tokens)" in msg
    assert f"0 <= window <= {min(lengths)}" in msg


@pytest.mark.parametrize("name", SIZED)
def test_ratio_and_budget_together_are_rejected(name: str) -> None:
    """Both given explicitly (by name, or to the class with a ratio other than its default) is an error, never a
    silent choice; one of them alone is fine."""
    for build in (lambda **kw: make_compressor(name, **kw), lambda **kw: get_method(name)(**kw)):
        with pytest.raises(KVCompressError) as err:
            build(ratio=0.3, budget=128)
        msg = _one_line(err)
        assert "ratio=0.3" in msg and "budget=128" in msg and f"method {name!r}" in msg
        assert build(budget=128).budget == 128 and build(ratio=0.3).ratio == 0.3
    with pytest.raises(KVCompressError, match="ratio=1.0 and budget=128 are both given"):
        make_compressor(name, ratio=1.0, budget=128)  # explicit, even at the default value


def test_composition_gives_each_method_its_own_ratio_or_budget() -> None:
    params = {"layers": {"ratio": 0.5}, "snapkv": {"budget": 16}}
    cache = kvcompress.compress(tiny_model("llama"), "layers+snapkv", params=params)
    got = [(c.name, c.ratio, getattr(c, "budget", None)) for c in cache.compressors]
    assert got == [("layers", 0.5, None), ("snapkv", 1.0, 16)]


# ---------------------------------------------------------------------------------------------------------------
# The run entry point: a one-line `error:`, exit status 2, and the results file untouched


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "argv", ["kvcompress.run"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def existing_results(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"config_key": "earlier", "method": "full"}) + "\n")
    return path


def test_cli_unknown_model_path(existing_results: Path, capsys, monkeypatch) -> None:
    before = existing_results.read_bytes()
    msg = _cli_error(["method=streaming", "ratio=0.5", *FAST, "model.path=/nonexistent", f"results={existing_results}"],
                     capsys, monkeypatch)
    assert "'/nonexistent'" in msg and "valid: a directory with config.json" in msg and "model=tiny-random" in msg
    assert existing_results.read_bytes() == before


@pytest.mark.parametrize("where", ["under a regular file", "a directory"])
def test_cli_results_path_not_writable(where: str, existing_results: Path, capsys, monkeypatch) -> None:
    before = existing_results.read_bytes()
    target = existing_results / "more.jsonl" if where == "under a regular file" else existing_results.parent
    msg = _cli_error(["method=streaming", "ratio=0.5", *FAST, f"results={target}"], capsys, monkeypatch)
    assert f"results={str(target)!r}: " in msg and "valid: a writable file path" in msg
    assert existing_results.read_bytes() == before


def test_cli_ratio_and_budget_together(existing_results: Path, capsys, monkeypatch) -> None:
    before = existing_results.read_bytes()
    argv = ["method=h2o", "ratio=0.3", "budget=128", *FAST, f"results={existing_results}"]
    assert _cli_error(argv, capsys, monkeypatch) == (
        "error: ratio=0.3 and budget=128 are both given; "
        "valid: one of them, ratio (fraction kept) or budget (tokens kept)"
    )
    assert existing_results.read_bytes() == before


def test_cli_budget_alone_with_the_default_ratio(existing_results: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["kvcompress.run"])
    main(["method=h2o", "budget=32", *FAST, f"results={existing_results}"])
    earlier, row = [json.loads(line) for line in existing_results.read_text().splitlines()]
    assert earlier == {"config_key": "earlier", "method": "full"}
    assert row["ratio"] is None and row["budget"] == 32 and row["config"]["ratio"] is None
    assert row["memory"]["pipeline"][0].startswith("h2o(ratio=1.0, budget=32,")
    assert row["memory"]["kept_fraction"] < 0.5  # 32 of 128 prompt tokens (+ the few decoded ones)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["method=nope"], ["unknown method 'nope'", "streaming"]),
        (["-m", "method=streaming,nope"], ["unknown method 'nope'"]),
        (["frobnicate=1"], ["unknown config key 'frobnicate'", "ratio", "method"]),
        (["eval=nope"], ["unknown eval 'nope'", "fidelity"]),
        (["model=nope"], ["unknown model 'nope'", "tiny-random"]),
    ],
)
def test_cli_preflight_errors(argv: list[str], expected: list[str]) -> None:
    with pytest.raises(KVCompressError) as err:
        preflight(argv)
    msg = _one_line(err)
    for part in expected:
        assert part in msg, msg


def test_preflight_rewrites_plus_composition() -> None:
    assert preflight(["method=streaming+random", "ratio=0.5"]) == ["method=[streaming,random]", "ratio=0.5"]
    assert preflight(["-m", "method=snapkv+quant,heads+quant,full"]) == ["-m", "method=[snapkv,quant],[heads,quant],[full]"]
