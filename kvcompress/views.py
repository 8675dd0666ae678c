"""Views of a layer for the compressors: everything a (row, KV head) pair holds, in position order, as a rectangle
with a validity mask (:func:`materialize`), or the dense buffer as stored (:func:`slot_view`, for eviction in place).
Widths and offsets come from host metadata; each part is copied in a fixed number of ops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .compressor import LayerView
from .storage import POSITION_DTYPE

if TYPE_CHECKING:
    from .layer import KVCompressLayer


def materialize(layer: KVCompressLayer, padding_valid: torch.Tensor | None) -> LayerView:
    """The layer as a rectangle ``(batch, kv_heads, n, head_dim)`` with a validity mask (entries in position order;
    encoded segments are decoded).

    padding_valid: ``(batch, length)`` bool for a pristine layer (False on left padding), from the model's mask.
    """
    b, h = layer.keys.shape[:2]
    buf_k, buf_v = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
    buf_pos = layer.positions[:, :, : layer.length] if layer.positions is not None else None
    if not layer.segments and layer.ragged is None:
        valid = torch.ones(b, h, layer.length, dtype=torch.bool, device=buf_k.device)
        if layer.pristine and padding_valid is not None:
            valid &= padding_valid[:, None, : layer.length]
        return LayerView(buf_k, buf_v, valid, buf_pos, ordered=layer.slots_ordered)
    return rectangle(layer, include_encoded=True)


def rectangle(layer: KVCompressLayer, include_encoded: bool) -> LayerView:
    """Pairs' entries (encoded blocks decoded if ``include_encoded``, ragged entries, buffer) gathered into a
    ``(batch, kv_heads, width, d)`` rectangle in position order, with a validity mask. Widths and offsets come
    from host metadata; the copy runs in a fixed number of ops per part."""
    b, h = layer.keys.shape[:2]
    pairs, length = b * h, layer.length
    device = layer.keys.device
    before = torch.zeros(pairs, dtype=torch.long, device="cpu")  # entries per pair before the buffer
    segments = layer.segments if include_encoded else []
    for seg in segments:
        before[list(seg.pairs)] += seg.count
    if layer.ragged is not None:
        before += torch.tensor(layer.ragged.counts, device="cpu")
    width = int(before.max()) + length if pairs else length
    keys = layer.keys.new_zeros((pairs * width, layer.keys.shape[-1]))
    values = layer.values.new_zeros((pairs * width, layer.values.shape[-1]))
    valid = torch.zeros(pairs * width, dtype=torch.bool, device=device)
    traced = layer.positions is not None or (layer.ragged is not None and layer.ragged.positions is not None)
    positions = torch.full((pairs * width,), -1, dtype=POSITION_DTYPE, device=device) if traced else None
    fill = torch.zeros(pairs, dtype=torch.long, device=device)  # next free column of each pair

    def put(pair: torch.Tensor, column: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None):
        dest = pair * width + column
        keys.index_copy_(0, dest, k)
        values.index_copy_(0, dest, v)
        valid.index_fill_(0, dest, True)
        if positions is not None and pos is not None:
            positions.index_copy_(0, dest, pos.to(POSITION_DTYPE))

    for seg in segments:
        seg_k, seg_v = seg.kv()
        ids = seg.rows * h + seg.heads
        column = fill[ids].unsqueeze(-1) + torch.arange(seg.count, device=device)
        put(
            ids.repeat_interleave(seg.count, output_size=ids.shape[0] * seg.count),
            column.flatten(),
            seg_k.reshape(-1, seg_k.shape[-1]).to(keys.dtype),
            seg_v.reshape(-1, seg_v.shape[-1]).to(values.dtype),
            seg.positions.flatten() if seg.positions is not None else None,
        )
        fill.index_add_(0, ids, torch.full_like(ids, seg.count))
    if layer.ragged is not None:
        pair, rank = layer.ragged.entry_pairs_and_ranks()
        put(pair, fill[pair] + rank, layer.ragged.keys, layer.ragged.values, layer.ragged.positions)
        fill += layer.ragged.pages_per_pair.long() * layer.ragged.page + layer.ragged.tails_per_pair.long()
    if length:
        pair = torch.arange(pairs, device=device).repeat_interleave(length, output_size=pairs * length)
        column = (fill.unsqueeze(-1) + torch.arange(length, device=device)).flatten()
        put(
            pair,
            column,
            layer.keys[:, :, :length].reshape(-1, layer.keys.shape[-1]),
            layer.values[:, :, :length].reshape(-1, layer.values.shape[-1]),
            layer.positions[:, :, :length].flatten() if layer.positions is not None else None,
        )
    return LayerView(
        keys.view(b, h, width, -1),
        values.view(b, h, width, -1),
        valid.view(b, h, width),
        positions.view(b, h, width) if positions is not None else None,
    )


def slot_view(layer: KVCompressLayer) -> LayerView:
    """The dense buffer as it is stored (slot order, not position order) with its positions: what an in-place
    decode eviction scores (``ordered=False``; ranks come from the positions)."""
    b, h = layer.keys.shape[:2]
    valid = torch.ones(b, h, layer.length, dtype=torch.bool, device=layer.keys.device)
    return LayerView(
        layer.keys[:, :, : layer.length],
        layer.values[:, :, : layer.length],
        valid,
        layer.positions[:, :, : layer.length],
        ordered=False,
    )
