"""Fixed-size parts of a compressed cache: what does not grow with the context, so :func:`project` carries it to
the target context as a number of tokens, not as a fraction of a short run.

A run's memory block says which parts are fixed-size in ``memory["fixed_size"]`` (written by
:func:`kvcompress.results.memory_block` from the cache's compressors through :func:`describe`)::

    {"windows":  [{"method": "heads", "sink": 4, "recent": 32}, ...],          # per-slot sink + recent windows
     "budget":   {"method": "snapkv", "tokens": 128},                          # every slot capped at a token count
     "residual": {"method": "quant", "tokens": 128, "chunk": 32}}              # full-precision tail of a codec

* ``windows`` — the head / layer methods' reduced slots (``heads``, ``heads_random``: the windowed KV heads keep
  ``sink + recent``; ``layers``: the dropped layers keep ``sink + window`` with ``window=None`` meaning
  ``min(1024, n // 8)`` at context n, SimLayerKV's rule in ``methods/layer/layers.py``; ``streaming`` with an
  explicit ``window``: ``sink + window``). At context n a window holds ``w(n) = min(n, sink + recent(n))``
  tokens. The report is taken after generation: δ tokens decoded after the prefill were appended to every slot
  (:meth:`FixedParts.decoded_tokens` reads δ off the smallest reduced slot). A (layer, KV head) slot holding at
  most ``w(n_s − δ) + δ`` is a windowed slot; at the target context it holds ``(kept − δ) · w(n_t) / w(n_s − δ)
  + δ`` tokens (a token method composed after the window scales it the same way); every other slot keeps its
  fraction ``kept / cap`` of the target's capacity.
* ``budget`` — a token method given ``budget=B`` keeps B tokens per KV head whatever the context: every slot is
  scaled by ``min(B, cap_t) / min(B, cap_s)``.
* ``residual`` — a hidden-axis codec keeps the newest ``tokens`` R of every slot in the cache's dtype and encodes
  older ones in whole chunks of G: a slot of K tokens holds ``P(K) = K − G·⌊max(0, K − R)/G⌋`` plain tokens (between
  R and R + G − 1 once K > R). The encoded part's bits per element are separated from the run's effective bits
  with P(K); at the target a slot of K_t tokens holds ``min(K_t, R)`` plain tokens (the flush remainder, under G
  tokens, is left out) and the rest at the encoded bits.

Rows written before this key (no ``fixed_size``) are projected with fractions only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: SimLayerKV's recent window and its cap for short contexts (``methods/layer/layers.py``: min(1024, n // 8)).
LAYERS_WINDOW_CAP, LAYERS_WINDOW_DIVISOR = 1024, 8


@dataclass(frozen=True)
class Window:
    """A per-slot window of ``sink + recent`` tokens; ``recent=None``: ``min(cap, n // divisor)`` at context n."""

    method: str
    sink: int
    recent: int | None
    cap: int = LAYERS_WINDOW_CAP
    divisor: int = LAYERS_WINDOW_DIVISOR

    def tokens(self, context: float) -> float:
        """w(n) = min(n, sink + recent(n))."""
        recent = self.recent if self.recent is not None else min(self.cap, int(context) // self.divisor)
        return float(min(context, self.sink + recent))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "sink": self.sink, "recent": self.recent}
        if self.recent is None:
            out.update(cap=self.cap, divisor=self.divisor)
        return out


@dataclass(frozen=True)
class FixedParts:
    """The fixed-size parts of a cache (module docstring). Empty = every part is a fraction of the context."""

    windows: tuple[Window, ...] = ()
    budget: int | None = None
    budget_method: str = ""
    residual: int | None = None
    chunk: int = 1
    residual_method: str = ""

    @property
    def empty(self) -> bool:
        return not self.windows and self.budget is None and not self.residual

    def decoded_tokens(self, kept_tokens: list[list[float]], capacity: list[float], context: float) -> float:
        """δ: tokens decoded after the prefill and appended to every slot before the report was taken (a run's
        memory block is read after generation). The smallest reduced slot (one holding less than its layer's
        capacity) holds w(n − δ) + δ for a window w; δ is the one that fits (0 when none does, or no window)."""
        if not self.windows:
            return 0.0
        reduced = [k for row, c in zip(kept_tokens, capacity) for k in row if k < c - 0.5]
        if not reduced:
            return 0.0
        low = min(reduced)
        for w in sorted(self.windows, key=lambda w: w.tokens(context)):
            for d in range(0, int(min(low, context)) + 1):
                if abs(w.tokens(context - d) + d - low) < 0.5:
                    return float(d)
        return 0.0

    def slot_tokens(self, kept: float, cap_s: float, context_s: float, cap_t: float, context_t: float,
                    decoded: float = 0.0) -> float:
        """Tokens a source slot holding ``kept`` of ``cap_s`` would hold at the target (before the target's cap).

        ``decoded`` (δ, :meth:`decoded_tokens`): tokens appended to every slot after the prefill at the run. A
        windowed slot holds at most w(n_s − δ) + δ and becomes (kept − δ)·w(n_t)/w(n_s − δ) + δ; with a budget B,
        kept·min(B, cap_t)/min(B, cap_s); any other slot keeps its fraction: kept/cap_s·cap_t."""
        if cap_s <= 0:
            return 0.0
        if self.budget is not None:
            src, tgt = min(self.budget, cap_s), min(self.budget, cap_t)
            return kept * tgt / src if src else 0.0
        prompt = context_s - decoded
        for w in sorted(self.windows, key=lambda w: w.tokens(prompt)):
            w_s = min(w.tokens(prompt), cap_s - decoded)
            if w_s > 0 and kept <= (w_s + decoded) * (1 + 1e-9) and w_s + decoded < cap_s - 0.5:
                return max(0.0, kept - decoded) * min(w.tokens(context_t), cap_t) / w_s + decoded
        return kept / cap_s * cap_t

    def plain_tokens(self, kept: float) -> float:
        """P(K): tokens of a slot held unencoded at the run (its residual tail)."""
        if self.residual is None:
            return kept
        r, g = float(self.residual or 0), float(max(1, self.chunk))
        return kept - g * math.floor(max(0.0, kept - r) / g + 1e-9)

    def target_plain_tokens(self, kept: float) -> float:
        """min(K_t, R): tokens of a target slot held unencoded."""
        if self.residual is None:
            return kept
        return min(kept, float(self.residual))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"windows": [w.to_dict() for w in self.windows]}
        out["budget"] = {"method": self.budget_method, "tokens": self.budget} if self.budget is not None else None
        out["residual"] = ({"method": self.residual_method, "tokens": self.residual, "chunk": self.chunk}
                           if self.residual is not None else None)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FixedParts:
        """From a memory block's ``fixed_size`` entry (None or {} = none)."""
        if not data:
            return cls()
        windows = tuple(Window(str(w.get("method", "")), int(w.get("sink", 0)),
                               None if w.get("recent") is None else int(w["recent"]),
                               int(w.get("cap", LAYERS_WINDOW_CAP)), int(w.get("divisor", LAYERS_WINDOW_DIVISOR)))
                        for w in data.get("windows") or ())
        budget, residual = data.get("budget") or {}, data.get("residual") or {}
        return cls(windows, int(budget["tokens"]) if budget else None, str(budget.get("method", "")),
                   int(residual["tokens"]) if residual else None, int(residual.get("chunk", 1)) if residual else 1,
                   str(residual.get("method", "")))


