"""``quant`` — packed low-bit KV quantization in the KIVI layout.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv 2402.02750).

* Keys are quantized **per channel** over groups of ``group`` consecutive tokens (one scale/minimum per channel per
  token group); values **per token** over groups of ``group`` consecutive channels. Asymmetric min-max:
  ``x ≈ code · scale + minimum``. A block whose token count (keys) or head_dim (values) is not a multiple of
  ``group`` gets a shorter last group with its own min/max.
* Codes are packed into bytes (two 4-bit or four 2-bit codes per byte; 8-bit as is); scales and minima are stored in
  **float16** whatever the cache dtype (as KIVI does). Bytes per (row, KV head) for ``n`` encoded tokens
  (``head_dim`` = D, ``n`` a multiple of ``group``): keys ``n·D·bits/8 + (n/group)·D·2·2``; values
  ``n·D·bits/8 + n·ceil(D/group)·2·2``; the residual window stays in the cache dtype.
* The newest ``residual`` tokens (a multiple of ``group``) of every (row, KV head) stay in full precision; the buffer is
  flushed in whole groups (``chunk_tokens() == group``), so the residual holds between ``residual`` and
  ``residual + group − 1`` tokens. Composed after a token method, only the kept tokens are quantized.
* Attention dequantizes one encoded block's keys, takes the scores, then its values into the same buffer of the
  cache's reusable float32 workspace (``scores``/``mix``): at most one block's keys *or* values are dequantized at
  once (half of one layer's dense float32 K/V, plus a byte slab of at most 256 KiB for unpacking), and no step
  allocates fresh layer-sized buffers. Blocks flushed while decoding are joined to the layer's existing block (codes and metadata
  concatenated along tokens), so the per-step cost does not grow with the number of flushes.

Defaults: ``bits=4``, ``group=32``, ``residual=128`` (KIVI's G=32, R=128). ``bits`` ∈ {2, 4, 8}.
The per-layer relative Frobenius error of the encoded K and V is in ``cache.shared["quant"]["recon_error"]``
when the cache is created with ``diagnostics=True`` (the run CLI does; off by default: it decodes every encoded block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import Codec, CompressionContext, Workspace
from kvcompress.errors import KVCompressError, check_non_negative_int, check_positive_int
from kvcompress.methods.hidden.packing import (
    SLAB_BYTES,
    ResidualHidden,
    check_bits,
    dequantize_groups_,
    pack,
    quantize_groups,
    unpack,
)
from kvcompress.registry import register


@dataclass
class QuantCodec(Codec):
    """Packed codes + float16 scales/minima for keys (per channel, token groups) and values (per token, channel
    groups) of a block ``(pairs, count, head_dim)``."""

    attends_directly = True
    joinable = True

    bits: int
    group: int
    dtype: torch.dtype
    dims: tuple[int, int]
    k_packed: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_packed: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor

    @classmethod
    def encode(cls, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int) -> QuantCodec:
        k_codes, k_scale, k_min = quantize_groups(keys, bits, group, dim=1)
        v_codes, v_scale, v_min = quantize_groups(values, bits, group, dim=2)
        return cls(bits, group, keys.dtype, (keys.shape[-1], values.shape[-1]),
                   pack(k_codes, bits), k_scale, k_min, pack(v_codes, bits), v_scale, v_min)

    def select(self, index: torch.Tensor) -> QuantCodec:
        """Pairs ``index`` of the block (every tensor is per pair along dim 0): still packed, no re-quantization."""
        pick = [t.index_select(0, index) for t in (self.k_packed, self.k_scale, self.k_min, self.v_packed,
                                                   self.v_scale, self.v_min)]
        return QuantCodec(self.bits, self.group, self.dtype, self.dims, *pick)

    def _dequantized(self, part: str, workspace: Workspace | None) -> torch.Tensor:
        """Keys (``part="k"``) or values (``"v"``) in float32; with a workspace, in its single ``"block"`` buffer."""
        packed, scale, minimum, dim, d = (
            (self.k_packed, self.k_scale, self.k_min, 1, self.dims[0]) if part == "k"
            else (self.v_packed, self.v_scale, self.v_min, 2, self.dims[1])
        )
        out = scratch = None
        if workspace is not None:
            out = workspace.get("block", (*packed.shape[:-1], d), torch.float32, packed.device)
            scratch = workspace.get("codes", (min(packed.numel(), SLAB_BYTES),), torch.uint8, packed.device)
        x = unpack(packed, self.bits, d, dtype=torch.float32, out=out, scratch=scratch)
        return dequantize_groups_(x, scale, minimum, self.group, dim=dim)

    def decode(self, workspace: Workspace | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._dequantized("k", None).to(dtype or self.dtype)
        return k, self._dequantized("v", None).to(dtype or self.dtype)

    def scores(self, query: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``q · K̂ᵀ`` with K̂ dequantized into the workspace block (then reused for the values by :meth:`mix`)."""
        return query @ self._dequantized("k", workspace).transpose(-1, -2)

    def mix(self, probs: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        return probs @ self._dequantized("v", workspace)

    def concat(self, later: QuantCodec) -> QuantCodec | None:
        """This block followed by ``later`` (same pairs): codes and per-group metadata joined along the token axis —
        exact, since no key group straddles the two (this block's length is a multiple of ``group``)."""
        if (later.bits, later.group, later.dims) != (self.bits, self.group, self.dims) or self.k_packed.shape[1] % self.group:
            return None
        joined = {name: torch.cat([getattr(self, name), getattr(later, name)], 1)
                  for name in ("k_packed", "k_scale", "k_min", "v_packed", "v_scale", "v_min")}
        return QuantCodec(self.bits, self.group, self.dtype, self.dims, **joined)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_packed, self.k_scale, self.k_min, self.v_packed, self.v_scale, self.v_min]


@register
@dataclass
class Quant(ResidualHidden):
    name = "quant"
    summary = "KIVI packed 2/4/8-bit (keys per channel, values per token), fp residual"
    paper = "KIVI (Liu et al. 2024)"

    bits: int = 4
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        check_positive_int(self.group, "group")
        check_non_negative_int(self.residual, "residual")
        if self.residual % self.group:
            raise KVCompressError(
                f"residual={self.residual} is not a multiple of group={self.group}; valid: residual = k·{self.group}, k >= 0"
            )

    def chunk_tokens(self) -> int:
        return self.group

    def encode_block(self, keys, values, rows, heads, ctx: CompressionContext) -> QuantCodec:
        return QuantCodec.encode(keys, values, self.bits, self.group)
