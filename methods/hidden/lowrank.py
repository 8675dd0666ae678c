"""``lowrank`` — keys and values stored as coefficients on calibrated per-(layer, KV head) principal directions.

In the family of Palu (Chang et al., "Palu: Compressing KV-Cache with Low-Rank Projection", ICLR 2025,
arXiv 2407.21118) and Loki (Singhania et al., "Loki: Low-rank Keys for Efficient Sparse Attention", NeurIPS 2024,
arXiv 2406.02542), which both find KV vectors concentrated in a low-dimensional subspace; this is the plain
post-hoc projection, not Palu's weight decomposition.

* Bases: for every layer and KV head, the top-``r`` eigenvectors of the uncentered second moment of the model's own
  keys (values) on calibration text — see :mod:`kvcompress.methods.hidden.calibration` (built-in corpus by default, ``calibration=`` a
  string or a ``.txt`` path for user text; a safetensors artifact keyed by the model's config hash and weights
  fingerprint, validated on load). The bases are model-side data: their bytes go to
  ``cache.shared["lowrank"]["basis_bytes"]``, not to the cache bytes.
* RoPE: keys are projected **post-RoPE** (the keys the cache holds), so attention needs nothing re-applied; the
  price is that the basis must also cover the rotation of the position-encoding pairs (pre-RoPE projection would
  need the keys' positions and a re-rotation at attention time; see ``scripts/rope_check.py`` for both
  measured).
* The cache stores ``r``-dim coefficients per token, keys and values, in the cache dtype: ``ratio = r / head_dim``,
  ``r = max(1, round(ratio · head_dim))``, or ``rank=r`` directly. ``ratio=1.0`` keeps every direction (exact up to
  float rounding).
* The newest ``residual`` tokens stay in full precision in the append buffer (flushed in chunks of 32).

Defaults: ``ratio=0.5``, ``rank=None`` (from ratio), ``residual=32``, ``calibration=None`` (built-in corpus).
The per-layer relative Frobenius error of K and V is in ``cache.shared["lowrank"]["recon_error"]``
when the cache is created with ``diagnostics=True`` (the run CLI does; off by default: it decodes every encoded block).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import Codec, CompressionContext, Workspace
from kvcompress.errors import KVCompressError, check_non_negative_int
from kvcompress.methods.hidden.calibration import bases_for, ensure_calibrated
from kvcompress.methods.hidden.packing import ResidualHidden
from kvcompress.registry import register

#: models whose bases were loaded or calibrated, by calibration text (prepare runs once per model and text)
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

CHUNK = 32


class LowRankCodec(Codec):
    """Coefficients ``(pairs, count, r)`` on each pair's basis. The layer's bases ``(kv_heads, D, D)`` are held by
    reference (model-side, not cache bytes; no per-block copy) with each pair's KV head index (the segment's own)."""

    attends_directly = True
    joinable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, k_bases: torch.Tensor, v_bases: torch.Tensor,
                 heads: torch.Tensor, rk: int, rv: int):
        self.k_bases, self.v_bases, self.heads, self.ranks, self.dtype = k_bases, v_bases, heads, (rk, rv), keys.dtype
        k_basis, v_basis = self._bases()
        self.k_coef = (keys.float() @ k_basis).to(keys.dtype)
        self.v_coef = (values.float() @ v_basis).to(values.dtype)

    def _bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_bases[self.heads, :, : self.ranks[0]], self.v_bases[self.heads, :, : self.ranks[1]]

    def decode(self, workspace: Workspace | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k_basis, v_basis = self._bases()
        k = self.k_coef.float() @ k_basis.transpose(-1, -2)
        v = self.v_coef.float() @ v_basis.transpose(-1, -2)
        return k.to(dtype or self.dtype), v.to(dtype or self.dtype)

    def scores(self, query: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``q · K̂ᵀ = (q · B_k) · coefᵀ``: reads the r-dim coefficients, never a full-size key."""
        return (query @ self._bases()[0]) @ self.k_coef.float().transpose(-1, -2)

    def mix(self, probs: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``p · V̂ = (p · coef) · B_vᵀ``."""
        return (probs @ self.v_coef.float()) @ self._bases()[1].transpose(-1, -2)

    def concat(self, later: LowRankCodec) -> LowRankCodec | None:
        same = lambda a, b: a.data_ptr() == b.data_ptr() and a.shape == b.shape  # noqa: E731 (the layer's bases)
        if not (same(later.k_bases, self.k_bases) and same(later.v_bases, self.v_bases)) or later.ranks != self.ranks:
            return None
        joined = copy.copy(self)
        joined.k_coef = torch.cat([self.k_coef, later.k_coef], 1)
        joined.v_coef = torch.cat([self.v_coef, later.v_coef], 1)
        return joined

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_coef, self.v_coef]


@register
@dataclass
class LowRank(ResidualHidden):
    name = "lowrank"
    summary = "calibrated per-head principal directions, r = ratio·head_dim"
    paper = "Palu-style"

    ratio: float = 0.5
    rank: int | None = None
    residual: int = 32
    calibration: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise KVCompressError(f"rank={self.rank!r} is invalid; valid: an integer in [1, head_dim], or null (from ratio)")
        check_non_negative_int(self.residual, "residual")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise KVCompressError(f"calibration={self.calibration!r} is invalid; valid: null (built-in corpus), text or a .txt path")

    def chunk_tokens(self) -> int:
        return CHUNK

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        """Load (or calibrate, once per model and calibration text) the model's bases; later caches reuse them."""
        done = _PREPARED.setdefault(model, set())
        if self.calibration not in done:
            ensure_calibrated(model, tokenizer, self.calibration)
            done.add(self.calibration)
        return "bases calibrated / loaded (kvcompress.methods.hidden.calibration)"

    def rank_for(self, dim: int) -> int:
        if self.rank is not None:
            if self.rank > dim:
                raise KVCompressError(f"rank={self.rank} exceeds head_dim={dim}; valid: an integer in [1, {dim}]")
            return self.rank
        return max(1, min(dim, round(self.ratio * dim)))

    def encode_block(self, keys, values, rows, heads, ctx: CompressionContext) -> LowRankCodec:
        resolved = ctx.shared.setdefault("_bases", {})  # once per layer and cache: the check reads the layer's weights
        bases = resolved.get(ctx.layer_idx)
        if bases is None:
            bases = resolved[ctx.layer_idx] = bases_for(ctx.module, self.calibration)
        ctx.shared["basis_bytes"] = bases.nbytes
        i = ctx.layer_idx
        rk, rv = self.rank_for(keys.shape[-1]), self.rank_for(values.shape[-1])
        k_bases, v_bases = bases.layer(i, keys.device)  # the artifact stays on the CPU; one cached copy per device
        return LowRankCodec(keys, values, k_bases, v_bases, heads, rk, rv)
