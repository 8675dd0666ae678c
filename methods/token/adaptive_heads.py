"""``adaptive_heads`` — per-head token budgets from head scores, with a floor (AdaKV / HeadKV style).

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", 2024 (arXiv 2407.11550);
Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and
Reasoning", 2024 (HeadKV, arXiv 2410.19258).

* A layer's token budget is ``kv_heads × B`` per row, ``B = clamp(round(ratio·n), 1, n)`` (or ``budget``) — the
  same total as a uniform token method. Each head first gets a floor of ``max(1, round(floor·B))`` tokens
  (``floor=0.2``, AdaKV's safeguard share), the rest is shared in proportion to the head scores (largest
  remainders, capped at the head's tokens, overflow passed on), so the layer total is exact.
* Head scores: the head-score artifact of the model (``scores="auto"``: found by config hash, see
  ``methods/heads.py``; or a path), primary score with the other one as fallback for a layer where it is all zero;
  without an artifact (a warning says so) or with ``scores="prompt"``, each row's out-of-window attention mass of
  its last prompt queries (per row, so rows stay independent).
* Tokens within a head: SnapKV-style — the attention of the last ``window=32`` prompt queries (summed over the
  head's query group), average-pooled over ``kernel=7`` neighbouring positions (SnapKV's clustering), with the
  first ``sink=4`` tokens and the observation window itself ranked first.
* Storage: heads keep different counts, so layers are stored ragged (the core's packed layout); bytes are real.
* Prefill phase only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_non_negative_int, check_positive_int
from kvcompress.methods.head.heads import out_of_window_mass, prepare_scores, resolve_scores, window_probs
from kvcompress.registry import register
from kvcompress.selection import kept_counts, topk_mask


def allocate(total: int, avail: list[int], weights: list[float], floor: int) -> list[int]:
    """Integer budgets per head summing to ``min(total, sum(avail))``: a floor each, the rest ∝ weights, capped."""
    alloc = [min(floor, a) for a in avail]
    remaining = min(total, sum(avail)) - sum(alloc)
    while remaining > 0:
        open_heads = [i for i, a in enumerate(avail) if alloc[i] < a]
        w = [max(weights[i], 0.0) for i in open_heads]
        if sum(w) <= 0:
            w = [1.0] * len(open_heads)
        s = sum(w)
        share = [remaining * x / s for x in w]
        give = [int(x) for x in share]
        order = sorted(range(len(open_heads)), key=lambda j: (-(share[j] - give[j]), open_heads[j]))
        for j in order[: remaining - sum(give)]:
            give[j] += 1
        moved = 0
        for j, i in enumerate(open_heads):
            g = min(give[j], avail[i] - alloc[i])
            alloc[i] += g
            moved += g
        remaining -= moved
        if moved == 0:
            break
    return alloc


@register
@dataclass
class AdaptiveHeads(Compressor):
    name = "adaptive_heads"
    summary = "per-head budgets from head scores with a floor (ragged)"
    paper = "AdaKV / HeadKV"
    axis = Axis.TOKEN
    #: heads keep different counts (the shared matrix checks the layer total, not a per-head count)
    adaptive: ClassVar[bool] = True

    ratio: float = 1.0
    budget: int | None = None
    floor: float = 0.2
    window: int = 32
    sink: int = 4
    kernel: int = 7
    scores: str = "auto"

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        return prepare_scores(self.scores, model, tokenizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
            raise KVCompressError(f"floor={self.floor!r} is out of range; valid: a fraction in [0, 1]")
        check_positive_int(self.window, "window")
        check_non_negative_int(self.sink, "sink")
        check_positive_int(self.kernel, "kernel")
        if self.kernel % 2 == 0:
            raise KVCompressError(f"kernel={self.kernel} is even; valid: an odd integer >= 1 (centred pooling)")
        if not isinstance(self.scores, str) or not self.scores:
            raise KVCompressError(f"scores={self.scores!r} is invalid; valid: auto, prompt, or a path to a head-score artifact")

    def head_weights(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """``(batch, kv_heads)`` non-negative head weights, on the view's device."""
        b, h = view.valid.shape[:2]
        data = resolve_scores(self, ctx)
        if data is None:
            return out_of_window_mass(view, ctx, self.sink, self.window)
        other = "mass" if data["primary"] == "retrieval" else "retrieval"
        row = data[data["primary"] + "_kv"][ctx.layer_idx]
        if sum(row) <= 0:
            row = data[other + "_kv"][ctx.layer_idx]
        return torch.tensor(row, dtype=torch.float64, device=view.valid.device).unsqueeze(0).expand(b, h)

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        n = view.counts  # (b, h)
        per_head = kept_counts(n, self.ratio, self.budget)
        if bool((per_head >= n).all()):
            return view.valid
        b, h = n.shape
        # The allocation is integer bookkeeping in Python: read counts, budgets and weights back once.
        avail_rows, budget_rows = n.tolist(), per_head.tolist()
        weight_rows = self.head_weights(view, ctx).tolist()
        alloc = []
        for r in range(b):
            avail = avail_rows[r]
            if max(avail) == 0:
                alloc.append([0] * h)
                continue
            base = max(budget_rows[r])
            floor = min(base, max(1, round(self.floor * base)))
            alloc.append(allocate(sum(budget_rows[r]), avail, weight_rows[r], floor))
        counts = torch.tensor(alloc, dtype=n.dtype, device=n.device)
        probs = window_probs(view, ctx, self.window)  # (b, hq, w, n)
        g = probs.shape[1] // h
        token_scores = probs.sum(2).view(b, h, g, -1).sum(2)  # (b, h, n)
        if self.kernel > 1:  # padding and invalid entries score 0, exactly like the pool's own zero padding
            pooled = torch.nn.functional.avg_pool1d(
                token_scores.reshape(b * h, 1, -1), self.kernel, stride=1, padding=self.kernel // 2
            )
            token_scores = pooled.view(b, h, -1)
        rank = view.rank()
        forced = (rank < self.sink) | (rank >= n.unsqueeze(-1) - self.window)
        token_scores = token_scores.masked_fill(forced & view.valid, float("inf"))
        return topk_mask(token_scores, counts, view.valid)
