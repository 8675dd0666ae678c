"""The decode path is GPU-shaped: no host-device sync, and an op count that does not grow with the layout.

Syncs are counted on the virtual device (:mod:`kvcompress.device_probe`), where reading a device value on the host,
a data-dependent output size or a copy to the host is recorded; ops are the aten ops dispatched (on CUDA about one
kernel each).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import left_pad, prompts, tiny_model

import kvcompress
from kvcompress.layer import KVCompressLayer
from kvcompress.compat import cache_arg
from kvcompress.compressor import LayerView
from kvcompress.device_probe import VIRTUAL, count_ops, virtual_device
from kvcompress.ragged import Ragged
from kvcompress.registry import get_method

#: uniform layers (batch 1 or one budget for every row): no sync at all on a decode step
UNIFORM = [
    ("full", {}),
    ("snapkv", {}),
    ("streaming", {}),
    ("knorm", {}),
    ("expected_attention", {}),
    ("pyramidkv", {}),
    ("quant", {}),  # 3 steps after the prefill's flush: between flushes
    ("streaming", {"phase": "decode"}),
    ("h2o", {"phase": "decode"}),
    ("tova", {"phase": "decode"}),
    ("snapkv", {"phase": "decode", "interval": 8}),  # steps between re-scorings
]
#: ragged layers (per-head or per-row counts)
RAGGED = [("adaptive_heads", {}), ("heads", {}), ("snapkv", {"allocation": "adakv"}), ("pyramidkv", {})]


def _names(variants: list[tuple[str, dict]]) -> list[str]:
    return [m + "".join(f"-{k}={v}" for k, v in p.items()) for m, p in variants]


def _ratio(method: str) -> float | None:
    return 0.3 if "ratio" in get_method(method).__dataclass_fields__ else None


def _decode_syncs(method: str | None, params: dict, ids: torch.Tensor, mask: torch.Tensor | None = None,
                  steps: int = 3) -> list[list[tuple[str, str]]]:
    """Syncs recorded in each of ``steps`` decode forwards after a prefill, on the virtual device (``method`` None:
    the stock ``DynamicCache``)."""
    from transformers import DynamicCache

    model = copy.deepcopy(tiny_model("llama"))
    per_step = []
    with virtual_device() as dev, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(VIRTUAL)
        cache = DynamicCache() if method is None else kvcompress.compress(model, method, ratio=_ratio(method), **params)
        extra = {} if mask is None else {"attention_mask": mask.to(VIRTUAL)}
        model(ids.to(VIRTUAL), **cache_arg(cache), **extra)
        token = torch.full((ids.shape[0], 1), 5, device=VIRTUAL)
        for step in range(steps):
            if mask is not None:
                grown = torch.cat([mask, torch.ones(ids.shape[0], step + 1, dtype=mask.dtype)], 1)
                extra = {"attention_mask": grown.to(VIRTUAL)}
            with dev.counting() as syncs:
                model(token, **cache_arg(cache), **extra)
            per_step.append(list(syncs))
    return per_step


def test_dynamic_cache_decode_step_has_no_sync() -> None:
    assert _decode_syncs(None, {}, prompts((40,))[0].view(1, -1)) == [[], [], []]


@pytest.mark.parametrize("method,params", UNIFORM, ids=_names(UNIFORM))
def test_no_sync_on_a_uniform_decode_step(method: str, params: dict) -> None:
    ids = prompts((64,))[0].view(1, -1)
    assert _decode_syncs(method, params, ids) == [[], [], []]


@pytest.mark.parametrize("method,params", RAGGED, ids=_names(RAGGED))
def test_no_sync_on_a_ragged_decode_step(method: str, params: dict) -> None:
    """A left-padded batch of three rows of different lengths: per-row (and per-head) counts differ. The model's own
    mask code reads the attention mask once per step (transformers' ``masking_utils``, with DynamicCache too): no
    sync beyond the stock cache's."""
    ids, mask = left_pad(prompts((37, 64, 23)))
    assert _decode_syncs(method, params, ids, mask) == _decode_syncs(None, {}, ids, mask)


def _ragged_layer(counts: list[int], n: int = 96, d: int = 16) -> KVCompressLayer:
    """A layer of 2 rows x (len(counts) / 2) KV heads whose pairs keep ``counts`` entries, plus one decoded token."""
    b, h = 2, len(counts) // 2
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    order = torch.rand(b, h, n, generator=g).argsort(-1)
    keep = order < torch.tensor(counts).view(b, h, 1)
    layer = KVCompressLayer(0, cache=None)
    layer.lazy_initialization(keys, values)
    layer.store(LayerView(keys, values, keep))
    layer._append(torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g))
    return layer


