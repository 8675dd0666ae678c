"""``h2o`` — Heavy-Hitter Oracle: accumulated attention plus a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", NeurIPS 2023
(arXiv 2306.14048); official ``h2o_hf/utils_real_drop/modify_llama.py``.

Score of an entry = the attention it has received, accumulated over every query so far: at prefill the column sums
of the causal softmax over **all** prompt queries (computed ``chunk`` queries at a time, each chunk against only the
keys it can see — never an S×S matrix), per query head, reduced to the KV head by ``gqa="mean"``.
Each (row, head) keeps its recent window plus the top-scoring older entries, within the budget.

Defaults and choices:

* ``recent=0.5``: half the budget is the recent window, half heavy hitters — the paper's ``heavy_ratio 0.1`` +
  ``recent_ratio 0.1``. An explicit ``window > 0`` (tokens) replaces ``round(recent·kept)``. ``sink=0`` (H2O has none).
* Scores are per row (the official code sums over the batch, which couples rows).
* ``phase="prefill"`` (KVCache-Factory's prefill-only approximation, kvpress-style). ``phase="decode"`` is the paper's
  policy: every decode query's attention is added to the accumulated scores (kept in the cache state, aligned with the
  kept entries, and counted as cache memory: one float32 per kept entry), and the lowest heavy-hitter is evicted so
  each (row, head) stays at its prefill size (or ``budget``).
* ``chunk=128`` queries per block: memory O(chunk · S · heads) (64 MiB at 16K with 8 query heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_positive_int
from kvcompress.methods.token.scoring import (
    ScoredTokenCompressor,
    attention_mass,
    check_gqa,
    from_rank_order,
    group_reduce,
    needs_all_queries,
    protected_mask,
    query_validity,
    to_rank_order,
)
from kvcompress.registry import register


@register
@dataclass
class H2O(ScoredTokenCompressor):
    name = "h2o"
    summary = "accumulated attention (chunked, no S×S matrix) + recent; `phase=decode`"
    paper = "H2O (Zhang et al. 2023)"
    decode_phase = "optional"

    recent: float = 0.5
    gqa: str = "mean"
    chunk: int = 128
    phase: str = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gqa(self.gqa)
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float)) or not 0.0 <= self.recent <= 1.0:
            raise KVCompressError(f"recent={self.recent!r} is invalid; valid: a fraction of the budget in [0, 1]")
        check_positive_int(self.chunk, "chunk")

    def protect(self, view: LayerView, kept: torch.Tensor, ctx: CompressionContext | None = None) -> torch.Tensor:
        held = ctx.state.get("held") if ctx is not None and ctx.phase == "decode" else None
        if self.window > 0:
            window = self.window
        elif held is not None:  # decode: pairs that evict keep `held` (the others keep everything): host arithmetic
            window = round(held * self.recent)
        else:
            window = torch.round(kept.double() * self.recent).long()
        return protected_mask(view, self.sink, window, kept)

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        needs_all_queries(self, view, ctx)
        q_len = ctx.query.shape[2]
        mass = attention_mass(
            ctx.query, view.keys, view.valid, ctx.scaling,
            query_valid=query_validity(view, q_len), causal=True, chunk=self.chunk,
        )
        return group_reduce(mass, view.valid.shape[1], self.gqa)

    def after_prefill(self, scores: torch.Tensor, view: LayerView, keep: torch.Tensor, ctx: CompressionContext) -> None:
        ctx.state["acc"] = to_rank_order(scores, keep)

    def decode_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        if "acc" in ctx.state:
            acc = from_rank_order(ctx.state["acc"], view)
        else:
            acc = torch.zeros(view.valid.shape, device=view.valid.device)
        # a dense layer at decode holds only valid entries: no mask, no sync
        mass = attention_mass(ctx.query, view.keys, view.valid, ctx.scaling, causal=False,
                              all_valid=True if ctx.decode_count is not None else None)
        return acc + group_reduce(mass, view.valid.shape[1], self.gqa)

    def after_decode(self, scores: torch.Tensor, view: LayerView, keep: torch.Tensor, ctx: CompressionContext) -> None:
        held = ctx.state.get("held")
        width = min(ctx.decode_count, held) if ctx.decode_count is not None and held is not None else None
        ctx.state["acc"] = to_rank_order(scores.masked_fill(~view.valid, 0.0), keep, view, width)
