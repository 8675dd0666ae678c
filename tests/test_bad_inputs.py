"""The bad-input table: every CLI (run, latency, heads, zoo, bench, tables, sweep, lm_eval) and the public API reject a
bad value with exit code 2 (the API: :class:`KVCompressError`) and ONE line that names the bad value and what is valid,
before any model loads, leaving an existing results file byte-identical. In-process (no interpreter per case)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress.errors import KVCompressError

# a results file that already holds a row, a regular file where a directory is expected, a binary "text" file,
# and a model directory without config.json: created under the `bad` fixture's folder (<BAD> in the cases)
BAD = "<BAD>"
RESULTS = f"results={BAD}/rows.jsonl"
FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=32", "eval.new_tokens=2",
        "print_summary=false", RESULTS]
NEEDLE = ["model=testbed", "eval=needle", "print_summary=false", RESULTS, "eval.lengths=[256]", "eval.depths=[0.5]"]


def _run(argv: list[str]) -> int | None:
    from kvcompress.run import main

    return main(argv)


def _latency(argv: list[str]) -> int | None:
    from kvcompress.latency.__main__ import main

    return main(argv)


def _heads(argv: list[str]) -> int | None:
    from kvcompress.methods.head.__main__ import main

    return main(argv)


def _zoo(argv: list[str]) -> int | None:
    from kvcompress.zoo.__main__ import main

    return main(argv)


def _bench(argv: list[str]) -> int | None:
    from kvcompress.bench.__main__ import main

    return main(argv)


def _tables(argv: list[str]) -> int | None:
    from kvcompress.tables import main

    return main(argv)


def _sweep(argv: list[str]) -> int | None:
    from kvcompress.sweep import main

    return main(argv)


def _lm_eval(argv: list[str]) -> int | None:
    from kvcompress.lm_eval import main

    return main(argv)


#: (CLI, arguments, text the one line must hold: the bad value as it was given)
CLI_CASES: list[tuple[Callable[[list[str]], int | None], list[str], str]] = [
    # run: the run's own options
    (_run, ["method=quant", "ratio=0.1", *FAST], "ratio=0.1 is not a parameter of method 'quant'"),
    (_run, ["method=streaming", "ratio=true", *FAST], "ratio=true"),
    (_run, ["ratio=abc", *FAST], "ratio='abc'"),
    (_run, ["ratio=[0.1]", *FAST], "ratio=[0.1]"),
    (_run, ["ratio=0", *FAST], "ratio=0"),
    (_run, ["ratio=1.5", *FAST], "ratio=1.5"),
    (_run, ["method=snapkv", "budget=1.5", *FAST], "budget=1.5"),
    (_run, ["method=snapkv", "budget=0", *FAST], "budget=0"),
    (_run, ["method=snapkv", "ratio=0.5", "budget=8", *FAST], "budget"),
    (_run, ["seed=abc", *FAST], "seed='abc'"),
    (_run, ["seed=-1", *FAST], "seed=-1"),
    (_run, ["threads=0", *FAST], "threads=0"),
    (_run, ["device=cuda:7", *FAST], "device='cuda:7'"),
    (_run, ["device=nope", *FAST], "device='nope'"),
    (_run, ["dtype=float8", *FAST], "'float8'"),
    (_run, [*FAST, "print_summary=maybe"], "print_summary='maybe'"),
    (_run, [*FAST, f"results={BAD}/file/rows.jsonl"], "results="),
    (_run, [*FAST, f"results={BAD}"], "results="),
    # run: methods and their parameters
    (_run, ["method=nope", *FAST], "'nope'"),
    (_run, ["method=[]", *FAST], "method=[]"),
    (_run, ["method=snapkv+nope", *FAST], "'nope'"),
    (_run, ["method=streaming", "method.streaming.sinks=4", *FAST], "'sinks'"),
    (_run, ["method=streaming", "method.streaming.sink=-1", *FAST], "sink=-1"),
    (_run, ["method=streaming", "method.snapkv.window=4", *FAST], "method.snapkv.window=4"),
    (_run, ["method=quant", "method.quant.bits=3", *FAST], "bits=3"),
    (_run, ["method=snapkv", "method.snapkv.pooling=median", *FAST], "'median'"),
    (_run, ["method=h2o", "method.h2o.normalize=max", *FAST], "'max'"),
    # run: the model
    (_run, [*FAST, "model=nope"], "'nope'"),
    (_run, [*FAST, "model.dtype=nope"], "'nope'"),
    (_run, [*FAST, "model.device_map=nope"], "'nope'"),
    (_run, [*FAST, f"model.path={BAD}/emptymodel"], "emptymodel"),
    (_run, [*FAST, f"model.path={BAD}/missing"], "missing"),
    # run: the evaluation
    (_run, [*FAST, "eval.samples=0"], "eval.samples=0"),
    (_run, [*FAST, "eval.samples=abc"], "eval.samples='abc'"),
    (_run, [*FAST, "eval.new_tokens=0"], "eval.new_tokens=0"),
    (_run, [*FAST, "eval.context=0"], "eval.context=0"),
    (_run, ["model=tiny-random", "eval=nope", RESULTS], "'nope'"),
    (_run, ["model=tiny-random", "eval=needle", RESULTS], "tiny-random"),
    (_run, [*NEEDLE, "eval.lengths=[0]"], "eval.lengths[0]=0"),
    (_run, [*NEEDLE, "eval.lengths=[10]"], "eval.lengths=[10]"),
    (_run, [*NEEDLE, "eval.depths=[1.5]"], "eval.depths[0]=1.5"),
    (_run, [*NEEDLE, "eval.template=nope"], "'nope'"),
    (_run, [*NEEDLE, "eval.value_digits=0"], "eval.value_digits=0"),
    (_run, [*NEEDLE, f"eval.haystack={BAD}/missing.txt"], "missing.txt"),
    (_run, [*NEEDLE, f"eval.haystack={BAD}/binary.txt"], "binary.txt"),
    (_run, [*NEEDLE, f"eval.heatmap={BAD}/file/x.png"], "eval.heatmap="),
    (_run, ["model=tiny-random", "eval=ruler", "eval.tasks=[nope]", RESULTS], "'nope'"),
    (_run, ["model=tiny-random", "eval=longbench", "eval.tasks=[nope]", RESULTS], "'nope'"),
    # run: the latency block
    (_run, [*FAST, "latency.hardware=nope"], "'nope'"),
    (_run, [*FAST, "latency.efficiency=nope"], "'nope'"),
    (_run, [*FAST, "latency.output_tokens=-1"], "latency.output_tokens=-1"),
    (_run, [*FAST, "latency.deployment.model=nope"], "'nope'"),
    (_run, [*FAST, "latency.deployment.context=abc"], "'abc'"),
    (_run, [*FAST, "latency.serving.memory_utilization=1.5"], "memory_utilization=1.5"),
    (_run, [*FAST, "latency.deployment.kv_dtype=fp7"], "'fp7'"),
    # latency
    (_latency, ["context=[abc]"], "'abc'"),
    (_latency, ["context=-5"], "context=-5"),
    (_latency, ["users=0"], "users=0"),
    (_latency, ["hardware=nope"], "'nope'"),
    (_latency, ["model=nope"], "'nope'"),
    (_latency, ["token_fraction=2"], "token_fraction=2"),
    (_latency, ["key_bits=0"], "key_bits=0"),
    (_latency, ["tp=[0]"], "tp=0"),
    (_latency, ["convention=nope"], "'nope'"),
    (_latency, ["sweep=nope"], "'nope'"),
    (_latency, ["format=xml"], "'xml'"),
    (_latency, ["memory_utilization=2"], "memory_utilization=2"),
    (_latency, ["weight_dtype=fp7"], "'fp7'"),
    (_latency, ["table", f"out={BAD}/file"], "out="),
    (_latency, ["nope"], "'nope'"),
    # heads
    (_heads, ["detect", "model=nope"], "'nope'"),
    (_heads, ["detect", "model=testbed", "lengths=[abc]"], "lengths=[abc]"),
    (_heads, ["detect", "model=testbed", "depths=[2]"], "depths[0]=2"),
    (_heads, ["detect", "model=testbed", "samples=0"], "samples=0"),
    (_heads, ["detect", "model=testbed", f"out={BAD}/file/x.json"], "out="),
    (_heads, ["show", "model=testbed", "score=nope"], "'nope'"),
    (_heads, ["show", "model=testbed", f"scores={BAD}/missing.json"], "missing.json"),
    (_heads, ["show", "model=testbed", f"scores={BAD}/binary.txt"], "binary.txt"),
    # zoo
    (_zoo, ["check", "lengths=[0]"], "lengths[0]=0"),
    (_zoo, ["check", "depths=[-1]"], "depths[0]=-1"),
    (_zoo, ["check", "template=nope"], "'nope'"),
    (_zoo, ["check", f"path={BAD}/missing"], "missing"),
    (_zoo, ["check", "threads=0"], "threads=0"),
    (_zoo, ["check", f"out={BAD}/file/x.md"], "out="),
    (_zoo, ["build", f"out={BAD}/file"], "out="),
    # bench
    (_bench, ["config=quick", "parts=[nope]"], "'nope'"),
    (_bench, ["config=quick", "threads=0"], "threads=0"),
    (_bench, ["config=quick", f"out_md={BAD}/file/x.md"], "out_md="),
    (_bench, ["config=quick", f"render={BAD}/missing.json"], "missing.json"),
    (_bench, ["config=quick", "decode.steps=0"], "decode.steps=0"),
    (_bench, ["config=quick", "prefill.ratio=2"], "prefill.ratio=2"),
    # tables
    (_tables, [f"rows={BAD}/missing"], "missing"),
    (_tables, ["colour=red"], "'colour'"),
    (_tables, ["nope"], "'nope'"),
    # sweep
    (_sweep, ["nope"], "'nope'"),
    # lm_eval
    (_lm_eval, ["--model", "kvcompress", "--model_args", "pretrained=tiny,method=nope", "--tasks", "x"], "'nope'"),
    (_lm_eval, ["--model", "kvcompress", "--model_args", "method=quant,ratio=0.5", "--tasks", "x"], "ratio=0.5"),
    (_lm_eval, ["--model", "kvcompress", "--model_args", f"pretrained={BAD}/missing,method=snapkv", "--tasks", "x"],
     "missing"),
]


class ModelLoaded(BaseException):
    """Raised by the spies: a model load before the configuration error (BaseException: nothing catches it)."""


@pytest.fixture
def bad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"schema": 3, "key": "kept", "config": {}}) + "\n")
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "emptymodel").mkdir()

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the configuration error")

    import transformers

    import kvcompress.models
    import kvcompress.run

    monkeypatch.setattr(kvcompress.run, "load_model", refuse)
    monkeypatch.setattr(kvcompress.models, "load_model", refuse)
    monkeypatch.setattr(kvcompress.models, "random_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.chdir(tmp_path)  # nothing a CLI writes by mistake lands in the checkout
    return tmp_path


def _case_id(case: tuple) -> str:
    cli, argv, _ = case
    shown = [a for a in argv if a not in FAST and a not in NEEDLE]
    return f"{cli.__name__[1:]}:{' '.join(shown)}"


@pytest.mark.parametrize("case", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_cli_bad_input_is_one_line_before_any_model_loads(case: tuple, bad: Path) -> None:
    cli, argv, needle = case
    argv = [a.replace(BAD, str(bad)) for a in argv]
    results = (bad / "rows.jsonl").read_bytes()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = cli(argv)
        except SystemExit as exit_:
            status = exit_.code
    lines = err.getvalue().strip().splitlines()
    assert status == 2, (status, err.getvalue()[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle.replace(BAD, str(bad)) in lines[0] and "valid" in lines[0], lines[0]
    assert (bad / "rows.jsonl").read_bytes() == results


def _tiny() -> torch.nn.Module:
    from tiny_models import tiny_model

    return tiny_model("llama")


#: (API call on a small model, text the message must hold)
API_CASES: list[tuple[str, Callable[[torch.nn.Module], object], str]] = [
    ("unknown method", lambda m: kvcompress.compress(m, "nope"), "'nope'"),
    ("empty composition", lambda m: kvcompress.compress(m, []), "method=[]"),
    ("ratio not taken", lambda m: kvcompress.compress(m, "quant", ratio=0.5), "ratio=0.5"),
    ("ratio boolean", lambda m: kvcompress.compress(m, "snapkv", ratio=True), "True"),
    ("ratio above one", lambda m: kvcompress.compress(m, "snapkv", ratio=1.5), "1.5"),
    ("budget zero", lambda m: kvcompress.compress(m, "snapkv", budget=0), "budget=0"),
    ("ratio and budget", lambda m: kvcompress.compress(m, "snapkv", ratio=0.5, budget=8), "budget"),
    ("parameter typo", lambda m: kvcompress.compress(m, "snapkv", ratio=0.5, params={"snapkv": {"windw": 4}}),
     "windw"),
    ("parameter value", lambda m: kvcompress.compress(m, "quant", params={"quant": {"bits": 3}}), "bits=3"),
    ("params of another method", lambda m: kvcompress.compress(m, "snapkv", ratio=0.5, params={"quant": {"bits": 4}}),
     "quant"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_one_line(case: tuple) -> None:
    _, call, needle = case
    with pytest.raises(KVCompressError) as info:
        call(_tiny())
    message = str(info.value)
    assert "\n" not in message and needle in message and "valid" in message, message


def test_the_table_has_at_least_sixty_cases() -> None:
    assert len(CLI_CASES) + len(API_CASES) >= 60
