"""``pyramidkv`` — SnapKV scores with a linearly decreasing per-layer budget (a preset of the token budgets).

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv 2406.02069);
official code in KVCache-Factory ``pyramidkv/pyramidkv_utils.py``; kvpress ``PyramidKVPress``.

``pyramidkv`` is :mod:`snapkv` (same ``window``, ``kernel``, ``pooling``, ``gqa`` and defaults: 32, 7, max, mean)
with ``layer_allocation="pyramidkv"``: the uniform SnapKV budget ``C`` (from ``ratio`` or ``budget``) redistributed
over the layers by the official formula (:func:`kvcompress.methods.token.budgets.pyramid_budget`): with
``β = beta``, ``min = (C − w)/β``, ``max = 2(C − w) − min``, layer ``l`` of ``L`` keeps
``round(max − l·(max − min)/(L − 1)) + w``. As in KVCache-Factory, a row with ``C ≤ w`` or ``S < 2(C − w)`` (the
pyramid would exceed the context) falls back to uniform SnapKV, a budget covering the whole row keeps it whole in
every layer, and a layer's budget never exceeds its row's length; the total over layers is ``L·C`` up to rounding,
except where a layer-0 budget is capped at its row's length (the excess is not given back to the other layers).
``beta=20`` (the paper's default).

Where implementations differ: kvpress's ``PyramidKVPress`` builds no pyramid below an average budget of ``β·w`` and
spreads the window into the pyramid; ``layer_allocation="pyramid"`` (any token method, e.g. ``layer_budget``) is the
ratio-form schedule instead. Prefill only. Budgets differ per layer and per row; the cache stores them ragged.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.methods.token.snapkv import SnapKV
from kvcompress.registry import register


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "SnapKV scores, linearly decreasing per-layer budget"
    paper = "PyramidKV (Cai et al. 2024)"
    decode_phase = "never"  # per-layer budgets are a prefill decision (the inherited `phase` must stay "prefill")

    layer_allocation: str = "pyramidkv"
