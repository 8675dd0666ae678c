"""How many tokens each (layer, row, KV head) keeps: one allocation strategy for every token method.

A token method's budget is ``ratio`` (fraction kept) or ``budget`` (tokens kept per KV head), spread two ways:

* **across layers** (``layer_allocation``, on every :class:`TokenCompressor`):

  - ``"uniform"`` — every layer keeps ``clamp(round(ratio·n), 1, n)`` (or ``min(budget, n)``);
  - ``"pyramid"`` / ``"inverse_pyramid"`` — PyramidKV's linear schedule in ratio form (SqueezeAttention-style
    per-layer ratios for any method): weights fall linearly from ``2 − 1/beta`` (layer 0) to ``1/beta`` (last
    layer), scaled so that the mean kept fraction is ``ratio`` (:func:`schedule_ratios`; the excess of a layer
    that would keep more than everything goes to the others); reversed for ``inverse_pyramid``;
  - ``"list"`` — ``layer_ratios=[r_0, …, r_{L−1}]``, used as given;
  - ``"pyramidkv"`` — PyramidKV's official count formula (KVCache-Factory): from the uniform budget ``C``,
    ``min = (C − w)/β``, ``max = 2(C − w) − min``, layer ``l`` keeps ``round(max − l·(max − min)/(L − 1)) + w``
    (``w`` the method's protected window); where ``max`` exceeds what a row holds beyond the window, ``max = S − w``
    and ``min = 2(C − w) − max``, so the excess goes to the other layers and the layers still total ``L·C`` (up to
    rounding); ``C`` where the pyramid does not apply (:func:`pyramid_budget`). ``beta=20`` throughout.

* **across the KV heads of a row** (``allocation``, on every :class:`~kvcompress.methods.token.scoring.ScoredTokenCompressor`):

  - ``"uniform"`` — every head keeps the layer budget;
  - ``"adakv"`` — the row keeps the same total, chosen by the global top scores over the layer's heads after each
    head's protected entries and its own top ``floor·budget`` (AdaKV's safeguard; :func:`adakv_select`);
  - ``"scores"`` — head budgets in proportion to head scores (the retrieval-head artifact or each row's
    out-of-window attention mass), each head first getting ``max(1, round(floor·B))``; largest remainders, capped
    at the head's tokens, so the layer total is exact (HeadKV-style; :func:`allocate`).

``pyramidkv`` (SnapKV with ``layer_allocation="pyramidkv"``), ``layer_budget`` (any token method with a per-layer
schedule) and ``adaptive_heads`` (``allocation="scores"``) are presets of this strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_ratio, unknown_choice
from kvcompress.selection import kept_counts, topk_mask

LAYER_ALLOCATIONS = ("uniform", "pyramid", "inverse_pyramid", "list", "pyramidkv")
HEAD_ALLOCATIONS = ("uniform", "adakv", "scores")


def schedule_ratios(schedule: str, ratio: float, num_layers: int, beta: float = 20.0) -> list[float]:
    """Per-layer kept fractions with mean ``ratio`` (each in (0, 1]) for a ``pyramid`` / ``inverse_pyramid`` /
    ``uniform`` schedule."""
    L = num_layers
    if schedule == "uniform" or L == 1:
        return [ratio] * L
    top, bottom = 2.0 - 1.0 / beta, 1.0 / beta
    weights = [top - layer * (top - bottom) / (L - 1) for layer in range(L)]
    if schedule == "inverse_pyramid":
        weights = weights[::-1]
    target = ratio * L
    lo, hi = 0.0, 1.0 / min(weights)  # at hi every layer saturates at 1 (mean 1 >= ratio)
    for _ in range(200):  # bisection on the scale c: mean(min(1, c·w)) is continuous and increasing
        mid = (lo + hi) / 2
        if sum(min(1.0, mid * w) for w in weights) < target:
            lo = mid
        else:
            hi = mid
    return [min(1.0, hi * w) for w in weights]


def pyramid_budget(c: torch.Tensor, n: torch.Tensor, window: int, beta: float, layer: int, layers: int) -> torch.Tensor:
    """PyramidKV's budget of layer ``layer`` (of ``layers``) for uniform budgets ``c`` and row lengths ``n`` (same
    shape), window ``w = window``.

    With ``span = c − w``: ``low = span/β``, ``high = 2·span − low``; where ``high`` exceeds what the row holds
    beyond the window (``n − w``), ``high = n − w`` and ``low = 2·span − high`` — the top layers' excess goes to the
    lower ones (KVCache-Factory's ``max_num``/``min_num`` correction) — so the budgets average ``c`` and total
    ``L·c`` up to rounding. Layer ``l`` keeps ``round(high − l·(high − low)/(L − 1)) + w``, never more than ``n``.
    ``c`` itself (uniform SnapKV) where the pyramid does not apply, as in the official code: ``c ≤ w``,
    ``n < 2·span``, or ``c ≥ n`` (the row is kept whole).

    The official code computes ``low = span // β`` and the step ``(high − low) // (L − 1)`` in integers and adds no
    rounding, so its layer ``l`` keeps up to ``l`` tokens more than ours (its total exceeds ``L·c`` by up to
    ``L(L − 1)/2``; e.g. ``c=100, w=8, n=185, L=4``: 185/129/73/17 = 404 there, 185/128/72/15 = 400 here)."""
    if layers <= 1:
        return c
    span = (c - window).double()
    low = span / beta
    high = 2 * span - low
    room = (n - window).double()
    over = high > room  # the top of the pyramid does not fit the row: give the excess to the other layers
    high = torch.where(over, room, high)
    low = torch.where(over, 2 * span - high, low)
    pyramid = torch.round(high - layer * (high - low) / (layers - 1)).long() + window
    uniform = (span <= 0) | (n < 2 * span) | (c >= n)
    return torch.where(uniform, c, torch.minimum(pyramid.clamp(min=1), n))


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


def head_score_budgets(per_head: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, floor: float) -> torch.Tensor:
    """``allocation="scores"``: per row, the layer total ``Σ_h per_head`` spread over the heads by :func:`allocate`
    (floor ``max(1, round(floor·B))`` with ``B`` the row's uniform budget). Integer bookkeeping on the host: counts,
    budgets and weights are read back once (a prefill-time sync)."""
    b, h = counts.shape
    avail_rows, budget_rows, weight_rows = counts.tolist(), per_head.tolist(), weights.tolist()
    alloc = []
    for r in range(b):
        if max(avail_rows[r]) == 0:
            alloc.append([0] * h)
            continue
        base = max(budget_rows[r])
        row_floor = min(base, max(1, round(floor * base)))
        alloc.append(allocate(sum(budget_rows[r]), avail_rows[r], weight_rows[r], row_floor))
    return torch.tensor(alloc, dtype=counts.dtype, device=counts.device)


def adakv_select(
    scores: torch.Tensor, view: LayerView, kept: torch.Tensor, protect: torch.Tensor, floor: float
) -> torch.Tensor:
    """``allocation="adakv"``: each row keeps ``Σ_h kept[b, h]`` entries over its KV heads, chosen by the global top
    scores of the layer, after each head's protected entries and its own top ``⌊floor·kept⌋`` (the safeguard)."""
    b, h, n = scores.shape
    safe = torch.floor(kept.double() * floor).long()
    rest = (safe - protect.sum(-1)).clamp(min=0)
    guaranteed = protect | topk_mask(scores, rest, view.valid & ~protect)
    s = scores.float().masked_fill(guaranteed, float("inf"))
    total = kept.sum(-1, keepdim=True)  # (b, 1)
    chosen = topk_mask(s.reshape(b, 1, h * n), total, view.valid.reshape(b, 1, h * n))
    return chosen.view(b, h, n)


@dataclass
class TokenCompressor(Compressor):
    """Base of the token methods: ``ratio`` or ``budget``, spread across layers by ``layer_allocation`` (see the
    module docstring); :meth:`budgets` gives a layer's kept count per (row, KV head)."""

    axis: ClassVar[Axis | None] = Axis.TOKEN

    ratio: float = 1.0
    budget: int | None = None
    layer_allocation: str = "uniform"
    layer_ratios: list[float] | None = None
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_allocation not in LAYER_ALLOCATIONS:
            raise unknown_choice("layer_allocation", self.layer_allocation, LAYER_ALLOCATIONS)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            raise KVCompressError(f"beta={self.beta!r} is invalid; valid: a number >= 1")
        if self.layer_allocation == "list":
            ratios = self.layer_ratios
            if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__len__") or len(ratios) == 0:
                raise KVCompressError(f"layer_ratios={ratios!r} is invalid; valid: a list of kept fractions in (0, 1], "
                                      "one per layer")
            self.layer_ratios = [check_ratio(r, "layer_ratios[]") for r in ratios]
        elif self.layer_ratios is not None:
            raise KVCompressError(f"layer_ratios is given with layer_allocation={self.layer_allocation!r}; valid: "
                                  "layer_allocation=list")
        if self.layer_allocation in ("pyramid", "inverse_pyramid", "list") and self.budget is not None:
            raise KVCompressError(f"layer_allocation={self.layer_allocation!r} spreads a ratio over the layers; "
                                  "valid: ratio=, not budget=")

    @property
    def adaptive(self) -> bool:
        return self.layer_allocation != "uniform"

    def protected_window(self) -> int:
        """The newest tokens the method always keeps (``w`` of the ``pyramidkv`` formula)."""
        return 0

    def layer_ratio(self, ctx: CompressionContext) -> float:
        """The kept fraction of layer ``ctx.layer_idx`` (recorded once in ``ctx.shared["layer_ratios"]``)."""
        if self.layer_allocation in ("uniform", "pyramidkv"):
            return self.ratio
        ratios = ctx.shared.get("layer_ratios")
        if ratios is None:
            if self.layer_allocation == "list":
                if len(self.layer_ratios) != ctx.num_layers:
                    raise KVCompressError(f"layer_ratios has {len(self.layer_ratios)} entries; valid: one per layer "
                                          f"({ctx.num_layers})")
                ratios = list(self.layer_ratios)
            else:
                ratios = schedule_ratios(self.layer_allocation, self.ratio, ctx.num_layers, self.beta)
            ctx.shared["layer_ratios"] = ratios
            ctx.shared["prefill_saving"] = "memory-only"
        return ratios[ctx.layer_idx]

    def budgets(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """Entries each (row, KV head) of this layer keeps at the prefill (before any per-head allocation)."""
        n = view.counts
        if self.layer_allocation == "pyramidkv":
            c = kept_counts(n, self.ratio, self.budget)
            return pyramid_budget(c, n, self.protected_window(), self.beta, ctx.layer_idx, ctx.num_layers)
        return kept_counts(n, self.layer_ratio(ctx), self.budget)
