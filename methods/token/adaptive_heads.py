"""``adaptive_heads`` — per-head token budgets from head scores, with a floor (a preset of the token budgets).

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", 2024 (arXiv 2407.11550);
Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and
Reasoning", 2024 (HeadKV, arXiv 2410.19258).

* ``allocation="scores"`` of :mod:`kvcompress.methods.token.budgets`: a layer's token budget is ``kv_heads × B``
  per row, ``B = clamp(round(ratio·n), 1, n)`` (or ``budget``) — the same total as a uniform token method. Each head
  first gets a floor of ``max(1, round(floor·B))`` tokens (``floor=0.2``, AdaKV's safeguard share), the rest is
  shared in proportion to the head scores (largest remainders, capped at the head's tokens, overflow passed on), so
  the layer total is exact. Any scorer takes the same allocation (``method.snapkv.allocation=scores``).
* Head scores: the head-score artifact of the model (``scores="auto"``: found by config hash, see
  ``methods/head/heads.py``; or a path), primary score with the other one as fallback for a layer where it is all zero;
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

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_positive_int
from kvcompress.methods.head.heads import window_probs
from kvcompress.methods.token.scoring import ScoredTokenCompressor
from kvcompress.registry import register
from kvcompress.selection import topk_mask


@register
@dataclass
class AdaptiveHeads(ScoredTokenCompressor):
    name = "adaptive_heads"
    summary = "per-head budgets from head scores with a floor (ragged)"
    paper = "AdaKV / HeadKV"

    sink: int = 4
    window: int = 32
    allocation: str = "scores"
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.window, "window")
        check_positive_int(self.kernel, "kernel")
        if self.kernel % 2 == 0:
            raise KVCompressError(f"kernel={self.kernel} is even; valid: an odd integer >= 1 (centred pooling)")

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """The last ``window`` prompt queries' attention summed over each head's query group, average-pooled over
        ``kernel`` positions (padding and invalid entries score 0, like the pool's own zero padding); the first
        ``sink`` tokens and the observation window score +inf (always first)."""
        b, h, _ = view.valid.shape
        probs = window_probs(view, ctx, self.window)  # (b, hq, w, n)
        g = probs.shape[1] // h
        scores = probs.sum(2).view(b, h, g, -1).sum(2)  # (b, h, n)
        if self.kernel > 1:
            pooled = torch.nn.functional.avg_pool1d(scores.reshape(b * h, 1, -1), self.kernel, stride=1,
                                                    padding=self.kernel // 2)
            scores = pooled.view(b, h, -1)
        rank = view.rank()
        forced = (rank < self.sink) | (rank >= view.counts.unsqueeze(-1) - self.window)
        return scores.masked_fill(forced & view.valid, float("inf"))

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """Each head keeps its budget's top scores (the forced entries first, earliest first among them)."""
        counts = self.budgets(view, ctx)
        if bool((counts >= view.counts).all()):
            return view.valid
        return topk_mask(self.score(view, ctx), counts, view.valid)
