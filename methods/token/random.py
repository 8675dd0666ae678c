"""``random`` — keep a seeded uniform random subset of each row's tokens (the control every scorer must beat).

Each (layer, KV head, row) keeps ``clamp(round(ratio·n), 1, n)`` of its ``n`` real tokens (or ``budget``; not both),
chosen by a counter-based hash of ``(seed, layer, head, rank of the token in its row)``. The draw therefore does
not depend on the batch a row is in, on its padding, or on the other rows. Heads choose independently.

Default ``seed=0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.methods.token.budgets import TokenCompressor
from kvcompress.registry import register
from kvcompress.selection import counter_hash, topk_mask


@register
@dataclass
class Random(TokenCompressor):
    name = "random"
    summary = "a seeded uniform random subset per head (control)"
    paper = "—"

    seed: int = 0

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        heads = torch.arange(view.valid.shape[1], device=view.valid.device).view(1, -1, 1)
        scores = counter_hash(self.seed, ctx.layer_idx, heads, view.rank())
        return topk_mask(scores, self.budgets(view, ctx), view.valid)
