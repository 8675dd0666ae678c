"""Shared machinery of the token-axis scorers (snapkv, pyramidkv, h2o, tova, knorm, expected_attention, merge).

A scorer subclasses :class:`ScoredTokenCompressor` and implements ``score(view, ctx) -> (batch, kv_heads, n)``
(higher = keep). The base class turns scores into a keep mask:

* **Budget** per (row, KV head): ``kept_counts(n, ratio, budget)`` — ``clamp(round(ratio·n), 1, n)`` or
  ``min(budget, n)``; a budget larger than the context keeps everything (scoring is then skipped).
* **Protected entries** (``sink`` first tokens, ``window`` most recent ones) count inside the budget. If the budget is
  smaller than ``sink + window`` the sinks go first, then the newest tokens.
* **Allocation** (:mod:`kvcompress.methods.token.budgets`): ``layer_allocation`` spreads the budget over the layers;
  ``allocation="uniform"`` keeps the budget in every KV head, ``"adakv"`` (Feng et al., AdaKV, arXiv 2407.11550)
  keeps the same *total* per row and layer but takes the global top scores over the layer's KV heads, with a
  safeguard: each head first keeps its top ``floor·budget`` (α = 0.2 as in AdaKV) — scores must then be comparable
  across heads, which holds for attention probabilities and key norms; ``"scores"`` gives heads budgets in
  proportion to head scores. The cache stores per-head counts ragged (real savings, exact ``kept_bytes``).
* **Ratio or budget**, not both: a budget with a ratio other than the default is rejected at construction.
* **Ties**: among entries with equal scores the lowest position (the row's earliest token) is kept first, for every
  scorer here (:func:`~kvcompress.compressor.topk_mask` is a stable descending sort over entries in position order);
  in the AdaKV global top-k, the lower head first, then the lower position.
* **GQA**: scores of the ``g`` query heads of a group are reduced to their KV head by ``gqa="mean"`` (default, as
  kvpress and AdaKV) or ``"max"``; storage is always per KV head, never per query head.
* **Rows** are scored from their own valid entries only: invalid keys are −inf before every softmax, queries of
  left padding are dropped, and windows are counted in each row's real tokens, so batched rows are independent.

Attention statistics are computed in query chunks (:func:`attention_mass`), never as an S×S matrix: memory is
O(chunk · S) per head.

**Query-aware vs question-agnostic.** Compressing a prompt that already contains the question (the SnapKV/PyramidKV
papers; every flat-string benchmark) is *query-aware*. To compress the context alone and append the question
uncompressed (kvpress's default), prefill the context, then feed the question with :func:`append_uncompressed`
(or any forward under ``cache.paused()``) and decode as usual. Record which one a result used
(:data:`QUERY_MODES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvcompress.compat import cache_arg
from kvcompress.compressor import CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_non_negative_int, unknown_choice
from kvcompress.methods.token.budgets import HEAD_ALLOCATIONS, TokenCompressor, adakv_select, head_score_budgets
from kvcompress.selection import topk_mask

GQA_REDUCTIONS = ("mean", "max")
_MASKED = -1e30
POOLINGS = ("max", "avg", "none")
#: the two ways to compress a prompt with a question (what a results row records)
QUERY_MODES = ("query-aware", "question-agnostic")


# ---------------------------------------------------------------------------------------------------------------
# Query-agnostic helper


@torch.no_grad()
def append_uncompressed(model: torch.nn.Module, cache: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """Feed ``input_ids`` (e.g. the question after a compressed context) without compressing them.

    Positions continue from the cache's logical length; pass ``attention_mask``/``position_ids`` for left-padded
    batches as for any continuation. Returns the model output (its last logits start the answer)."""
    with cache.paused():
        return model(input_ids, **cache_arg(cache), use_cache=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Scoring helpers


def group_reduce(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """``(batch, q_heads, n)`` → ``(batch, kv_heads, n)``: query head ``h·g + j`` belongs to KV head ``h``."""
    b, hq, n = scores.shape
    grouped = scores.reshape(b, num_kv_heads, hq // num_kv_heads, n)
    return grouped.amax(2) if how == "max" else grouped.mean(2)


def query_validity(view: LayerView, q_len: int) -> torch.Tensor:
    """Which of the last ``q_len`` view entries are real tokens, per row ``(batch, q_len)`` — at prefill the queries
    are the prompt's own tokens, the last ``q_len`` entries of the view (left padding is invalid in every head)."""
    return view.valid.any(1)[:, -q_len:]


