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
* ``normalize="sum"`` (default): the column **sum** over the queries, as H2O and KVCache-Factory. ``normalize="mean"``
  divides each key's sum by the number of (real) queries that see it — ``S − i`` for key ``i`` of a causal prompt of
  ``S`` tokens — which is kvpress's ``ObservedAttentionPress`` score (the average attention a key receives); it
  favours later tokens, which fewer queries see. Prefill only (``phase="decode"`` is rejected with it).
* Scores are per row (the official code sums over the batch, which couples rows).
* ``phase="prefill"`` (KVCache-Factory's prefill-only approximation, kvpress-style). ``phase="decode"`` is the paper's
  policy: every decode query's attention is added to the accumulated scores (kept in the cache state, aligned with the
  kept entries, and counted as cache memory: one float32 per kept entry), and the lowest heavy-hitter is evicted so
  each (row, head) stays at its prefill size (or ``budget``).
* ``chunk=128`` queries per block: memory O(chunk · S · heads) (64 MiB at 16K with 8 query heads).

How it differs from the references:

* **Official H2O** (``h2o_hf/utils_real_drop/modify_llama.py``): evicts during generation (our ``phase="decode"``)
  from budgets that are fractions of the *whole* sequence, ``heavy = int(heavy_ratio·S)`` and
  ``recent = int(recent_ratio·S)`` (floors; default 0.1 + 0.1, i.e. 20 % kept), per query head (MHA models), scores
  summed over the batch. Ours: ``kept = clamp(round(ratio·S), 1, S)`` (rounded, ±1 token against a floor), the
  recent part ``round(recent·kept)``, per KV head (``gqa``), rows independent. ``ratio=0.2`` reproduces its 0.1 + 0.1.
* **KVCache-Factory** ``H2OKVCluster``: prefill only, the sum over all prompt queries (as ours), the window ``w`` of
  its runner (``window_size``, e.g. 32) as the recent part and the top ``C − w`` older entries: ``window=w``
  (``budget=C``) here. It selects per query head after ``repeat_kv`` (a per-query-head cache on GQA models); ours per
  KV head.
* **kvpress** ``ObservedAttentionPress``: ``normalize="mean"`` (above), averaged over the GQA group (``gqa="mean"``),
  **no recent window** (``recent=0``), ``n_kept = max(1, int(S·(1 − compression_ratio)))`` (a floor of a float
  product: ±1 token against our ``round``); it needs eager attention weights, ours never forms the S×S matrix.
  ``normalize=mean recent=0`` gives its kept sets (up to that ±1 token and ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_positive_int, unknown_choice
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

#: How accumulated attention is normalised: H2O's sum, or kvpress's mean over the queries that see each key.
NORMALIZATIONS = ("sum", "mean")


def seen_by(query_valid: torch.Tensor, n: int) -> torch.Tensor:
    """``(batch, n)``: how many real queries see each of the ``n`` keys under causal attention, the ``m`` queries
    being the tokens of the last ``m`` keys (``query_valid (batch, m)``); keys before them are seen by all."""
    qv = query_valid.float()
    b, m = qv.shape
    after = qv.flip(-1).cumsum(-1).flip(-1)  # real queries at or after each query position
    if n <= m:
        return after[:, m - n :]
    return torch.cat([after[:, :1].expand(b, n - m), after], dim=-1)


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
    normalize: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gqa(self.gqa)
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float)) or not 0.0 <= self.recent <= 1.0:
            raise KVCompressError(f"recent={self.recent!r} is invalid; valid: a fraction of the budget in [0, 1]")
        check_positive_int(self.chunk, "chunk")
        if self.normalize not in NORMALIZATIONS:
            raise unknown_choice("normalize", self.normalize, NORMALIZATIONS)
        if self.normalize == "mean" and self.phase == "decode":
            raise KVCompressError("normalize='mean' (kvpress's ObservedAttentionPress) is a prefill score; valid: "
                                  "phase=prefill, or normalize=sum with phase=decode")

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
        query_valid = query_validity(view, q_len)
        mass = attention_mass(
            ctx.query, view.keys, view.valid, ctx.scaling,
            query_valid=query_valid, causal=True, chunk=self.chunk,
        )
        if self.normalize == "mean":  # the average over the real queries that see each key (kvpress)
            mass = mass / seen_by(query_valid, mass.shape[-1]).clamp(min=1.0).unsqueeze(1)
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
