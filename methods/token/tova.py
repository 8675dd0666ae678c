"""``tova`` — Token Omission Via Attention: one layer-wide index set from the last query's attention.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv 2401.06104); official ``src/tova_cache.py``.

Score of an entry = the **last** query's softmax attention to it, **averaged over all query heads of the layer** (so
GQA needs no separate reduction); one index set is shared by every KV head of the layer. At prefill the last prompt
token's query scores the prompt (the query attends to itself, so the newest token usually survives).

Defaults and choices:

* ``sink=0``, ``window=0`` as in the paper (kvpress's ``TOVAPress`` always keeps the last token: ``window=1``).
* ``phase="prefill"`` compresses once (kvpress). ``phase="decode"`` is the paper's fixed-size cache: each decode
  step scores every entry with the new query and evicts the lowest one, holding every (row, head) at its size after
  the prefill (or ``budget``: a shorter prompt grows to it first). On a dense layer the eviction is in place (the
  newest entry takes the evicted slot: no copy of the layer); a ragged layer is re-stored at each eviction.
* ``allocation="adakv"`` is accepted but degenerate (all heads share the scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.methods.token.scoring import ScoredTokenCompressor, attention_mass
from kvcompress.registry import register


@register
@dataclass
class TOVA(ScoredTokenCompressor):
    name = "tova"
    summary = "last query's head-averaged attention, one set per layer; `phase=decode`"
    paper = "TOVA (Oren et al. 2024)"
    decode_phase = "optional"

    phase: str = "prefill"

    def _last_query_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        dense = ctx.phase == "decode" and ctx.decode_count is not None  # a dense layer: every entry valid, no sync
        probs = attention_mass(ctx.query[:, :, -1:], view.keys, view.valid, ctx.scaling, causal=True,
                               all_valid=True if dense else None)
        return probs.mean(1, keepdim=True).expand(-1, view.valid.shape[1], -1)

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        return self._last_query_scores(view, ctx)

    def decode_scores(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        return self._last_query_scores(view, ctx)
