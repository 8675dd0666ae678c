"""Bad input gets a clear one-line error naming the value and the valid choices; nothing computed is lost."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts, tiny_model

import kvcompress
from kvcompress import KVCompressError
from kvcompress.compat import cache_arg
from kvcompress.run import preflight


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


def test_window_larger_than_context() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "streaming", window=500)
    with pytest.raises(KVCompressError) as err, torch.no_grad():
        model(prompts((40,))[0].view(1, -1), **cache_arg(cache))
    assert "window=500" in _one_line(err) and "40 tokens" in str(err.value)


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
