"""Logical vs physical length: RoPE positions stay right in a manual loop without ``position_ids``."""

from __future__ import annotations

import torch
from tiny_models import prompts, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg


@torch.no_grad()
def _manual_greedy(model, prompt, cache, steps=6):
    out = model(prompt.view(1, -1), **cache_arg(cache))
    tokens, logits = [], [out.logits[0, -1]]
    for _ in range(steps - 1):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), **cache_arg(cache))  # no position_ids: arange + get_seq_length()
        logits.append(out.logits[0, -1])
    return tokens, logits


def test_manual_loop_full_matches_dynamic_cache() -> None:
    model = tiny_model("llama")
    prompt = prompts((50,))[0]
    ref_tokens, ref_logits = _manual_greedy(model, prompt, DynamicCache())
    tokens, logits = _manual_greedy(model, prompt, kvcompress.compress(model, "full"))
    assert tokens == ref_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))


def test_manual_loop_compressed_matches_generate() -> None:
    model = tiny_model("qwen3")
    prompt = prompts((50,))[0]
    cache = kvcompress.compress(model, "streaming", ratio=0.3)
    tokens, logits = _manual_greedy(model, prompt, cache)
    assert cache.get_seq_length() == 50 + 5  # logical length (prompt + 5 fed tokens), while far fewer entries are stored
    assert cache.layers[0].length < 30
    with torch.no_grad():
        gen = model.generate(
            prompt.view(1, -1),
            max_new_tokens=6,
            do_sample=False,
            **cache_arg(kvcompress.compress(model, "streaming", ratio=0.3)),
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert gen.sequences[0, 50:-1].tolist() == tokens
    for a, b in zip(logits, gen.logits):
        torch.testing.assert_close(a, b[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_decode_appends_in_place_while_the_compressed_buffer_has_room() -> None:
    """After a compression the layer's buffer is exact-size; the first decode step regrows it with headroom, and the
    next steps write into that spare capacity: same storage (data_ptr) until it is full, then one regrow."""
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "streaming", ratio=0.5)
    out = model(prompts((1030,))[0].view(1, -1), **cache_arg(cache))  # 515 kept: headroom of a few slots
    layer = cache.layers[0]
    assert not layer.pristine and not layer.segments and layer.length == 515
    reused = regrown = 0
    for _ in range(12):
        ptrs, capacity, length = (layer.keys.data_ptr(), layer.values.data_ptr()), layer.keys.shape[-2], layer.length
        out = model(out.logits[:, -1:].argmax(-1), **cache_arg(cache))
        assert layer.length == length + 1
        if length < capacity:  # room left: written in place, no copy of the layer
            assert (layer.keys.data_ptr(), layer.values.data_ptr()) == ptrs and layer.keys.shape[-2] == capacity
            reused += 1
        else:  # full: one copy into a larger buffer with spare capacity
            assert (layer.keys.data_ptr(), layer.values.data_ptr()) != ptrs and layer.keys.shape[-2] > layer.length
            regrown += 1
    assert reused >= 6 and regrown >= 2
