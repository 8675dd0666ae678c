"""``pyramidkv`` — SnapKV scores with a linearly decreasing per-layer budget.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv 2406.02069);
KVCache-Factory ``pyramidkv/pyramidkv_utils.py``; kvpress ``PyramidKVPress``.

Scoring is :mod:`snapkv`'s (same ``window``, ``kernel``, ``pooling``, ``gqa`` and the same defaults: 32, 7, max, mean).
The budget of each (row, KV head) is the uniform SnapKV budget ``C`` (from ``ratio`` or ``budget``) redistributed over
the layers: with ``β = beta``, ``min = (C − w)/β``, ``max = 2(C − w) − min``, layer ``l`` of ``L`` keeps
``round(max − l·(max − min)/(L − 1)) + w`` — the total over layers equals ``L·C`` up to rounding. As in
KVCache-Factory, a row with ``C ≤ w`` or ``S < 2(C − w)`` (the pyramid would exceed the context) falls back to
uniform SnapKV, a budget covering the whole row keeps it whole in every layer, and a layer's budget never
exceeds its row's length. ``beta=20`` (the paper's default).

Prefill only. kvpress derives ``C`` from its compression ratio the same way (``ratio`` here is the fraction kept).
Budgets differ per layer and per row; the cache stores them ragged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError
from kvcompress.methods.token.snapkv import SnapKV
from kvcompress.registry import register
from kvcompress.selection import kept_counts


def pyramid_budget(c: torch.Tensor, n: torch.Tensor, window: int, beta: float, layer: int, layers: int) -> torch.Tensor:
    """Layer ``layer``'s budget for average budgets ``c`` and row lengths ``n`` (tensors of the same shape)."""
    if layers <= 1:
        return c
    span = (c - window).double()
    low = span / beta
    high = 2 * span - low
    pyramid = torch.round(high - layer * (high - low) / (layers - 1)).long() + window
    uniform = (span <= 0) | (n < 2 * span) | (c >= n)
    return torch.where(uniform, c, torch.minimum(pyramid.clamp(min=1), n))


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scores, linearly decreasing per-layer budget"
    paper = "PyramidKV (Cai et al. 2024)"
    decode_phase = "never"  # per-layer budgets are a prefill decision (the inherited `phase` must stay "prefill")

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            raise KVCompressError(f"beta={self.beta!r} is invalid; valid: a number >= 1")

    @property
    def adaptive(self) -> bool:  # per-layer budgets differ from the uniform one by construction
        return True

    def budgets(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        n = view.counts
        c = kept_counts(n, self.ratio, self.budget)
        return pyramid_budget(c, n, self.window, self.beta, ctx.layer_idx, ctx.num_layers)
