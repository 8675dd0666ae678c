"""``streaming`` — attention sinks + recent window (StreamingLLM).

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).

Keeps the first ``sink`` tokens of each row and its most recent ``window`` tokens; the middle is dropped.

Defaults and choices:

* ``sink=4`` (the paper's ablation: four sinks suffice; its perplexity script uses 1).
* ``window`` — if not given, derived from the kept fraction: ``window = kept − sink`` with
  ``kept = clamp(round(ratio·n), 1, n)`` per row (``n`` = the row's real prompt tokens), or ``budget − sink``
  (``ratio`` or ``budget``, not both). An explicit ``window`` wins over ``ratio``.
* A window larger than a row's context is an error, checked for **every row** of a batch (a row's context is the
  most entries any of its KV heads holds in the layer): a prompt that fails alone also fails inside a batch, and a
  batch that passes keeps for each row exactly what that row keeps alone.
* ``phase="prefill"`` compresses once after the prompt and appends decoded tokens (as kvpress does).
  ``phase="decode"`` also evicts during generation, as the original StreamingLLM cache does: every row is held at
  ``sink + window`` entries (with ``window``), at ``budget`` (with ``budget``; a shorter prompt grows to it first), or
  at its prefill size (with ``ratio``).
* No position re-shift: kept keys keep their original RoPE rotation (the paper's pos-shift variant re-rotates
  pre-RoPE keys to cache positions; not implemented).
* Sinks and window are counted in each row's real tokens (left padding is never kept), per KV head; all heads
  keep the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_non_negative_int
from kvcompress.methods.token.budgets import TokenCompressor
from kvcompress.methods.token.scoring import uniform_value
from kvcompress.registry import register
from kvcompress.selection import sink_and_recent_mask


@register
@dataclass
class Streaming(TokenCompressor):
    name = "streaming"
    summary = "`sink` first tokens + recent window; `phase=decode` holds that size while generating"
    paper = "StreamingLLM (Xiao et al. 2024)"
    decode_phase = "optional"

    sink: int = 4
    window: int | None = None
    phase: str = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative_int(self.sink, "sink")
        if self.window is not None:
            check_non_negative_int(self.window, "window")

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        n = view.counts
        if ctx.phase == "decode":
            kept = ctx.state.get("kept")
            if kept is None:  # the prefill kept everything; hold that size from now on
                kept = ctx.state["kept"] = n - 1
                if ctx.decode_count is not None:
                    ctx.state["held"] = ctx.decode_count - 1
            return sink_and_recent_mask(view, self.sink, torch.minimum(kept, n))
        if self.window is not None:
            self.check_window(n)
            kept = torch.minimum(n, torch.full_like(n, self.sink + self.window))
        else:
            kept = torch.maximum(self.budgets(view, ctx), torch.minimum(n, torch.full_like(n, self.sink)))
        if self.phase == "decode":
            # the size to hold while generating (counted as cache metadata): fixed, or the prefill size with a ratio
            fixed = self.sink + self.window if self.window is not None else self.budget
            ctx.state["kept"] = kept if fixed is None else torch.full_like(kept, max(fixed, self.sink))
            ctx.state["held"] = uniform_value(ctx.state["kept"])  # host int when every (row, head) holds the same
        return sink_and_recent_mask(view, self.sink, kept)

    def decode_target(self, ctx: CompressionContext) -> int | None:
        return ctx.state.get("held")

    def check_window(self, counts: torch.Tensor) -> None:
        """Reject a window larger than any row's context (``counts``: entries per (row, KV head))."""
        context = counts.amax(1)  # per row
        short = (context < self.window).nonzero().flatten().tolist()
        if short:
            row = short[0]
            raise KVCompressError(
                f"window={self.window} is larger than the context of batch row {row} ({int(context[row])} tokens); "
                f"valid: 0 <= window <= {int(context.min())} (the shortest row's context)"
            )
