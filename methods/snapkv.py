"""``snapkv`` — observation-window attention, pooled (SnapKV).

Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469);
official ``snapkv/monkeypatch/snapkv_utils.py`` and ``experiments/LongBench/config/*.json``.

1. The last ``window`` prompt queries attend (softmax, causal inside the window) to every key of their row.
2. Their probabilities are summed over the window queries, per query head.
3. The prefix scores (everything before the window) are pooled along the tokens (``kernel``, stride 1, padding
   ``kernel // 2``; the window's own columns are not pooled in), then averaged over the query heads of each GQA group
   (``gqa="mean"``, pool-then-reduce as kvpress; ``"max"`` selectable).
4. Each KV head keeps the whole observation window plus the top prefix entries, within the budget.

Defaults: the paper's LongBench setting ``window=32, kernel=7, pooling="max"``. Published implementations disagree:

=========================  ======  ======  =======  =========================
source                     window  kernel  pooling  how to get it here
=========================  ======  ======  =======  =========================
paper / LongBench configs  32      7       max      (default)
official ``init_snapkv``   32      5       avg      ``kernel=5 pooling=avg``
kvpress ``SnapKVPress``    64      5       avg      ``window=64 kernel=5 pooling=avg`` (its mean over window
                                                    queries ranks like our sum)
KVCache-Factory LongBench  8       7       max      ``window=8``
=========================  ======  ======  =======  =========================

``pooling="none"`` disables pooling. ``sink=0`` (SnapKV has none). A row shorter than the window uses all its real
queries. A budget ≥ the row's length keeps everything (SnapKV's "skip if S < C").

``phase="decode"`` (periodic re-scoring, as kvpress's ``DecodingPress``): the last ``window`` queries (prompt, then
generated) are kept in the cache state (counted as cache memory); every ``interval`` decode steps the cache is
re-scored with them and cut back to its prefill size (or ``budget``), so between re-scorings it grows by at most
``interval`` entries. ``interval=1`` evicts every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView, register
from kvcompress.errors import KVCompressError, check_positive_int, unknown_choice
from kvcompress.scoring import (
    POOLINGS,
    ScoredTokenCompressor,
    attention_mass,
    group_reduce,
    pool_scores,
    query_validity,
)


@register
@dataclass
class SnapKV(ScoredTokenCompressor):
    name = "snapkv"
    decode_capable = True

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    phase: str = "prefill"
    interval: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.window, "window")
        check_positive_int(self.interval, "interval")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise KVCompressError(f"kernel={self.kernel!r} is invalid; valid: an odd integer >= 1")
        if self.pooling not in POOLINGS:
            raise unknown_choice("pooling", self.pooling, POOLINGS)

    def window_scores(self, view: LayerView, ctx: CompressionContext, queries: torch.Tensor,
                      query_valid: torch.Tensor | None) -> torch.Tensor:
        """Steps 1–3 for window queries that are the tokens of the view's last ``queries.shape[2]`` entries."""
        b, hq = queries.shape[:2]
        h = view.valid.shape[1]
        mass = attention_mass(queries, view.keys, view.valid, ctx.scaling, query_valid=query_valid,
                              causal=True, chunk=queries.shape[2])
        prefix = view.valid & (view.rank() < (view.counts - self.window).unsqueeze(-1))
        g = hq // h
        pooled = pool_scores(mass, prefix.repeat_interleave(g, 1), self.kernel, self.pooling)
        return group_reduce(pooled, h, self.gqa)

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        w = min(self.window, view.valid.shape[-1])
        if ctx.query.shape[2] < w:
            raise KVCompressError(
                f"snapkv window={self.window} needs the last {w} prompt queries but got {ctx.query.shape[2]} "
                "(composed with a cross-layer compressor); valid: window <= 64 in such a composition"
            )
        return self.window_scores(view, ctx, ctx.query[:, :, -w:], query_validity(view, w))

    # -- decode: periodic re-scoring ------------------------------------------------------------------------
    def after_prefill(self, scores: torch.Tensor, view: LayerView, keep: torch.Tensor, ctx: CompressionContext) -> None:
        w = min(self.window, view.valid.shape[-1])
        ctx.state["queries"] = ctx.query[:, :, -w:].clone()
        ctx.state["query_valid"] = query_validity(view, w).clone()
        ctx.state["steps"] = 0

    def decode_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor | None:
        q, qv = ctx.state.get("queries"), ctx.state.get("query_valid")
        new_valid = torch.ones(ctx.query.shape[0], 1, dtype=torch.bool)
        if q is None:
            q, qv = ctx.query, new_valid
        else:
            q = torch.cat([q, ctx.query], dim=2)[:, :, -self.window:]
            qv = torch.cat([qv, new_valid], dim=1)[:, -self.window:]
        ctx.state["queries"], ctx.state["query_valid"] = q, qv
        ctx.state["steps"] = ctx.state.get("steps", 0) + 1
        if ctx.state["steps"] % self.interval:
            return None
        return self.window_scores(view, ctx, q, qv)