def attention_mass(
    query: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    *,
    query_valid: torch.Tensor | None = None,
    causal: bool = True,
    chunk: int = 256,
    all_valid: bool | None = None,
) -> torch.Tensor:
    """Sum over queries of each query head's softmax attention to each key: ``(batch, q_heads, n)``, float32.

    query ``(batch, q_heads, m, d)``; keys ``(batch, kv_heads, n, d)``; valid ``(batch, kv_heads, n)``. With ``causal``
    the m queries are the tokens of the last m entries (query i may see entries ``≤ n − m + i``). query_valid
    ``(batch, m)`` drops queries (left padding): pass it whenever some of the queries may be padding. Queries are
    processed ``chunk`` at a time and each chunk only looks at the keys it can see, so memory is O(chunk · n) per head
    and the causal half is never computed. ``all_valid``: whether every key is valid, when the caller knows it on the
    host (None: read from ``valid`` — a sync; True skips the key mask, a pass over the scores).
    """
    b, hq, m, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    k_t = keys.float().transpose(-1, -2)
    # Masked logits get −1e30 (not −inf): a query that sees no valid key then yields finite values, which its
    # zero weight removes, and a masked entry still contributes exactly exp(−1e30 − max) = 0.
    device = keys.device
    if all_valid is None:
        all_valid = bool(valid.all())
    key_bias = None if all_valid else torch.zeros(valid.shape, device=device).masked_fill_(~valid, _MASKED)[:, :, None]
    out = torch.zeros(b, h, g, 1, n, device=device)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        c = stop - start
        end = n - m + stop if causal else n  # keys visible to the chunk's last query
        q = (query[:, :, start:stop].float() * scaling).reshape(b, h, g * c, d)
        s = torch.matmul(q, k_t[..., :end])  # (b, h, g·c, end)
        if key_bias is not None:
            s.add_(key_bias[..., :end])
        if causal:  # only the chunk's diagonal block [end − c, end) is partly hidden
            blk = s.view(b, h, g, c, end)[..., end - c:]
            blk.add_(torch.full((c, c), _MASKED, device=device).triu_(1))
        s.sub_(s.amax(-1, keepdim=True)).exp_()
        weight = 1.0 / s.sum(-1)  # softmax normalisation, folded into the sum over queries
        if query_valid is not None:
            weight = weight * query_valid[:, None, start:stop].float().repeat(1, 1, g)
        weight = weight.view(b, h, g, 1, c)
        out[..., :end] += torch.matmul(weight, s.view(b, h, g, c, end))
    return out.view(b, hq, n)


