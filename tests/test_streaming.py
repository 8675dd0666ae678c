"""``streaming`` keeps exactly sinks + window, and generates what a full cache masked to that set generates."""

from __future__ import annotations

import pytest
import torch
from reference import masked_reference_logits
from tiny_models import ARCHITECTURES, prompts, tiny_model

import kvcompress
from kvcompress.compat import cache_arg


def _greedy(model, prompt, cache, steps=8):
    with torch.no_grad():
        out = model.generate(
            prompt.view(1, -1),
            max_new_tokens=steps,
            do_sample=False,
            **cache_arg(cache),
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, prompt.numel() :].tolist(), [x[0] for x in out.logits]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streaming_keeps_sinks_and_window_and_matches_masked_reference(arch: str) -> None:
    model = tiny_model(arch)
    prompt = prompts((64,))[0]
    cache = kvcompress.compress(model, "streaming", ratio=0.25, sink=4, trace=True)
    tokens, logits = _greedy(model, prompt, cache)
    kept_in_prompt = round(0.25 * 64)  # 16 = 4 sinks + 12 recent
    expected = list(range(4)) + list(range(64 - (kept_in_prompt - 4), 64))
    for layer in range(model.config.num_hidden_layers):
        per_head = cache.kept_positions(layer)
        for positions in per_head:
            prompt_part = [p for p in positions if p < 64]
            assert prompt_part == expected
    reference = masked_reference_logits(model, prompt, tokens, [[expected] * model.config.num_key_value_heads])
    for ours, ref in zip(logits, reference):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_streaming_decode_phase_holds_the_budget() -> None:
    model = tiny_model("llama")
    prompt = prompts((40,))[0]
    cache = kvcompress.compress(model, "streaming", budget=12, sink=2, phase="decode", trace=True)
    steps = 7
    tokens, logits = _greedy(model, prompt, cache, steps=steps)
    # After the last fed token (position 40 + steps - 2) the cache holds 2 sinks + the 10 most recent positions.
    last = 40 + steps - 2
    assert cache.kept_positions(0)[0] == [0, 1, *range(last - 9, last + 1)]
    assert cache.memory_report()["kept_tokens"][1] == [12.0, 12.0]
    # Reference: the step at position p sees the 2 sinks, the 10 positions kept before it, and itself.
    def window(length: int) -> list[list[int]]:
        return [[0, 1, *range(length - 11, length)]] * model.config.num_key_value_heads

    reference = masked_reference_logits(model, prompt, tokens, window)
    for ours, ref in zip(logits, reference):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_streaming_window_parameter_wins_over_ratio() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "streaming", ratio=0.9, sink=1, window=5, trace=True)
    _greedy(model, prompts((30,))[0], cache, steps=2)
    assert cache.kept_positions(0)[0] == [0, 25, 26, 27, 28, 29, 30]
