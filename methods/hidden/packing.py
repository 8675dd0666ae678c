"""Packed integer quantization, and the plumbing shared by the hidden-axis codecs (``quant``, ``lowrank``, ``think``).

Packing: codes in ``[0, 2**bits)`` are packed along the last axis, little end first: ``8 // bits`` codes per byte
(two 4-bit or four 2-bit codes; 8-bit codes are stored as they are). A last axis that is not a multiple of
``8 // bits`` is zero-padded to one; :func:`unpack` cuts the padding off again.

Group quantization (:func:`quantize_groups`): asymmetric min-max per group of ``group`` consecutive entries along one
axis, ``x ≈ code · scale + minimum``, with ``scale`` and ``minimum`` (the zero point, KIVI's convention) stored in
**float16** whatever the cache dtype (as KIVI does). The float16 minimum is rounded down and the float16 scale up, so
every value of a group lies in ``[minimum, minimum + (2**bits − 1)·scale]`` and the dequantization error is at most
half a quantization step (``scale / 2``) per group. A last group shorter than ``group`` (a block whose length along
the grouped axis is not a multiple of it) has its own min/max. Values beyond the float16 range (|x| > 65504) are not
supported.

Residual handling: the core keeps the newest ``residual_tokens`` of every (row, head) in full precision and hands
the codecs only whole chunks of older entries (see :class:`kvcompress.compressor.HiddenCompressor`), the same way
for a batch row as for the row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvcompress.compressor import CompressionContext, HiddenCompressor
from kvcompress.errors import KVCompressError

BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise KVCompressError(f"bits={bits!r} is invalid; valid choices: 2, 4, 8")
    return int(bits)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into uint8 (``8 // bits`` codes per byte)."""
    bits = check_bits(bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per)
    out = codes[..., 0].clone()
    for j in range(1, per):
        out |= codes[..., j] << (bits * j)
    return out