@pytest.mark.parametrize("distinct", [2, 4, 16])
def test_ragged_decode_attention_ops_do_not_grow_with_distinct_counts(distinct: int) -> None:
    counts = [17 + 5 * (i % distinct) for i in range(16)]  # 16 pairs, `distinct` different counts
    assert len(set(counts)) == distinct
    layer = _ragged_layer(counts)
    query = torch.randn(2, 16, 1, 16)  # 8 KV heads, 2 query heads each
    with count_ops() as ops:
        layer.attend(None, query, None, 0.25)
    reference = _ragged_layer([17 + 5 * (i % 2) for i in range(16)])
    with count_ops() as ops_two:
        reference.attend(None, query, None, 0.25)
    assert sum(ops.values()) == sum(ops_two.values())


@pytest.mark.parametrize("distinct", [1, 4, 16])
def test_ragged_part_ops_do_not_grow_with_distinct_counts(distinct: int) -> None:
    counts = [40 + 9 * (i % distinct) for i in range(16)]
    flat = torch.randn(sum(counts), 8)
    ragged = Ragged.pack(flat, flat, None, counts)
    with count_ops() as ops:
        ragged.attend(torch.randn(16, 3, 8), 0.5)
    single = Ragged.pack(torch.randn(16 * 40, 8), torch.randn(16 * 40, 8), None, [40] * 16)
    with count_ops() as ops_one:
        single.attend(torch.randn(16, 3, 8), 0.5)
    assert sum(ops.values()) == sum(ops_one.values())


@pytest.mark.parametrize("method", ["full", "snapkv", "adaptive_heads", "heads", "quant"])
def test_decode_step_ops_do_not_grow_with_batch_rows(method: str) -> None:
    """One decode forward of a left-padded batch of 3 and of 5 rows (ragged for the token and head methods)
    dispatches as many ops."""
    model = tiny_model("llama")
    totals = []
    for rows in ([64, 37, 23], [64, 37, 23, 50, 31]):
        ids, mask = left_pad(prompts(tuple(rows)))
        cache = kvcompress.compress(model, method, ratio=_ratio(method))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(ids, attention_mask=mask, **cache_arg(cache))
            step_mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
            with count_ops() as ops:
                model(torch.full((len(rows), 1), 5), attention_mask=step_mask, **cache_arg(cache))
        totals.append(sum(ops.values()))
    assert totals[0] == totals[1]


EVICTING = [("streaming", {"phase": "decode"}), ("h2o", {"phase": "decode"}), ("tova", {"phase": "decode"}),
            ("snapkv", {"phase": "decode", "interval": 3}), ("h2o", {"phase": "decode", "budget": 20}),
            ("tova", {"phase": "decode", "sink": 2})]


@pytest.mark.parametrize("method,params", EVICTING, ids=_names(EVICTING))
def test_in_place_eviction_keeps_what_re_storing_keeps(method: str, params: dict, monkeypatch) -> None:
    """Decode-time eviction in place (slots reused, order by positions) keeps exactly the positions and generates
    exactly the tokens of the re-select-and-re-store path, step after step."""
    model = tiny_model("llama")
    ids = prompts((45,))[0].view(1, -1)
    kw = dict(params)
    ratio = None if "budget" in kw else 0.4

    def run():
        cache = kvcompress.compress(model, method, ratio=ratio, trace=True, **kw)
        tokens, kept = [], []
        with torch.no_grad():
            logits = model(ids, **cache_arg(cache)).logits[:, -1]
            for _ in range(9):
                tokens.append(int(logits.argmax()))
                logits = model(torch.tensor([[tokens[-1]]]), **cache_arg(cache)).logits[:, -1]
                kept.append([cache.kept_positions(i) for i in range(model.config.num_hidden_layers)])
        return tokens, kept, cache

    tokens, kept, cache = run()
    assert not all(layer.slots_ordered for layer in cache.layers), "the in-place path did not run"
    cls = type(cache.compressors[0])
    monkeypatch.setattr(cls, "decode_target", lambda self, ctx: None)  # force the re-store path
    tokens_ref, kept_ref, cache_ref = run()
    assert all(layer.slots_ordered for layer in cache_ref.layers)
    assert tokens == tokens_ref
    assert kept == kept_ref
    assert cache.kept_bytes() == cache_ref.kept_bytes()


@pytest.mark.parametrize("method", ["h2o", "tova", "streaming"])
def test_rows_growing_to_a_budget_then_evicting_match_their_runs_alone(method: str) -> None:
    """Every row shorter than the budget: nothing is dropped at the prefill (the layer keeps its left padding), rows
    reach the budget at different steps; alone, a row is unpadded and evicts in place. Same tokens either way."""
    model = tiny_model("llama")
    rows = prompts((37, 23))
    ids, mask = left_pad(rows)

    def generate(ids, mask):
        cache = kvcompress.compress(model, method, budget=40, phase="decode")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, **cache_arg(cache))
        return out[:, ids.shape[1]:].tolist(), cache

    batched, cache = generate(ids, mask)
    assert all(max(row) <= 40 for layer in cache.kept_tokens() for row in [layer])
    for i, row in enumerate(rows):
        alone, alone_cache = generate(row.view(1, -1), torch.ones(1, len(row), dtype=torch.long))
        assert alone[0] == batched[i]
    assert not alone_cache.layers[0].slots_ordered  # the unpadded row evicted in place
