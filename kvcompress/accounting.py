"""What a :class:`KVCompressCache` holds, in bytes and tokens: the memory block of a results row.

``kept_bytes`` = the bytes of the used part of every tensor the cache holds (index metadata and compressor state
included); ``resident_bytes`` adds the append headroom; ``dense_bytes`` is what a ``DynamicCache`` of the same run
would hold. Everything is read from host metadata and tensor shapes: no device value is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, TypedDict

import torch

from .errors import KVCompressError

if TYPE_CHECKING:
    from .cache import KVCompressCache


def tensors(cache: KVCompressCache) -> Iterator[torch.Tensor]:
    for layer in cache.layers:
        yield from layer.tensors()


def kept_bytes(cache: KVCompressCache) -> int:
    """Bytes of every tensor the cache holds (used extents; index metadata included)."""
    return sum(layer.kept_bytes() for layer in cache.layers)


def resident_bytes(cache: KVCompressCache) -> int:
    """Bytes allocated, including the append buffers' reserved headroom (≤ ~1% for long caches)."""
    return sum(layer.resident_bytes() for layer in cache.layers)


def dense_bytes(cache: KVCompressCache) -> int:
    """What an uncompressed ``DynamicCache`` of the same run holds: every logical position (padding included)
    of every layer and KV head, keys and values, at the cache's dtype."""
    total = 0
    for layer in cache.layers:
        if layer.is_initialized:
            b = layer.keys.shape[0]
            elem = layer.keys.element_size()
            total += b * cache.num_kv_heads * layer.logical * (layer.keys.shape[-1] + layer.values.shape[-1]) * elem
    return total


def kept_tokens(cache: KVCompressCache) -> list[list[float]]:
    """Mean over batch rows of the real tokens held, per layer × KV head."""
    return [layer.kept_tokens().mean(0).tolist() if layer.is_initialized else [] for layer in cache.layers]


def kept_positions(cache: KVCompressCache, layer_idx: int, row: int = 0) -> list[list[int]]:
    """Logical positions held per KV head of one row (needs ``trace=True``)."""
    layer = cache.layers[layer_idx]
    if not cache.trace:
        raise KVCompressError("kept_positions needs a cache created with trace=True")
    view = layer.materialize(None)
    out = []
    for h in range(cache.num_kv_heads):
        sel = view.valid[row, h]
        pos = view.positions[row, h][sel]
        if layer.pristine and layer.pad is not None:
            pos = pos[pos >= layer.pad[row]]
        out.append(sorted(pos.tolist()))  # slots need not be in position order (decode-time eviction)
    return out


def bits_split(cache: KVCompressCache) -> list[tuple[float, float]]:
    """Per layer, ``(fixed_bits, dtype_fraction)`` of a kept key/value element, so that
    ``effective bits = fixed_bits + dtype_fraction · 8 · dtype_bytes``.

    ``dtype_fraction`` = elements held in tensors of the cache's own dtype per kept element (full-precision
    buffers, low-rank coefficients, pruned channels: they scale with the dtype); ``fixed_bits`` = bits held in
    other dtypes per kept element (integer codes, int64 indices, float16 quantization scales/minima of a
    non-float16 cache: fixed whatever the cache dtype). Tensors are classed by dtype, so the float16 scales of
    a float16 cache count as dtype-scaled. Per element = per (kept token, d_k + d_v) of the layer. A layer
    holding no token reports ``(0, 1)`` (a dense layer of the cache dtype)."""
    out = []
    for layer in cache.layers:
        tokens = float(layer.kept_tokens().sum()) if layer.is_initialized else 0.0
        if tokens <= 0:
            out.append((0.0, 1.0))
            continue
        dtype = layer.keys.dtype
        elements = tokens * (layer.keys.shape[-1] + layer.values.shape[-1])
        own = other = 0
        for t, used in layer._holdings():
            if t.dtype == dtype:
                own += used
            else:
                other += used
        out.append((8.0 * other / elements, own / layer.keys.element_size() / elements))
    return out