def unpack(
    packed: torch.Tensor,
    bits: int,
    n: int,
    dtype: torch.dtype = torch.uint8,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of the last axis, as ``dtype``, written into ``out`` (shape
    ``(*packed.shape[:-1], n)``) if given. On the CPU, codes go straight into the output one bit-plane at a time, in
    slabs of rows; the only temporary is one byte slab of at most :data:`SLAB_BYTES` (``scratch``, a uint8 buffer of
    at least that size or of ``packed``'s, is reused for it if given). On an accelerator every plane is unpacked at
    once (a byte temporary of the codes' size, a quarter of a float32 output) in a fixed number of kernels."""
    bits = check_bits(bits)
    if out is None:
        out = torch.empty((*packed.shape[:-1], n), dtype=dtype, device=packed.device)
    if bits == 8:
        return out.copy_(packed[..., :n])
    per, mask = 8 // bits, (1 << bits) - 1
    if packed.device.type != "cpu":  # an accelerator: all planes at once, a fixed number of kernels for any size
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
        codes = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), mask)  # (..., m, per)
        return out.copy_(codes.flatten(-2)[..., :n])
    m = packed.shape[-1]
    src, dst = packed.reshape(-1, m), out.view(-1, n)
    rows = max(1, min(src.shape[0], SLAB_BYTES // max(1, m)))
    if scratch is None or scratch.numel() < rows * m:
        scratch = torch.empty(rows * m, dtype=torch.uint8, device=packed.device)
    for start in range(0, src.shape[0], rows):
        block = src[start : start + rows]
        tmp = scratch.view(-1)[: block.numel()].view(block.shape)
        for j in range(per):
            count = len(range(j, n, per))  # codes of plane j inside the first n (the rest is padding)
            torch.bitwise_right_shift(block, bits * j, out=tmp)
            tmp.bitwise_and_(mask)
            dst[start : start + rows, j::per].copy_(tmp[:, :count])
    return out


#: Bound on :func:`unpack`'s byte temporary.
SLAB_BYTES = 1 << 18


# ---------------------------------------------------------------------------------------------------------------
# Group quantization


def _pad_replicate(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Pad ``dim`` to a multiple of ``group`` with copies of its last entry (leaves every group's min/max unchanged)."""
    n = x.shape[dim]
    pad = (-n) % group
    if not pad:
        return x
    last = x.narrow(dim, n - 1, 1)
    return torch.cat([x, last.expand(*[pad if d == dim % x.dim() else s for d, s in enumerate(last.shape)])], dim)


def _grouped(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """View ``x`` (padded) as ``(..., n_groups, group, ...)`` along ``dim``."""
    dim = dim % x.dim()
    x = _pad_replicate(x, dim, group)
    return x.reshape(*x.shape[:dim], x.shape[dim] // group, group, *x.shape[dim + 1 :])


def quantize_groups(x: torch.Tensor, bits: int, group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of ``x`` in groups of ``group`` entries along ``dim``.

    Returns ``(codes, scale, minimum)``: codes uint8 with the shape of ``x``; scale and minimum float16 with ``dim``
    replaced by the number of groups ``ceil(n / group)``.
    """
    bits = check_bits(bits)
    dim = dim % x.dim()
    levels = (1 << bits) - 1
    g = _grouped(x.float(), dim, group)  # (..., ng, group, ...)
    lo, hi = g.amin(dim + 1), g.amax(dim + 1)
    mn = lo.to(SCALE_DTYPE)
    mn = torch.where(mn.float() > lo, torch.nextafter(mn, torch.full_like(mn, -math.inf)), mn)
    scale = (hi - mn.float()) / levels
    s16 = scale.to(SCALE_DTYPE)
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    safe = torch.where(s16 > 0, s16.float(), torch.ones_like(scale))
    codes = torch.round((g - mn.float().unsqueeze(dim + 1)) / safe.unsqueeze(dim + 1)).clamp_(0, levels)
    codes = codes.to(torch.uint8).flatten(dim, dim + 1).narrow(dim, 0, x.shape[dim])
    return codes, s16, mn


def dequantize_groups_(out: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """In place: ``out`` holds codes (as floats); turn them into ``code · scale + minimum`` per group along ``dim``."""
    dim = dim % out.dim()
    n = out.shape[dim]
    full = n // group * group
    scale, minimum = scale.to(out.dtype), minimum.to(out.dtype)  # small; mixed-dtype in-place ops are slow
    if full:
        body = out.narrow(dim, 0, full)
        shape = (*body.shape[:dim], full // group, group, *body.shape[dim + 1 :])
        view = body.view(shape)  # splitting one axis is always a view, even of a narrowed tensor
        view.mul_(scale.narrow(dim, 0, full // group).unsqueeze(dim + 1))
        view.add_(minimum.narrow(dim, 0, full // group).unsqueeze(dim + 1))
    if full < n:
        tail = out.narrow(dim, full, n - full)
        tail.mul_(scale.narrow(dim, scale.shape[dim] - 1, 1)).add_(minimum.narrow(dim, minimum.shape[dim] - 1, 1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Codecs shared by the hidden-axis methods


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(squared Frobenius error, squared Frobenius norm) in float64."""
    ref64 = ref.double()
    return float((ref64 - approx.double()).pow(2).sum()), float(ref64.pow(2).sum())


def record_error(ctx: CompressionContext, k: tuple[float, float], v: tuple[float, float]) -> None:
    """Accumulate per-layer reconstruction error in ``ctx.shared`` (plain floats, not cache memory):
    ``shared["recon_error"][layer] = {"k": ‖K − K̂‖_F / ‖K‖_F, "v": …}`` over every entry this layer encoded."""
    sums = ctx.shared.setdefault("_recon_sums", {}).setdefault(ctx.layer_idx, [0.0, 0.0, 0.0, 0.0])
    sums[0] += k[0]
    sums[1] += k[1]
    sums[2] += v[0]
    sums[3] += v[1]
    rel = lambda e, n: math.sqrt(e / n) if n > 0 else 0.0  # noqa: E731
    ctx.shared.setdefault("recon_error", {})[ctx.layer_idx] = {"k": rel(sums[0], sums[1]), "v": rel(sums[2], sums[3])}


@dataclass
class ResidualHidden(HiddenCompressor):
    """Base of the hidden-axis methods: a full-precision residual window of the newest tokens, encoding in chunks,
    the same rule for ragged layers as for the dense buffer (see the module docstring), and, with the cache's
    ``diagnostics`` on, the per-layer reconstruction error recorded at every encode. Subclasses implement
    :meth:`encode_block`."""

    def residual_tokens(self) -> int:
        return int(self.residual)  # every subclass declares its `residual` field

    def chunk_tokens(self) -> int:
        return 1

    def encode_block(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor,
                     ctx: CompressionContext) -> Any:
        raise NotImplementedError

    def encode(self, keys: torch.Tensor, values: torch.Tensor, ctx: CompressionContext, rows: torch.Tensor,
               heads: torch.Tensor, positions: torch.Tensor | None = None) -> Any:
        codec = self.encode_block(keys, values, rows, heads, ctx)
        if ctx.diagnostics:  # opt-in: a full decode of the block and a host sync
            with torch.no_grad():
                k_hat, v_hat = codec.decode()
                record_error(ctx, relative_error(keys, k_hat), relative_error(values, v_hat))
        return codec
