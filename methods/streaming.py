"""``streaming`` — attention sinks + recent window (StreamingLLM).

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).

Keeps the first ``sink`` tokens of each row and its most recent ``window`` tokens; the middle is dropped.

Defaults and choices:

* ``sink=4`` (the paper's ablation: four sinks suffice; its perplexity script uses 1).
* ``window`` — if not given, derived from the kept fraction: ``window = kept − sink`` with
  ``kept = clamp(round(ratio·n), 1, n)`` per row (``n`` = the row's real prompt tokens), or ``budget − sink``.
  An explicit ``window`` wins over ``ratio``; a window larger than the context is an error.
* ``phase="prefill"`` compresses once after the prompt and appends decoded tokens (as kvpress does).
  ``phase="decode"`` also evicts during generation, holding every row at exactly ``sink + window`` entries as the
  original StreamingLLM cache does.
* No position re-shift: kept keys keep their original RoPE rotation (the paper's pos-shift variant re-rotates
  pre-RoPE keys to cache positions; not implemented).
* Sinks and window are counted in each row's real tokens (left padding is never kept), per KV head; all heads
  keep the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import (
    Axis,
    CompressionContext,
    Compressor,
    LayerView,
    kept_counts,
    register,
    sink_and_recent_mask,
)
from kvcompress.errors import KVCompressError, check_non_negative_int, unknown_choice


@register
@dataclass
class Streaming(Compressor):
    name = "streaming"
    axis = Axis.TOKEN
    phases = ("prefill", "decode")

    ratio: float = 1.0
    budget: int | None = None
    sink: int = 4
    window: int | None = None
    phase: str = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative_int(self.sink, "sink")
        if self.window is not None:
            check_non_negative_int(self.window, "window")
        if self.phase not in ("prefill", "decode"):
            raise unknown_choice("phase", self.phase, ("prefill", "decode"))

    def active(self, phase: str) -> bool:
        return phase == "prefill" or (phase == "decode" and self.phase == "decode")

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        n = view.counts
        if ctx.phase == "decode":
            kept = ctx.state.get("kept")
            if kept is None:  # the prefill kept everything; hold that size from now on
                kept = ctx.state["kept"] = n - 1
            return sink_and_recent_mask(view, self.sink, torch.minimum(kept, n))
        if self.window is not None:
            longest = int(n.max())
            if self.window > longest:
                raise KVCompressError(
                    f"window={self.window} is larger than the context ({longest} tokens); valid: 0 <= window <= {longest}"
                )
            kept = torch.minimum(n, torch.full_like(n, self.sink + self.window))
        else:
            kept = torch.maximum(kept_counts(n, self.ratio, self.budget), torch.minimum(n, torch.full_like(n, self.sink)))
        if self.phase == "decode":
            ctx.state["kept"] = kept  # the size to hold while generating (counted as cache metadata)
        return sink_and_recent_mask(view, self.sink, kept)
