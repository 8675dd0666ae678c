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
* Attention decodes one encoded block at a time (the core's merged attention), so at most one layer's keys and values
  are ever dequantized at once; decoding writes codes straight into the output (no wide temporaries).

Defaults: ``bits=4``, ``group=32``, ``residual=128`` (KIVI's G=32, R=128). ``bits`` ∈ {2, 4, 8}.
The per-layer relative Frobenius error of the encoded K and V is in ``cache.shared["quant"]["recon_error"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.compressor import CompressionContext, register
from kvcompress.errors import KVCompressError, check_non_negative_int, check_positive_int
from kvcompress.quantize import ResidualHidden, check_bits, dequantize_groups_, pack, quantize_groups, unpack


class QuantCodec:
    """Packed codes + float16 scales/minima for keys (per channel, token groups) and values (per token, channel
    groups) of a block ``(pairs, count, head_dim)``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int):
        self.bits, self.group, self.dtype = bits, group, keys.dtype
        self.dims = (keys.shape[-1], values.shape[-1])
        codes, self.k_scale, self.k_min = quantize_groups(keys, bits, group, dim=1)
        self.k_packed = pack(codes, bits)
        codes, self.v_scale, self.v_min = quantize_groups(values, bits, group, dim=2)
        self.v_packed = pack(codes, bits)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = unpack(self.k_packed, self.bits, self.dims[0], dtype=torch.float32)
        dequantize_groups_(k, self.k_scale, self.k_min, self.group, dim=1)
        v = unpack(self.v_packed, self.bits, self.dims[1], dtype=torch.float32)
        dequantize_groups_(v, self.v_scale, self.v_min, self.group, dim=2)
        return k.to(self.dtype), v.to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_packed, self.k_scale, self.k_min, self.v_packed, self.v_scale, self.v_min]


@register
@dataclass
class Quant(ResidualHidden):
    name = "quant"

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
        return QuantCodec(keys, values, self.bits, self.group)