def pool_scores(scores: torch.Tensor, valid: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the tokens (stride 1, padding ``kernel // 2``) over the valid entries only: invalid entries
    act as the pooling's own padding (−inf for max, 0 for avg with ``count_include_pad``, as SnapKV's
    ``F.avg_pool1d``). Returns 0 on invalid entries."""
    if pooling == "none" or kernel <= 1:
        return scores.masked_fill(~valid, 0.0)
    b, h, n = scores.shape
    flat = scores.reshape(b * h, 1, n)
    flat_valid = valid.reshape(b * h, 1, n)
    if pooling == "max":
        pooled = F.max_pool1d(flat.masked_fill(~flat_valid, float("-inf")), kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat.masked_fill(~flat_valid, 0.0), kernel, stride=1, padding=kernel // 2)
    return pooled[..., :n].reshape(b, h, n).masked_fill(~valid, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Selection helpers


def protected_mask(view: LayerView, sink: int, window: int | torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The first ``sink`` and the newest ``window`` (an int or per (row, head)) valid entries of each (row, head),
    within the budget ``kept``."""
    rank = view.rank()
    n = view.counts.unsqueeze(-1)
    kept = kept.unsqueeze(-1)
    n_sink = torch.clamp(kept, max=sink)
    if isinstance(window, torch.Tensor):
        window = window.unsqueeze(-1) if window.dim() else window
        n_recent = torch.minimum(torch.clamp(kept - n_sink, min=0), window)
    else:
        n_recent = torch.clamp(kept - n_sink, min=0, max=window)
    return view.valid & ((rank < n_sink) | (rank >= n - n_recent))


def uniform_select(scores: torch.Tensor, view: LayerView, kept: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
    """Protected entries plus the top ``kept − protected`` scores of each (row, head); ties go to the earlier
    position (also when the view is in slot order)."""
    rest = kept - protect.sum(-1)
    if view.ordered:
        return protect | topk_mask(scores, rest, view.valid & ~protect)
    order = view.order()
    chosen = topk_mask(scores.gather(-1, order), rest, (view.valid & ~protect).gather(-1, order))
    return protect | torch.zeros_like(chosen).scatter_(-1, order, chosen)


def to_rank_order(values: torch.Tensor, mask: torch.Tensor, view: LayerView | None = None,
                  width: int | None = None) -> torch.Tensor:
    """Compact ``values`` ``(batch, heads, n)`` to the entries of ``mask``, in position order: ``(batch, heads,
    width)`` (zero-filled; ``width`` defaults to the largest count, read from the device) — the layout of per-entry
    state kept across steps (entry r = the r-th kept entry). ``view``: the view ``values`` is aligned with, needed
    when its entries are in slot order."""
    if view is not None and not view.ordered:
        order = view.order()
        values, mask = values.gather(-1, order), mask.gather(-1, order)
    if width is None:
        counts = mask.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
    out = values.new_zeros(values.shape[:2] + (width,))
    rank = mask.long().cumsum(-1) - 1
    idx = torch.where(mask & (rank < width), rank, width)  # masked-out entries go to a scratch column
    scratch = values.new_zeros(values.shape[:2] + (width + 1,))
    scratch.scatter_(-1, idx, values.masked_fill(~mask, 0))
    out.copy_(scratch[..., :width])
    return out


def from_rank_order(state: torch.Tensor, view: LayerView) -> torch.Tensor:
    """Per-entry state in rank order back onto the view's entries; entries past the stored count (tokens appended
    since) get 0."""
    rank = view.rank()
    width = state.shape[-1]
    inside = (rank >= 0) & (rank < width)
    if not width:
        return torch.zeros_like(rank, dtype=state.dtype)
    gathered = torch.gather(state, -1, rank.clamp(min=0, max=width - 1))
    return torch.where(inside, gathered, torch.zeros_like(gathered))


# ---------------------------------------------------------------------------------------------------------------
# Base class


@dataclass
class ScoredTokenCompressor(TokenCompressor):
    """Token-axis eviction by a per-entry score (see the module docstring for budgets, protection and allocation).

    Subclasses implement :meth:`score`; decode-capable ones set ``decode_phase = "optional"``, have a ``phase`` field
    and implement :meth:`decode_scores`. ``phase="decode"`` then holds every (row, head) at the size it had after the
    prefill (or at ``budget`` when one is given, so a short prompt grows to it), evicting the lowest-scoring entries
    each step. Budgets follow :mod:`kvcompress.methods.token.budgets` (``layer_allocation`` across layers,
    ``allocation`` across the KV heads of a row; ``scores`` names the head scores of ``allocation="scores"``).
    """

    sink: int = 0
    window: int = 0
    allocation: str = "uniform"
    floor: float = 0.2
    scores: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative_int(self.sink, "sink")
        check_non_negative_int(self.window, "window")
        if self.allocation not in HEAD_ALLOCATIONS:
            raise unknown_choice("allocation", self.allocation, HEAD_ALLOCATIONS)
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
            raise KVCompressError(f"floor={self.floor!r} is invalid; valid: a fraction of the head budget in [0, 1]")
        if not isinstance(self.scores, str) or not self.scores:
            raise KVCompressError(f"scores={self.scores!r} is invalid; valid: auto, prompt, or a path to a head-score "
                                  "artifact")

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        if self.allocation != "scores":
            return None
        from kvcompress.methods.head.heads import prepare_scores

        return prepare_scores(self.scores, model, tokenizer)

    def protected_window(self) -> int:
        return self.window

    # -- what subclasses provide ----------------------------------------------------------------------------
    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """Scores ``(batch, kv_heads, n)`` at prefill; higher = keep. Only valid entries are read."""
        raise NotImplementedError

    def decode_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor | None:
        """Scores at a decode step (``ctx.query`` is the new token's query; the view's newest entry is its key), or
        None to evict nothing at this step."""
        raise NotImplementedError

    def budgets(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """Entries to keep per (row, KV head) at the prefill: the layer's budget, spread over the heads by their
        scores with ``allocation="scores"`` (AdaKV's spread happens at selection, in :meth:`choose`)."""
        per_head = super().budgets(view, ctx)
        if self.allocation != "scores" or bool((per_head >= view.counts).all()):
            return per_head
        return head_score_budgets(per_head, view.counts, self.head_weights(view, ctx), self.floor)

    def head_weights(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """``(batch, kv_heads)`` non-negative head weights for ``allocation="scores"``: the model's head-score
        artifact (its primary score, the other one for a layer where it is all zero), or without one each row's
        out-of-window attention mass of its last prompt queries."""
        from kvcompress.methods.head.heads import out_of_window_mass, resolve_scores

        b, h = view.valid.shape[:2]
        data = resolve_scores(self, ctx)
        if data is None:
            return out_of_window_mass(view, ctx, self.sink, self.window)
        other = "mass" if data["primary"] == "retrieval" else "retrieval"
        row = data[data["primary"] + "_kv"][ctx.layer_idx]
        if sum(row) <= 0:
            row = data[other + "_kv"][ctx.layer_idx]
        return torch.tensor(row, dtype=torch.float64, device=view.valid.device).unsqueeze(0).expand(b, h)

    @property
    def adaptive(self) -> bool:
        """True when kept counts may differ from the uniform per-head budget (per-head or per-layer allocation)."""
        return self.allocation != "uniform" or super().adaptive

    # -- selection ------------------------------------------------------------------------------------------
    def protect(self, view: LayerView, kept: torch.Tensor, ctx: CompressionContext | None = None) -> torch.Tensor:
        """Entries kept whatever their score (sinks, recent window), inside the budget."""
        return protected_mask(view, self.sink, self.window, kept)

    def choose(self, scores: torch.Tensor, view: LayerView, kept: torch.Tensor) -> torch.Tensor:
        protect = self.protect(view, kept)
        if self.allocation == "adakv":
            return adakv_select(scores, view, kept, protect, self.floor)
        return uniform_select(scores, view, kept, protect)

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        if ctx.phase == "decode":
            return self._decode_select(view, ctx)
        kept = self.budgets(view, ctx)
        decode = self.active("decode")
        if bool((kept >= view.counts).all()) and not decode:
            return view.valid  # nothing to drop (ratio=1, budget ≥ context): no scoring, bit-identical
        scores = self.score(view, ctx)
        keep = view.valid if bool((kept >= view.counts).all()) else self.choose(scores, view, kept)
        if decode:
            target = kept if self.budget is None else torch.full_like(kept, self.budget)
            ctx.state["target"] = target
            ctx.state["held"] = uniform_value(target)  # host int (not a tensor: not cache memory)
            self.after_prefill(scores, view, keep, ctx)
        return keep

    def decode_target(self, ctx: CompressionContext) -> int | None:
        """The size every (row, head) is held at while decoding, when it is the same for all (known since the
        prefill); None otherwise (rows or heads of different sizes: the cache re-stores the layer at eviction)."""
        return ctx.state.get("held")

    def after_prefill(self, scores: torch.Tensor, view: LayerView, keep: torch.Tensor, ctx: CompressionContext) -> None:
        """Hook for decode-mode state (e.g. H2O's accumulated attention)."""

    def _decode_select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        target = ctx.state.get("target")
        counts = view.counts
        if target is None:  # prefill ran paused: hold the current size
            target = ctx.state["target"] = counts - 1
            if ctx.decode_count is not None:
                ctx.state["held"] = ctx.decode_count - 1
        scores = self.decode_scores(view, ctx)
        held = ctx.state.get("held")
        if ctx.decode_count is not None and held is not None:  # a dense layer: decided on the host, no sync
            full = ctx.decode_count <= held
        else:
            full = bool((counts <= target).all())
        if scores is None or full:
            keep = view.valid
        else:
            # Top-k per (row, head) at decode: the allocation across heads was decided at the prefill.
            kept = torch.minimum(counts, target)
            keep = uniform_select(scores, view, kept, self.protect(view, kept, ctx))
        self.after_decode(scores, view, keep, ctx)
        return keep

    def after_decode(self, scores: torch.Tensor, view: LayerView, keep: torch.Tensor, ctx: CompressionContext) -> None:
        """Hook: re-index per-entry state to the kept entries."""


def check_gqa(gqa: str) -> None:
    """The reduction over a GQA group's query heads (``gqa`` parameter of the scorers that have one)."""
    if gqa not in GQA_REDUCTIONS:
        raise unknown_choice("gqa", gqa, GQA_REDUCTIONS)


def uniform_value(x: torch.Tensor) -> int | None:
    """The value every entry of ``x`` has, read on the host (prefill only), or None when they differ."""
    flat = x.flatten().tolist()
    return flat[0] if flat and all(v == flat[0] for v in flat) else None


def needs_all_queries(comp: Compressor, view: LayerView, ctx: CompressionContext) -> None:
    """Raise when a scorer that needs every prompt query sees only a deferred window of them."""
    if ctx.query.shape[2] != view.valid.shape[-1]:
        raise KVCompressError(
            f"{comp.name} needs every prompt query but got {ctx.query.shape[2]} of {view.valid.shape[-1]} "
            "(composed with a cross-layer compressor); valid: compose it with per-layer methods only"
        )
