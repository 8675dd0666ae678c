"""Hidden-axis encoding of a layer: per (row, KV head) pair, the full-precision tail keeps its newest
``residual_tokens``; the oldest whole ``chunk_tokens`` beyond that go to the codec, and blocks of the same pairs are
joined (one block per pair group however many flushes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .compressor import CompressionContext, HiddenCompressor, LayerView
from .storage import Segment
from .views import rectangle

if TYPE_CHECKING:
    from .layer import KVCompressLayer


def encode(layer: KVCompressLayer, comp: HiddenCompressor, ctx: CompressionContext) -> bool:
    """Hand full-precision entries to a hidden-axis codec. Per (row, head) pair the plain tail keeps its newest
    ``residual_tokens``; the oldest whole ``chunk_tokens`` beyond that are encoded. Returns whether anything was."""
    residual, chunk = comp.residual_tokens(), comp.chunk_tokens()
    if layer.ragged is None:
        return _encode_buffer(layer, comp, ctx, residual, chunk)
    # Ragged layout: each pair's plain tail is its ragged entries followed by the buffer.
    b, h = layer.keys.shape[:2]
    plain = torch.tensor(layer.ragged.counts, device="cpu") + layer.length  # (pairs,) host
    encoded = torch.where(plain > residual, (plain - residual) // chunk * chunk, torch.zeros_like(plain))
    if not bool((encoded > 0).any()):
        return False
    view = rectangle(layer, include_encoded=False)  # (b, h, width, d): plain entries in position order
    flat_k = view.keys.view(b * h, -1, view.keys.shape[-1])
    flat_v = view.values.view(b * h, -1, view.values.shape[-1])
    flat_pos = view.positions.view(b * h, -1) if view.positions is not None else None
    for count in sorted(set(encoded.tolist()) - {0}):
        pairs = (encoded == count).nonzero().flatten()  # host
        ids = pairs.to(flat_k.device)
        rows, heads = ids // h, ids % h
        pos = flat_pos[ids, :count] if flat_pos is not None and layer.cache.trace else None
        block_k, block_v = flat_k[ids, :count].contiguous(), flat_v[ids, :count].contiguous()
        codec = comp.encode(block_k, block_v, ctx, rows, heads, pos)
        _add_encoded(layer.segments, Segment(rows, heads, codec, count, tuple(pairs.tolist()), pos))
    rank = torch.arange(view.valid.shape[-1], device=view.valid.device)
    leftover = view.valid & (rank >= encoded.to(rank.device).view(b, h, 1))
    segments = layer.segments
    layer.store(LayerView(view.keys, view.values, leftover, view.positions))
    layer.segments = segments
    return True


def _encode_buffer(
    layer: KVCompressLayer, comp: HiddenCompressor, ctx: CompressionContext, residual: int, chunk: int
) -> bool:
    """Uniform layout: encode the buffer's oldest whole chunks beyond the residual, for every pair at once."""
    n = (layer.length - residual) // chunk * chunk if layer.length > residual else 0
    if n <= 0:
        return False
    b, h = layer.keys.shape[:2]
    keys = layer.keys[:, :, :n].reshape(b * h, n, -1)
    values = layer.values[:, :, :n].reshape(b * h, n, -1)
    if n == layer.keys.shape[2] or b * h == 1:  # the reshape is a view of the buffer: the codec must own its input
        keys, values = keys.clone(), values.clone()
    pos = None
    if layer.positions is not None and layer.cache.trace:
        pos = layer.positions[:, :, :n].reshape(b * h, n).clone()
    device = layer.keys.device
    rows = torch.arange(b, device=device).repeat_interleave(h)
    heads = torch.arange(h, device=device).repeat(b)
    codec = comp.encode(keys, values, ctx, rows, heads, pos)
    _add_encoded(layer.segments, Segment(rows, heads, codec, n, tuple(range(b * h)), pos))
    # The buffer now holds only the residual window: move it into a fresh buffer (exact size after prefill, the
    # usual ≤1% headroom while decoding), so the prefill-sized or pre-flush capacity is released.
    layer._rebuffer(n, layer.length - n + (0 if ctx.phase == "prefill" else layer._headroom(leaving=n)))
    layer.pristine = False
    return True


def _add_encoded(segments: list[Segment], seg: Segment) -> None:
    """Append an encoded segment, joined to its pairs' previous block when that block is the newest segment holding
    any of these pairs and covers exactly the same pairs (position order per pair is kept). Host metadata only."""
    for i in range(len(segments) - 1, -1, -1):
        other = segments[i]
        if not set(other.pairs).isdisjoint(seg.pairs):
            joined = other.joined(seg)
            if joined is not None:
                segments[i] = joined
                return
            break
    segments.append(seg)
