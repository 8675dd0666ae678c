"""``merge`` — evict by any scorer, then merge each evicted entry into its most similar kept entry.

D2O: Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large Language
Models" (arXiv 2406.13035); CaM: Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024.

1. The ``scorer`` (any token scorer registered here: snapkv, h2o, tova, knorm, expected_attention, pyramidkv — run
   with its defaults and this method's ``ratio``/``budget``; pass an instance for other settings) chooses the kept set.
2. Each evicted entry e of a (row, KV head) finds its most cosine-similar kept key m (D2O's rule).
3. If ``cos(k_e, k_m) ≥ threshold`` (and > 0) it is merged with weight ``w = cos(k_e, k_m)``:
   ``k_m ← (k_m + Σ w_e k_e) / (1 + Σ w_e)``, and the same for ``v_m`` — D2O's similarity-weighted scatter-mean, applied
   to keys and values alike.

Only the kept set is stored: the memory is that of the scorer alone. Defaults: ``scorer="h2o"`` (D2O's eviction),
``threshold=0.0``. Choices made: D2O's threshold is an EMA of the mean max-similarity updated during decoding (τ ←
0.5τ + 0.5·mean); here it is a fixed ``threshold`` and merging happens once, at prefill. CaM's variant (values only,
spread over the next 32 kept entries with a Bernoulli gate) is not implemented. Similarities are computed for
``chunk`` evicted entries at a time (memory O(chunk · n)). Merged vectors are written into the view's kept entries,
which the cache then stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_positive_int, unknown_choice
from kvcompress.methods.token.scoring import ScoredTokenCompressor
from kvcompress.registry import make_compressor, register

SCORERS = ("expected_attention", "h2o", "knorm", "pyramidkv", "snapkv", "tova")


def merge_evicted(view: LayerView, keep: torch.Tensor, threshold: float, chunk: int = 256) -> None:
    """Merge every evicted valid entry into its most similar kept entry, in place in ``view.keys``/``view.values``."""
    evicted = view.valid & ~keep
    if not bool(evicted.any()):
        return
    keys, values = view.keys.float(), view.values.float()
    unit = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp(min=1e-12)
    b, h, n, _ = keys.shape
    num_k, num_v = torch.zeros_like(keys), torch.zeros_like(values)
    den = torch.zeros(b, h, n, device=keys.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = unit[:, :, start:stop] @ unit.transpose(-1, -2)  # (b, h, c, n)
        sim.masked_fill_(~keep[:, :, None, :], float("-inf"))
        best, target = sim.max(-1)  # (b, h, c); earliest kept entry on ties
        weight = torch.where(evicted[:, :, start:stop] & (best >= threshold) & (best > 0), best, torch.zeros_like(best))
        den.scatter_add_(-1, target, weight)
        num_k.scatter_add_(2, target[..., None].expand(-1, -1, -1, keys.shape[-1]), weight[..., None] * keys[:, :, start:stop])
        num_v.scatter_add_(2, target[..., None].expand(-1, -1, -1, values.shape[-1]), weight[..., None] * values[:, :, start:stop])
    touched = keep & (den > 0)
    scale = (1 + den)[..., None]
    merged_k = ((keys + num_k) / scale).to(view.keys.dtype)
    merged_v = ((values + num_v) / scale).to(view.values.dtype)
    view.keys[touched] = merged_k[touched]
    view.values[touched] = merged_v[touched]


@register
@dataclass
class Merge(Compressor):
    name = "merge"
    summary = "any scorer + similarity-weighted merge of evicted entries"
    paper = "D2O / CaM"
    axis = Axis.TOKEN

    ratio: float = 1.0
    budget: int | None = None
    scorer: Any = "h2o"
    scorer_params: dict[str, Any] | None = None
    threshold: float = 0.0
    chunk: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scorer, str):
            if self.scorer not in SCORERS:
                raise unknown_choice("scorer", self.scorer, SCORERS)
            size = {"budget": self.budget} if self.budget is not None else {"ratio": self.ratio}
            params = {**size, **(self.scorer_params or {})}
            self._inner = make_compressor(self.scorer, **params)
        elif isinstance(self.scorer, ScoredTokenCompressor):
            self._inner = self.scorer
        else:
            raise KVCompressError(f"scorer={self.scorer!r} is invalid; valid: one of {', '.join(SCORERS)} or a scorer instance")
        if self._inner.active("decode"):
            raise KVCompressError("merge runs at prefill only; valid: a scorer with phase='prefill'")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not -1 <= self.threshold <= 1:
            raise KVCompressError(f"threshold={self.threshold!r} is invalid; valid: a cosine similarity in [-1, 1]")
        check_positive_int(self.chunk, "chunk")

    @property
    def adaptive(self) -> bool:
        return self._inner.adaptive

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["scorer"] = self.scorer if isinstance(self.scorer, str) else self.scorer.describe()
        return out

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        keep = self._inner.select(view, ctx)
        merge_evicted(view, keep, self.threshold, self.chunk)
        return keep
