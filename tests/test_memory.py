"""Memory accounting: reported bytes are the bytes of the tensors the cache really holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress.attention import merged_attention
from kvcompress.layer import KVCompressLayer
from kvcompress.compat import cache_arg
from kvcompress.ragged import Ragged
from kvcompress.ragged import index_bytes as index_bytes_of
from kvcompress.registry import get_method


def _reachable_tensor_bytes(obj, seen=None) -> int:
    """Storage bytes of every tensor reachable from ``obj`` (attributes, containers), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.untyped_storage().nbytes() == 0:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(_reachable_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_reachable_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_reachable_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _prefill(model, ids, mask, cache):
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_arg(cache))
    return cache


def test_kept_bytes_equal_measured_and_analytic_for_streaming() -> None:
    model = tiny_model("llama")
    cfg = model.config
    ids = prompts((100,))[0].view(1, -1)
    cache = _prefill(model, ids, None, kvcompress.compress(model, "streaming", ratio=0.2))
    report = cache.memory_report()
    kept_tokens = 20  # round(0.2 * 100)
    analytic = kept_tokens * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 4  # fp32
    assert report["kept_bytes"] == analytic
    assert report["kept_bytes"] == _reachable_tensor_bytes(cache)
    assert report["resident_bytes"] == report["kept_bytes"]
    assert report["dense_bytes"] == 100 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 4
    assert report["kept_tokens"] == [[20.0, 20.0]] * cfg.num_hidden_layers


def test_ragged_batch_bytes_are_exact() -> None:
    model = tiny_model("llama")
    cfg = model.config
    rows = prompts((37, 64, 23))
    ids, mask = left_pad(rows)
    cache = _prefill(model, ids, mask, kvcompress.compress(model, "random", ratio=0.5))
    kept = [round(0.5 * len(r)) for r in rows]  # 18 (round half to even), 32, 12: rows differ, so storage is ragged
    assert kept == [18, 32, 12]
    per_token = cfg.num_key_value_heads * cfg.head_dim * 2 * 4
    # the ragged layout's index metadata: one int32 per page, per tail entry and two per (row, head) pair
    index_bytes = cfg.num_hidden_layers * index_bytes_of([c for c in kept for _ in range(cfg.num_key_value_heads)])
    analytic = sum(kept) * cfg.num_hidden_layers * per_token + index_bytes
    report = cache.memory_report()
    assert report["kept_bytes"] == analytic == _reachable_tensor_bytes(cache)
    assert all(layer.ragged is not None for layer in cache.layers)
    # Decoding appends into spare capacity; resident bytes include that headroom, kept bytes do not.
    with torch.no_grad():
        model(torch.tensor([[5], [6], [7]]), **cache_arg(cache))
    report = cache.memory_report()
    assert report["kept_bytes"] == analytic + cfg.num_hidden_layers * 3 * per_token
    assert report["resident_bytes"] == _reachable_tensor_bytes(cache) >= report["kept_bytes"]


def test_merged_attention_over_ragged_segments_is_exact() -> None:
    torch.manual_seed(0)
    b, h, g, d, n = 2, 3, 2, 8, 11
    keys, values = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    keep = torch.rand(b, h, n) < 0.5
    keep[..., 0] = True
    layer = KVCompressLayer(0, cache=None)  # type: ignore[arg-type]
    layer.lazy_initialization(keys, values)
    from kvcompress.compressor import LayerView

    layer.store(LayerView(keys, values, keep))
    assert layer.ragged is not None and layer.length == 0
    new_k, new_v = torch.randn(b, h, 3, d), torch.randn(b, h, 3, d)
    layer._append(new_k, new_v)
    query = torch.randn(b, h * g, 3, d)
    ours = merged_attention(query, layer, torch.ones(3, 3).tril().bool(), 0.5)
    # Reference: dense masked attention over [all old entries | new ones] with repeat_kv.
    all_k = torch.cat([keys, new_k], 2).repeat_interleave(g, 1)
    all_v = torch.cat([values, new_v], 2).repeat_interleave(g, 1)
    allowed = torch.cat([keep.unsqueeze(2).expand(b, h, 3, n), torch.ones(3, 3).tril().bool().expand(b, h, 3, 3)], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, all_k, all_v, attn_mask=allowed.repeat_interleave(g, 1), scale=0.5
    ).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert isinstance(layer.ragged, Ragged) and dataclasses.is_dataclass(layer.ragged)


@pytest.mark.parametrize("method", kvcompress.available_methods())
def test_resident_bytes_stay_within_one_percent_of_kept_while_decoding(method: str) -> None:
    """The append buffer's spare capacity (and a hidden codec's residual buffer after each flush) stays within 1% of
    what the cache holds, step by step, for every registered method."""
    model = tiny_model("llama")
    ids = prompts((1500,))[0].view(1, -1)
    ratio = 0.5 if "ratio" in get_method(method).__dataclass_fields__ else None
    cache = kvcompress.compress(model, method, ratio=ratio)
    with torch.no_grad():
        model(ids, **cache_arg(cache))
        for step in range(70):  # > 2 flushes of a 32-token quantization group
            model(torch.tensor([[5 + step]]), **cache_arg(cache))
            report = cache.memory_report()
            assert report["kept_bytes"] <= report["resident_bytes"] <= 1.01 * report["kept_bytes"], step
