"""``layer_budget`` — per-layer kept fractions for any token method (a preset of the token budgets).

PyramidKV: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069. SqueezeAttention: Wang et al., arXiv 2404.04793 (per-layer budgets driving any sequence policy).

Runs the registered token method ``scorer`` (default ``"snapkv"``; any token method: ``random``, ``streaming``,
``knorm``, ``h2o``, …) with ``layer_allocation`` set from ``schedule`` / ``ratios`` (the strategy itself lives in
:mod:`kvcompress.methods.token.budgets`; ``method=knorm method.knorm.layer_allocation=pyramid`` is the same thing),
giving layer ``l`` the kept fraction ``r_l``:

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

from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_ratio, unknown_choice
from kvcompress.methods.token.budgets import TokenCompressor
from kvcompress.registry import get_method, make_compressor, register

SCHEDULES = ("pyramid", "inverse_pyramid", "uniform")


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
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if self.scorer == self.name or not issubclass(get_method(self.scorer), TokenCompressor):
            raise KVCompressError(f"scorer={self.scorer!r} is not a token-axis method with a ratio; valid: a token "
                                  "scorer such as random, streaming")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise KVCompressError(f"beta={self.beta!r} is invalid; valid: a number >= 1")
        if self.ratios is not None:
            if isinstance(self.ratios, (str, bytes)) or not hasattr(self.ratios, "__len__") or len(self.ratios) == 0:
                raise KVCompressError(f"ratios={self.ratios!r} is invalid; valid: a list of kept fractions in (0, 1], "
                                      "one per layer")
            self.ratios = [check_ratio(r, "ratios[]") for r in self.ratios]
        allocation = "list" if self.ratios is not None else self.schedule
        params = {**(self.scorer_params or {}), "ratio": self.ratio, "layer_allocation": allocation,
                  "layer_ratios": self.ratios, "beta": self.beta}
        self._inner = make_compressor(self.scorer, **params)
        self.query_window = self._inner.query_window
        self.cross_layer = self._inner.cross_layer

    @property
    def adaptive(self) -> bool:
        """True when layers keep different fractions (the shared matrix then skips its per-layer count check)."""
        return self.ratios is not None or self.schedule != "uniform"

    # -- everything else is the scorer's, with its per-layer ratios ------------------------------------------------
    def active(self, phase: str) -> bool:
        return self._inner.active(phase)

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        return self._inner.prepare(model, tokenizer)

    def observe(self, view: LayerView, ctx: CompressionContext) -> None:
        self._inner.observe(view, ctx)

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        return self._inner.select(view, ctx)

    def decode_step(self, ctx: CompressionContext) -> bool:
        return self._inner.decode_step(ctx)

    def decode_target(self, ctx: CompressionContext) -> int | None:
        return self._inner.decode_target(ctx)

    def prefill_cost(self, config: Any, n: int) -> dict[str, Any]:
        return self._inner.prefill_cost(config, n)

