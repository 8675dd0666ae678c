"""``streaming`` keeps exactly sinks + window, and generates what a full cache masked to that set generates."""

from __future__ import annotations

import pytest
import torch
from reference import masked_reference_logits
from tiny_models import ARCHITECTURES, left_pad, prompts, tiny_model

import kvcompress
from kvcompress.compat import cache_arg


def _generate(model, rows, cache, steps=8) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy generation for a left-padded batch: per row, its new tokens and its logits at each step."""
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            **cache_arg(cache),
            output_logits=True,
            return_dict_in_generate=True,
        )
    width = ids.shape[1]
    tokens = [out.sequences[i, width:].tolist() for i in range(len(rows))]
    return tokens, [[step[i] for step in out.logits] for i in range(len(rows))]


def _greedy(model, prompt, cache, steps=8):
    tokens, logits = _generate(model, [prompt], cache, steps)
    return tokens[0], logits[0]


def _kept_in_row(cache, row: int, pad: int) -> list[list[list[int]]]:
    """Kept positions per layer and KV head, counted from the row's first real token."""
    layers = range(len(cache.layers))
    return [[[p - pad for p in head] for head in cache.kept_positions(layer, row)] for layer in layers]


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


@pytest.mark.parametrize(
    ("kw", "held"),
    [
        (dict(budget=12, sink=2), None),
        (dict(budget=12, sink=2, phase="decode"), lambda n: 12),  # a shorter prompt (8 tokens) grows to the budget
        (dict(ratio=0.3, phase="decode"), lambda n: max(round(0.3 * n), 4)),  # its prefill size, at least the sinks
        (dict(window=6, sink=2, phase="decode"), lambda n: 8),
        (dict(window=6, sink=2), None),
    ],
)
def test_streaming_rows_of_a_padded_batch_equal_their_batch_one_runs(kw: dict, held) -> None:
    """Budget, window and decode modes decide per row: tokens, logits and kept positions as alone."""
    model = tiny_model("llama")
    rows = prompts((37, 8, 23))
    width = max(len(r) for r in rows)
    cache = kvcompress.compress(model, "streaming", trace=True, **kw)
    tokens, logits = _generate(model, rows, cache, steps=7)
    for i, row in enumerate(rows):
        alone = kvcompress.compress(model, "streaming", trace=True, **kw)
        alone_tokens, alone_logits = _generate(model, [row], alone, steps=7)
        assert tokens[i] == alone_tokens[0], f"row {i} differs from its batch-1 run"
        for ours, ref in zip(logits[i], alone_logits[0]):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert _kept_in_row(cache, i, width - len(row)) == _kept_in_row(alone, 0, 0)
        if held is not None:  # decode mode: 6 fed tokens later every (layer, head) holds its fixed size
            assert [layer.kept_tokens()[i].tolist() for layer in cache.layers] == [[float(held(len(row)))] * 2] * 2