def describe(compressors: Iterable[Any]) -> FixedParts:
    """The fixed-size parts of a pipeline of compressors (instances of :class:`kvcompress.compressor.Compressor`),
    read from their axis and fields (module docstring): head/layer methods with ``sink`` and ``recent`` /
    ``window`` fields, a token method's ``budget`` (or ``streaming``'s explicit ``window``), a hidden-axis codec's
    ``residual_tokens()`` / ``chunk_tokens()``."""
    windows: list[Window] = []
    budget: int | None = None
    budget_method = residual_method = ""
    residual: int | None = None
    chunk = 1
    for comp in compressors:
        axis = str(getattr(getattr(comp, "axis", None), "value", getattr(comp, "axis", "")))
        fields = {f.name for f in dataclasses.fields(comp)} if dataclasses.is_dataclass(comp) else set()
        name = str(getattr(comp, "name", type(comp).__name__))
        if axis == "head" and {"sink", "recent"} <= fields and float(getattr(comp, "ratio", 1.0)) < 1.0:
            windows.append(Window(name, int(comp.sink), int(comp.recent)))
        elif axis == "layer" and {"sink", "window"} <= fields and float(getattr(comp, "ratio", 1.0)) < 1.0:
            windows.append(Window(name, int(comp.sink), None if comp.window is None else int(comp.window)))
        elif axis == "token":
            if getattr(comp, "budget", None) is not None:
                budget, budget_method = int(comp.budget), name
            elif name == "streaming" and getattr(comp, "window", None) is not None:
                windows.append(Window(name, int(comp.sink), int(comp.window)))
        elif axis == "hidden" and hasattr(comp, "residual_tokens"):
            residual, chunk, residual_method = int(comp.residual_tokens()), int(comp.chunk_tokens()), name
    return FixedParts(tuple(windows), budget, budget_method, residual, chunk, residual_method)


__all__ = ["FixedParts", "Window", "describe"]
