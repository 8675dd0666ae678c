"""Ops per decode step per layer: what one decode step launches on an accelerator.

Counted on the virtual accelerator of :mod:`kvcompress.device_probe` (the model and its inputs on a second device,
so the code paths are the ones a CUDA run takes: the model's sdpa kernel on a dense compressed layer, all bit-planes
unpacked at once), for a left-padded batch (rows of different lengths, so token and head methods store ragged
layers): one decode step after the prefill and a warm-up step. The count, divided by the number of layers, is of
the aten ops that run a kernel (dispatcher level, composite ops decomposed, views and bare allocations left out):
about the kernel launches of the step on CUDA. (``torch.profiler`` on the CPU lists nested and metadata events, not
kernels; ``python -m kvcompress.bench gpu`` counts CUDA kernels with it where a GPU is available.)

The stock ``DynamicCache`` is the reference: the difference is what the cache adds per layer. A second table attends
one ragged layer (16 pairs) whose pairs keep 1, 4 or 16 distinct counts: its kernels must not change.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..compat import cache_arg
from ..device_probe import VIRTUAL, count_ops, virtual_device
from .common import BenchModel, make_cache, quiet
from .decode import parse_variant


@torch.no_grad()
def decode_step_ops(bm: BenchModel, variant: str, rows: list[int]) -> dict[str, Any]:
    """Ops of one decode step of ``variant`` after prefilling a left-padded batch of ``rows`` tokens."""
    method, ratio = parse_variant(variant)
    g = torch.Generator().manual_seed(0)
    width = max(rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(rows):
        ids[i, width - n:] = torch.randint(3, bm.model.config.vocab_size, (n,), generator=g)
        mask[i, width - n:] = 1
    model = copy.deepcopy(bm.model)
    with virtual_device(), quiet():
        model.to(VIRTUAL)
        cache = make_cache(model, method, ratio)
        model(ids.to(VIRTUAL), attention_mask=mask.to(VIRTUAL), **cache_arg(cache), logits_to_keep=1)
        token = torch.full((len(rows), 1), 5, device=VIRTUAL)
        for step in range(2):  # a warm-up step, then the counted one
            step_mask = torch.cat([mask, torch.ones(len(rows), step + 1, dtype=mask.dtype)], 1).to(VIRTUAL)
            with count_ops(kernels_only=True) as kernels:
                model(token, attention_mask=step_mask, **cache_arg(cache), logits_to_keep=1)
    layers = model.config.num_hidden_layers
    return {"kernels_per_layer": sum(kernels.values()) / layers,
            "ragged_layers": sum(getattr(layer, "ragged", None) is not None for layer in cache.layers),
            "encoded_layers": sum(bool(getattr(layer, "segments", None)) for layer in cache.layers)}


@torch.no_grad()
def ragged_attend_kernels(distinct: list[int], pairs: int = 16, head_dim: int = 64, queries: int = 4) -> dict:
    """Kernels of one ragged attention over ``pairs`` pairs keeping ``k`` distinct counts, for each ``k``."""
    from kvcompress.ragged import Ragged

    out = {}
    with virtual_device():
        for k in distinct:
            counts = [200 + 37 * (i % k) for i in range(pairs)]
            flat = torch.randn(sum(counts), head_dim, device=VIRTUAL)
            ragged = Ragged.pack(flat, flat, None, counts)
            query = torch.randn(pairs, queries, head_dim, device=VIRTUAL)
            with count_ops(kernels_only=True) as kernels:
                ragged.attend(query, head_dim**-0.5)
            out[k] = sum(kernels.values())
    return out


def run(bm: BenchModel, cfg: Any, log) -> dict[str, Any]:
    rows = [int(n) for n in cfg.rows]
    results: dict[str, Any] = {"rows": rows, "variants": {}}
    for variant in cfg.variants:
        r = results["variants"][variant] = decode_step_ops(bm, variant, rows)
        log(f"  ops {bm.name} {variant}: {r['kernels_per_layer']:.1f} kernels / layer / step "
            f"({r['ragged_layers']} ragged, {r['encoded_layers']} encoded layers)")
    results["ragged_distinct"] = ragged_attend_kernels([int(k) for k in cfg.distinct])
    log(f"  ragged attention kernels by distinct counts: {results['ragged_distinct']}")
    return results
