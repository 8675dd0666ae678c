"""``knorm`` — keep the keys with the lowest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv 2406.11430); kvpress ``KnormPress``.

Score = −‖k‖₂ per (KV head, token), computed on the stored (post-RoPE) keys; each KV head keeps its own set. No query
is needed, so GQA needs no reduction.

Defaults and choices:

* ``sink=0``, ``window=0``: like kvpress and the paper, no protected tokens (KVCache-Factory's ``L2NormCluster``
  also skips layers 0–1, which we do not; compose a layer-axis method for that). Set ``sink``/``window`` to
  protect the first / newest tokens inside the budget.
* ``allocation="uniform"`` (every head keeps the budget); ``"adakv"`` with ``floor=0.2`` shares the layer's total
  across heads by global norm rank.
* Prefill only (the paper's generation-time use is not implemented: ``phase`` is not a parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.methods.token.scoring import ScoredTokenCompressor
from kvcompress.registry import register


@register
@dataclass
class KNorm(ScoredTokenCompressor):
    name = "knorm"
    summary = "lowest key norms"
    paper = "Devoto et al. 2024"

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys.float(), dim=-1)
