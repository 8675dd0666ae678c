"""``pyramidkv`` — SnapKV scores with a linearly decreasing per-layer budget (a preset of the token budgets).

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv 2406.02069);
official code in KVCache-Factory ``pyramidkv/pyramidkv_utils.py``; kvpress ``PyramidKVPress``.

``pyramidkv`` is :mod:`snapkv` (same ``window``, ``kernel``, ``pooling``, ``gqa`` and defaults: 32, 7, max, mean)
with ``layer_allocation="pyramidkv"``: the uniform SnapKV budget ``C`` (from ``ratio`` or ``budget``) redistributed
over the layers by the official formula (:func:`kvcompress.methods.token.budgets.pyramid_budget`): with
``β = beta``, ``min = (C − w)/β``, ``max = 2(C − w) − min``, layer ``l`` of ``L`` keeps
``round(max − l·(max − min)/(L − 1)) + w``. As in KVCache-Factory, where ``max`` exceeds what a row holds beyond the
window (``S − w``), ``max = S − w`` and ``min = 2(C − w) − max``: the excess goes to the other layers, so the layers
total ``L·C`` up to rounding; a row with ``C ≤ w`` or ``S < 2(C − w)`` falls back to uniform SnapKV, a budget
covering the whole row keeps it whole in every layer, and a layer's budget never exceeds its row's length.
``beta=20`` (the paper's default). Prefill only. Budgets differ per layer and per row; the cache stores them ragged.

How it differs from the references (same scores and sets otherwise):

* **Official code** (KVCache-Factory ``PyramidKVCluster``): ``min = (C − w) // β`` and the per-layer step
  ``(max − min) // (L − 1)`` are integer floor divisions without rounding, so its layer ``l`` keeps up to ``l``
  tokens more than ours (``C=100, w=8, S=185, L=4``: 185/129/73/17, total 404; ours 185/128/72/15 = 400 = L·C). Its
  runner's defaults are ``window_size=8`` (LongBench scripts) or 32 and ``kernel_size=7``, ``pooling=maxpool`` with
  an absolute ``max_capacity_prompt`` (``budget=`` here); it selects per query head after ``repeat_kv``, ours per KV
  head (``gqa="mean"``). SnapKV's own ±1-token rounding does not arise with an absolute budget.
* **kvpress** ``PyramidKVPress``: the budget comes from a compression ratio and the window is **spread into the
  pyramid** — its average is ``S·(1 − compression_ratio)`` *including* the window (``C − w`` there is ``S·ratio``,
  the window tokens compete inside each layer's count, kept by SnapKV's maximal padding score); it builds **no
  pyramid below an average budget of β·w** (unless ``S ≥ max ≥ min ≥ w`` it falls back to the uniform
  ``round(S·ratio)``); the same ``max``/``min`` correction where ``max ≥ S − w``; its SnapKV defaults are
  ``window_size=64, kernel_size=5``, average pooling of the *mean* over window queries (ranks like our sum), GQA mean.
  ``window=64 kernel=5 pooling=avg`` gets its scores; its per-layer counts differ by the window's placement.
* ``layer_allocation="pyramid"`` (any token method, e.g. ``layer_budget``) is the ratio-form schedule instead.
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
