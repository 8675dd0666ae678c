"""API misuse is an error, not a wrong answer (issue 17, item 5): each misuse raises a one-line ``KVCompressError`` that
says what happened and what is valid; the valid alternatives keep working."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts, tiny_model
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.models import random_model


def _fresh(layers: int = 2, kv_heads: int = 2, head_dim: int = 16, seed: int = 0) -> torch.nn.Module:
    """A tiny llama never attached to kvcompress (not the shared `tiny_model` instances)."""
    return random_model("llama", seed=seed, vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                        head_dim=head_dim, max_position_embeddings=512)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "valid:" in message
    return message


def _forward(model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **cache_arg(cache)).logits


# -- 1. a second multi-token forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["streaming", "snapkv"])
def test_second_multi_token_forward_is_refused(method: str) -> None:
    model = tiny_model("llama")
    context, more = prompts((30, 5), seed=3)
    cache = kvcompress.compress(model, method, ratio=0.5)
    _forward(model, context.view(1, -1), cache)
    kept = cache.kept_tokens()
    with pytest.raises(KVCompressError) as err:
        _forward(model, more.view(1, -1), cache)
    message = _one_line(err)
    assert "30 positions" in message and "5 new tokens" in message
    assert "kvcompress.compress(" in message and "cache.paused()" in message
    # refused before anything is stored: the cache is intact and a paused continuation still works
    assert cache.get_seq_length() == 30 and cache.kept_tokens() == kept
    with cache.paused():
        _forward(model, more.view(1, -1), cache)
    assert cache.get_seq_length() == 35
    assert cache.kept_tokens() == [[k + 5 for k in layer] for layer in kept]


def test_reusing_a_cache_for_a_second_prompt_is_refused() -> None:
    model = tiny_model("llama")
    first, second = prompts((24, 18), seed=4)
    cache = kvcompress.compress(model, "streaming", ratio=0.5)
    with torch.no_grad():
        model.generate(first.view(1, -1), max_new_tokens=3, do_sample=False, **cache_arg(cache))
    with pytest.raises(KVCompressError) as err:
        _forward(model, second.view(1, -1), cache)
    assert "26 positions" in _one_line(err) and "18 new tokens" in str(err.value)  # the last new token is not fed


def test_a_fresh_cache_per_prompt_compresses_each_prompt() -> None:
    model = tiny_model("llama")
    for prompt in prompts((24, 40), seed=5):
        cache = kvcompress.compress(model, "streaming", ratio=0.5)
        logits = _forward(model, prompt.view(1, -1), cache)
        assert cache.kept_tokens() == [[len(prompt) / 2] * 2] * 2
        assert torch.allclose(logits, _forward(model, prompt.view(1, -1), DynamicCache()), atol=1e-5)


def test_full_cache_continuation_matches_a_dynamic_cache() -> None:
    """``full`` compresses nothing, so it accepts a multi-token continuation with or without ``paused()``: both give
    the DynamicCache logits."""
    model = tiny_model("llama")
    context, more = prompts((30, 6), seed=6)
    reference = DynamicCache()
    _forward(model, context.view(1, -1), reference)
    expected = _forward(model, more.view(1, -1), reference)
    paused = kvcompress.compress(model, "full")
    _forward(model, context.view(1, -1), paused)
    with paused.paused():
        torch.testing.assert_close(_forward(model, more.view(1, -1), paused), expected)
    plain = kvcompress.compress(model, "full")
    _forward(model, context.view(1, -1), plain)
    torch.testing.assert_close(_forward(model, more.view(1, -1), plain), expected)


# -- 2. a model that was never attached -----------------------------------------------------------------------------
def test_cache_used_with_a_model_that_was_never_attached_is_refused() -> None:
    attached, other = _fresh(), _fresh()
    cache = kvcompress.compress(attached, "streaming", ratio=0.5)
    ids = prompts((20,), seed=7)[0].view(1, -1)
    with pytest.raises(KVCompressError) as err:
        _forward(other, ids, cache)  # detected at layer 1's update of the first forward
    message = _one_line(err)
    assert "never attached" in message and "kvcompress.compress(model" in message and "kvcompress.attach" in message
    # the valid alternatives: a cache created for this model, or attaching it
    fresh = kvcompress.compress(other, "streaming", ratio=0.5)
    _forward(other, ids, fresh)
    assert fresh.kept_tokens() == [[10.0] * 2] * 2


def test_one_layer_model_never_attached_is_refused_by_its_second_forward() -> None:
    attached, other = _fresh(layers=1), _fresh(layers=1)
    cache = kvcompress.compress(attached, "full")
    ids = prompts((12,), seed=8)[0].view(1, -1)
    _forward(other, ids, cache)  # one layer: nothing to compare with yet
    with pytest.raises(KVCompressError, match="never attached") as err:
        _forward(other, torch.tensor([[5]]), cache)
    _one_line(err)


def test_attached_flows_do_not_trip_the_attach_check() -> None:
    """generate, beam search (``reorder_cache``), paused forwards and a DynamicCache forward in between."""
    model = tiny_model("llama")
    ids = prompts((26,), seed=9)[0].view(1, -1)
    with torch.no_grad():
        for cache in (kvcompress.compress(model, "full"), kvcompress.compress(model, "streaming", ratio=0.5)):
            model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, **cache_arg(cache))
        cache = kvcompress.compress(model, "streaming", ratio=0.5)
        model(ids, **cache_arg(cache))
        model(ids, **cache_arg(DynamicCache()))
        with cache.paused():
            model(ids[:, :3], **cache_arg(cache))
        model(torch.tensor([[5]]), **cache_arg(cache))
    assert cache.get_seq_length() == 30


# -- 3. a model of another layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("built", "used", "facts"), [
    (dict(kv_heads=2), dict(kv_heads=1), ("1 KV heads", "2 KV heads")),
    (dict(head_dim=16), dict(head_dim=8), ("head_dim 8", "head_dim 16")),
    (dict(layers=1), dict(layers=2), ("layer 1", "1 layers")),
])
def test_cache_of_another_layout_is_refused(built: dict, used: dict, facts: tuple[str, ...]) -> None:
    cache = kvcompress.compress(_fresh(**built), "streaming", ratio=0.5)
    model = _fresh(**used)
    kvcompress.attach(model)
    with pytest.raises(KVCompressError) as err:
        _forward(model, prompts((16,), seed=10)[0].view(1, -1), cache)
    message = _one_line(err)
    assert all(fact in message for fact in facts), message


def test_cache_with_more_layers_than_the_model_is_refused() -> None:
    cache = kvcompress.compress(_fresh(layers=3), "full")
    model = _fresh(layers=2)
    kvcompress.attach(model)
    _forward(model, prompts((16,), seed=11)[0].view(1, -1), cache)
    with pytest.raises(KVCompressError) as err:
        _forward(model, torch.tensor([[5]]), cache)
    message = _one_line(err)
    assert "3 the cache was built for" in message and "layer 0 has seen 16 positions" in message


def test_another_batch_size_is_refused() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "streaming", ratio=0.5)
    _forward(model, torch.stack(prompts((16, 16), seed=12)), cache)
    with pytest.raises(KVCompressError) as err:
        _forward(model, torch.tensor([[5]]), cache)
    assert "2 rows" in _one_line(err) and "1 rows" in str(err.value)


# -- 4. the memory report before any forward ------------------------------------------------------------------------
def test_memory_report_before_any_forward_is_an_empty_report() -> None:
    model = tiny_model("llama")
    cache = kvcompress.compress(model, "streaming", ratio=0.5)
    report = cache.memory_report()
    assert report["empty"] is True
    assert report["kept_bytes"] == report["dense_bytes"] == report["resident_bytes"] == 0
    assert report["kept_fraction"] is None and report["context_tokens"] == 0 and report["dtype_bytes"] is None
    assert report["key_bits"] is None and report["value_bits"] is None
    assert report["fixed_bits"] is None and report["dtype_fraction"] is None
    _forward(model, prompts((20,), seed=13)[0].view(1, -1), cache)
    report = cache.memory_report()
    assert report["empty"] is False and report["kept_fraction"] == pytest.approx(0.5)
    assert report["key_bits"] == [32.0, 32.0]
