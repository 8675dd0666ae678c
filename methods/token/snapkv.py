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

How it differs from the references with those settings matched (kept sets otherwise identical):

* **Kept count.** ``ratio`` keeps ``clamp(round(ratio·S), 1, S)`` per KV head; kvpress keeps
  ``max(1, int(S·(1 − compression_ratio)))`` — a floor of a float product, so it keeps one token fewer whenever
  ``ratio·S`` has a fractional part above 0.5 (at exactly .5 ours rounds to even) or the float
  ``1 − compression_ratio`` falls just below ``ratio`` (e.g.
  ``S=1030``, ``compression_ratio=0.9``: ``int(1030 × 0.09999999999999998) = 102``, ours ``round(103.0) = 103``).
  The official code and KVCache-Factory take an absolute ``max_capacity_prompt`` (``budget=`` here: no rounding).
* **The window.** Ours always keeps the newest ``window`` tokens inside the budget, and a budget below the window
  keeps the newest ``budget`` tokens; the official code keeps ``C − w`` prefix tokens plus the window (the same
  when ``C ≥ w``); kvpress pads the window's scores with the prefix maximum, so the window competes in one top-k
  (kept whole unless the budget is below the window, where its choice among the tied window tokens is
  ``topk``'s).
* **GQA.** kvpress averages the window queries' probabilities (``mean``, which ranks like our sum), pools, then
  averages the group (our ``gqa="mean"``: pool-then-reduce, the same order); the official code and KVCache-Factory
  select per query head after ``repeat_kv`` (a per-query-head cache, larger than the dense one on GQA models).
* **Phases.** The official code and kvpress's ``SnapKVPress`` compress once at the prefill; kvpress compresses
  the context only by default (``eval.query_aware=false`` here), the papers the whole prompt (our default).

``phase="decode"`` (periodic re-scoring, as kvpress's ``DecodingPress``): the last ``window`` queries (prompt, then
generated) are kept in the cache state (counted as cache memory); every ``interval`` decode steps the cache is
re-scored with them and cut back to its prefill size (or ``budget``), so between re-scorings it grows by at most
``interval`` entries. ``interval=1`` evicts every step.

Which stored queries a re-scoring uses (per row and KV head): a query's token must still be held, and a query must
not see entries newer than itself. A stored query is used only while its token and every newer token are all held —
then it is the pair's entry at the same distance from the newest, and it attends to the pair's entries up to that
one. Tokens generated since the prefill or the last re-scoring are always held (appended, never evicted in
between); at the prefill and at each re-scoring, the run of newest tokens it kept (the observation window only
when the budget covers it — a budget below the window keeps fewer, and the older window queries are then unused)
is what carries over. So a re-scoring uses at most the decode steps since the last one plus that kept run, capped
at ``window``; the other stored queries count for nothing. When the prompt was fed with the cache paused, only
queries generated afterwards are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_positive_int, unknown_choice
from kvcompress.methods.token.scoring import (
    _MASKED,
    POOLINGS,
    ScoredTokenCompressor,
    attention_mass,
    check_gqa,
    group_reduce,
    pool_scores,
    query_validity,
)
from kvcompress.registry import register


@register
@dataclass
class SnapKV(ScoredTokenCompressor):
    name = "snapkv"
    summary = "observation-window attention, pooled; `phase=decode` re-scores every `interval` steps"
    paper = "SnapKV (Li et al. 2024)"
    decode_phase = "optional"

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    phase: str = "prefill"
    interval: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gqa(self.gqa)
        check_positive_int(self.window, "window")
        check_positive_int(self.interval, "interval")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise KVCompressError(f"kernel={self.kernel!r} is invalid; valid: an odd integer >= 1")
        if self.pooling not in POOLINGS:
            raise unknown_choice("pooling", self.pooling, POOLINGS)

    def window_scores(self, view: LayerView, ctx: CompressionContext, queries: torch.Tensor,
                      query_valid: torch.Tensor | None) -> torch.Tensor:
        """Steps 1–3 for window queries that are the tokens of the view's last ``queries.shape[2]`` entries (the
        prefill buffer)."""
        mass = attention_mass(queries, view.keys, view.valid, ctx.scaling, query_valid=query_valid,
                              causal=True, chunk=queries.shape[2])
        return self._pool_and_reduce(mass, view)

    def _pool_and_reduce(self, mass: torch.Tensor, view: LayerView) -> torch.Tensor:
        """Step 3: pool the prefix scores (every entry older than the newest ``window``), reduce to the KV heads."""
        h = view.valid.shape[1]
        prefix = view.valid & (view.rank() < (view.counts - self.window).unsqueeze(-1))
        g = mass.shape[1] // h
        if view.ordered:
            pooled = pool_scores(mass, prefix.repeat_interleave(g, 1), self.kernel, self.pooling)
        else:  # slots of a decode-time layer: pool neighbours in position order
            order = view.order().repeat_interleave(g, 1)
            pooled = pool_scores(mass.gather(-1, order), prefix.repeat_interleave(g, 1).gather(-1, order),
                                 self.kernel, self.pooling)
            pooled = torch.empty_like(pooled).scatter_(-1, order, pooled)
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
        real = query_validity(view, w)  # (b, w): the window queries that are real tokens
        ctx.state["queries"] = ctx.query[:, :, -w:].clone()
        ctx.state["query_valid"] = real.clone()
        # Newest window queries whose tokens the prefill kept, per (row, head): the window slots after the newest
        # real token it dropped (left padding is older than every real token, so it never interrupts the run).
        dropped = real.unsqueeze(1) & ~keep[..., -w:]  # (b, h, w)
        slot = torch.arange(w, device=keep.device)
        ctx.state["fresh"] = w - 1 - torch.where(dropped, slot, -1).amax(-1)
        ctx.state["steps"] = 0

    def decode_step(self, ctx: CompressionContext) -> bool:
        """Every decode step: remember the new query among the newest ``window`` (and how many of them are usable);
        select only every ``interval`` steps."""
        q, qv, fresh = ctx.state.get("queries"), ctx.state.get("query_valid"), ctx.state.get("fresh")
        new = ctx.query.shape[2]  # tokens appended at this step (their keys are the layer's newest entries)
        new_valid = torch.ones(ctx.query.shape[0], new, dtype=torch.bool, device=ctx.query.device)
        if q is None:  # the prefill ran paused: only the queries generated from now on are known
            q, qv = ctx.query, new_valid
            fresh = torch.zeros(ctx.query.shape[0], ctx.num_kv_heads, dtype=torch.long, device=ctx.query.device)
        else:
            q = torch.cat([q, ctx.query], dim=2)
            qv = torch.cat([qv, new_valid], dim=1)
        q, qv = q[:, :, -self.window:], qv[:, -self.window:]
        fresh = (fresh + new).clamp(max=q.shape[2])  # appended tokens are held until the next re-scoring
        ctx.state["queries"], ctx.state["query_valid"], ctx.state["fresh"] = q, qv, fresh
        ctx.state["steps"] = ctx.state.get("steps", 0) + 1
        return ctx.state["steps"] % self.interval == 0

    def decode_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor | None:
        q, qv, fresh = ctx.state["queries"], ctx.state["query_valid"], ctx.state["fresh"]
        return self._pool_and_reduce(self._decode_mass(view, ctx, q, qv, fresh), view)

    def _decode_mass(self, view: LayerView, ctx: CompressionContext, q: torch.Tensor, qv: torch.Tensor,
                     fresh: torch.Tensor) -> torch.Tensor:
        """Step 1–2 at a re-scoring: ``(batch, q_heads, n)``. Stored query ``j`` at distance ``t = m − 1 − j`` from the
        newest is used for KV head ``h`` of row ``r`` only if ``t < fresh[r, h]`` — then its token is that pair's entry
        at distance ``t`` from its newest entry — and sees the pair's entries no newer than its own token."""
        b, hq, m, d = q.shape
        h, n = view.keys.shape[1], view.keys.shape[2]
        g = hq // h
        age = (view.counts.unsqueeze(-1) - 1 - view.rank()).unsqueeze(2)  # (b, h, 1, n): entries from the newest
        q_age = torch.arange(m - 1, -1, -1, device=q.device)  # (m,): stored queries from the newest
        visible = view.valid.unsqueeze(2) & (age >= q_age.view(1, 1, m, 1))  # (b, h, m, n)
        used = (q_age < fresh.unsqueeze(-1)) & qv.unsqueeze(1)  # (b, h, m)
        s = (q.float() * ctx.scaling).reshape(b, h, g, m, d) @ view.keys.float().unsqueeze(2).transpose(-1, -2)
        s = s.masked_fill(~visible.unsqueeze(2), _MASKED)  # (b, h, g, m, n); a query that sees nothing is unused
        s = s.sub_(s.amax(-1, keepdim=True)).exp_()
        weight = used.unsqueeze(2).float() / s.sum(-1)  # (b, h, g, m): softmax normalisation × use
        return (weight.unsqueeze(-2) @ s).view(b, hq, n)

    def after_decode(self, scores: torch.Tensor | None, view: LayerView, keep: torch.Tensor,
                     ctx: CompressionContext) -> None:
        if scores is None or "fresh" not in ctx.state:
            return
        # After a re-scoring, the usable queries are those whose tokens are still held with every newer one.
        fresh = ctx.state["fresh"].unsqueeze(-1)
        age = view.counts.unsqueeze(-1) - 1 - view.rank()
        dropped = view.valid & ~keep & (age < fresh)
        ctx.state["fresh"] = torch.where(dropped, age, fresh).amin(-1)
