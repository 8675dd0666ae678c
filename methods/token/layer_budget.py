"""``layer_budget`` — per-layer kept fractions for any token scorer (PyramidKV / SqueezeAttention-style allocations).

PyramidKV: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069. SqueezeAttention: Wang et al., arXiv 2404.04793 (per-layer budgets driving any sequence policy).

Wraps the registered token-axis method ``scorer`` (default ``"snapkv"``, so the defaults are PyramidKV; any token
method with a ratio: ``random``, ``streaming``, ``knorm``, ``h2o``, …), giving layer ``l`` the kept fraction ``r_l``:

* ``schedule="pyramid"`` (default) — PyramidKV's linear schedule in ratio form: weights fall linearly from
  ``2 − 1/beta`` (layer 0) to ``1/beta`` (last layer), ``beta=20`` as in PyramidKV; mean weight 1.
* ``"inverse_pyramid"`` — the same, reversed (more budget in later layers).
* ``"uniform"`` — every layer keeps ``ratio``.
* ``ratios=[r_0, …, r_{L−1}]`` — an explicit list (one kept fraction in (0, 1] per layer) overrides ``schedule``;
  it is used as given and ``ratio`` is then not used (the effective mean is recorded).

Schedules are scaled to ``r_l = min(1, c · w_l)`` with ``c`` chosen so that the mean of ``r_l`` equals ``ratio``
(c = ratio when no layer saturates — PyramidKV's formula exactly, without its observation window term; when the
pyramid top would exceed 1, the excess is redistributed to the other layers). Each layer then keeps
``clamp(round(r_l · n), 1, n)`` tokens per (row, KV head) as chosen by the scorer; ``scorer_params`` are passed to
the scorer. Recorded in ``cache.shared["layer_budget"]``: ``layer_ratios`` (the r_l used) and
``prefill_saving = "memory-only"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_ratio, unknown_choice
from kvcompress.registry import get_method, make_compressor, register

SCHEDULES = ("pyramid", "inverse_pyramid", "uniform")


def schedule_ratios(schedule: str, ratio: float, num_layers: int, beta: float = 20.0) -> list[float]:
    """Per-layer kept fractions with mean ``ratio`` (each in (0, 1])."""
    L = num_layers
    if schedule == "uniform" or L == 1:
        return [ratio] * L
    top, bottom = 2.0 - 1.0 / beta, 1.0 / beta
    weights = [top - l * (top - bottom) / (L - 1) for l in range(L)]
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


@register
@dataclass
class LayerBudget(Compressor):
    name = "layer_budget"
    summary = "per-layer ratios (pyramid, inverse, uniform, list) for any token scorer"
    paper = "PyramidKV, SqueezeAttention"
    axis = Axis.TOKEN

    ratio: float = 1.0
    scorer: str = "snapkv"
    schedule: str = "pyramid"
    ratios: list[float] | None = None
    beta: float = 20.0
    scorer_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer == self.name:
            raise KVCompressError("scorer='layer_budget' is invalid; valid: a registered token-axis method")
        cls = get_method(self.scorer)
        if cls.axis is not Axis.TOKEN or "ratio" not in {f.name for f in dataclasses.fields(cls)}:
            raise KVCompressError(f"scorer={self.scorer!r} is not a token-axis method with a ratio; valid: a token scorer such as random, streaming")
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise KVCompressError(f"beta={self.beta!r} is invalid; valid: a number >= 1")
        if self.ratios is not None:
            if isinstance(self.ratios, (str, bytes)) or not hasattr(self.ratios, "__len__") or len(self.ratios) == 0:
                raise KVCompressError(f"ratios={self.ratios!r} is invalid; valid: a list of kept fractions in (0, 1], one per layer")
            self.ratios = [check_ratio(r, "ratios[]") for r in self.ratios]
        self._inner = make_compressor(self.scorer, **dict(self.scorer_params or {}))
        self.query_window = self._inner.query_window
        self.cross_layer = self._inner.cross_layer
        self._per_layer: dict[int, Compressor] = {}

    @property
    def adaptive(self) -> bool:
        """True when layers keep different fractions (the shared matrix then skips its per-layer count check)."""
        return self.ratios is not None or self.schedule != "uniform"

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def layer_ratios(self, num_layers: int) -> list[float]:
        if self.ratios is not None:
            if len(self.ratios) != num_layers:
                raise KVCompressError(f"ratios has {len(self.ratios)} entries; valid: one per layer ({num_layers})")
            return list(self.ratios)
        return schedule_ratios(self.schedule, self.ratio, num_layers, self.beta)

    def _scorer_for(self, ctx: CompressionContext) -> Compressor:
        inner = self._per_layer.get(ctx.layer_idx)
        if inner is None:
            ratios = self.layer_ratios(ctx.num_layers)
            ctx.shared["layer_ratios"] = ratios
            ctx.shared["prefill_saving"] = "memory-only"
            inner = self._per_layer[ctx.layer_idx] = dataclasses.replace(self._inner, ratio=ratios[ctx.layer_idx])
        return inner

    def active(self, phase: str) -> bool:
        return self._inner.active(phase)

    def observe(self, view: LayerView, ctx: CompressionContext) -> None:
        self._scorer_for(ctx).observe(view, ctx)

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        return self._scorer_for(ctx).select(view, ctx)