def effective_bits(cache: KVCompressCache, split: list[tuple[float, float]] | None = None) -> list[float]:
    """Per layer, the stored bits per kept key/value element, everything held included (quantization scales,
    indices, codec metadata, padding of an uncompressed batch): ``8 · kept_bytes / (kept tokens · (d_k + d_v))``
    = ``fixed_bits + dtype_fraction · 8 · dtype_bytes`` (:meth:`bits_split`). With it, kept tokens × dims ×
    bits reproduces each layer's bytes — what the latency model charges."""
    split = bits_split(cache) if split is None else split
    return [
        fixed + frac * 8.0 * (layer.keys.element_size() if layer.is_initialized else 2)
        for (fixed, frac), layer in zip(split, cache.layers)
    ]


class MemoryReport(TypedDict):
    """The memory block of a results row (a plain dict at run time)."""

    dense_bytes: int  # what a DynamicCache of the same run holds
    kept_bytes: int  # bytes of the used part of every tensor held
    resident_bytes: int  # bytes allocated (append headroom included)
    workspace_bytes: int  # attention scratch for encoded blocks, reused across steps; not cache data
    kept_fraction: float | None  # kept / dense; None while nothing is stored
    kept_fraction_prefill: float | None  # kept / dense right after the prefill (before any decoded token)
    context_tokens: int  # logical positions seen (left padding included)
    dtype_bytes: int | None
    kept_tokens: list[list[float]]  # per layer x KV head, mean over rows
    key_bits: list[float] | None  # per layer, effective bits per kept element (metadata included); None if empty
    value_bits: list[float] | None
    fixed_bits: list[float] | None  # per layer, bits held in other dtypes (codes, fp16 scales, indices)
    dtype_fraction: list[float] | None  # per layer, cache-dtype elements per kept element
    empty: bool  # True before any forward: nothing stored yet (zero bytes; fraction and bits None)
    simulated: bool  # always False: every byte counted is a byte held by a tensor


def memory_report(cache: KVCompressCache) -> MemoryReport:
    """The memory block of a results row.

    ``key_bits``/``value_bits`` are the effective bits per kept element (:meth:`effective_bits`);
    ``fixed_bits``/``dtype_fraction`` split them (:meth:`bits_split`) so that a projection onto a model of
    another dtype charges ``fixed_bits + dtype_fraction · target dtype bits``.

    Before any forward nothing is stored: ``empty`` is True, the bytes are zero, and ``kept_fraction`` and the bits
    are None (there is no kept element to measure; not NaN, not the dtype's bits)."""
    dense, kept = dense_bytes(cache), kept_bytes(cache)
    first = next((layer for layer in cache.layers if layer.is_initialized), None)
    empty = dense == 0
    split = None if empty else bits_split(cache)
    bits = None if split is None else effective_bits(cache, split)
    return MemoryReport(**{
        "dense_bytes": dense,
        "kept_bytes": kept,
        "resident_bytes": resident_bytes(cache),
        "workspace_bytes": cache.workspace.nbytes(),  # attention scratch, reused across steps; not cache data
        "kept_fraction": None if empty else kept / dense,
        "kept_fraction_prefill": cache.kept_fraction_prefill,
        "context_tokens": first.logical if first is not None else 0,
        "dtype_bytes": first.keys.element_size() if first is not None else None,
        "kept_tokens": kept_tokens(cache),
        "key_bits": bits,  # effective (metadata included), the same for keys and values
        "value_bits": bits,
        "fixed_bits": None if split is None else [fixed for fixed, _ in split],  # bits in other dtypes (codes, ...)
        "dtype_fraction": None if split is None else [frac for _, frac in split],  # cache-dtype elements per kept one
        "empty": empty,  # nothing stored yet (before any forward)
        "simulated": False,  # every byte counted here is a byte held by a tensor
    })
