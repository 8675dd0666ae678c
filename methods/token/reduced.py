"""What a dropped layer (``layers``) or a windowed head (``heads``) keeps: one reduced-context policy for both.

The reduced context has a fixed budget per (row, KV head): ``sink + recent`` tokens (capped at what is there). Which
tokens fill it is the ``reduced`` policy:

* ``"window"`` (default) — the first ``sink`` and the newest ``recent`` tokens (a StreamingLLM cache: SimLayerKV's
  lazy layers, DuoAttention's streaming heads);
* the name of any scored token method (``snapkv``, ``h2o``, ``tova``, ``knorm``, ``expected_attention``, …) — that
  method's scores choose the tokens within the same budget, its sinks and window protected as it defines them
  (SqueezeAttention runs a token method on its less important layers).

The memory is the same whatever the policy; only the choice of tokens changes.
"""

from __future__ import annotations

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError
from kvcompress.registry import available_methods, get_method, make_compressor
from kvcompress.selection import sink_and_recent_mask

WINDOW = "window"


def check_reduced(policy: str) -> str:
    """``policy`` is ``"window"`` or a registered scored token method; returns it."""
    from kvcompress.methods.token.scoring import ScoredTokenCompressor

    if policy == WINDOW:
        return policy
    scored_ok = isinstance(policy, str) and policy in available_methods()
    if not scored_ok or not issubclass(get_method(policy), ScoredTokenCompressor):
        scored = [m for m in available_methods() if issubclass(get_method(m), ScoredTokenCompressor)]
        raise KVCompressError(f"reduced={policy!r} is invalid; valid: window or a scored token method "
                              f"({', '.join(scored)})")
    return policy


def query_window(policy: str) -> int:
    """Prompt queries the policy needs when its layer selects after the whole prefill (cross-layer methods)."""
    return 1 if policy == WINDOW else get_method(policy).query_window


def reduced_mask(view: LayerView, ctx: CompressionContext, policy: str, sink: int,
                 recent: int | torch.Tensor) -> torch.Tensor:
    """The entries each (row, KV head) keeps in its reduced context of ``sink + recent`` tokens (``recent`` an int or
    per (row, head))."""
    n = view.counts
    kept = torch.minimum(n, sink + (recent if isinstance(recent, torch.Tensor) else torch.full_like(n, recent)))
    if policy == WINDOW:
        return sink_and_recent_mask(view, sink, kept)
    scorers = ctx.shared.setdefault("_reduced", {})
    scorer = scorers.get(policy)
    if scorer is None:
        scorer = scorers[policy] = make_compressor(policy)
    return scorer.choose(scorer.score(view, ctx), view, kept)
