"""Generation-time edits of a :class:`~kvcompress.layer.KVCompressLayer` that transformers asks for through the
cache: cropping the newest positions (``DynamicCache.crop``: assisted decoding, contrastive search) and re-indexing
its rows (beam search's reorder, ``batch_repeat_interleave``). The layer's methods of the same names delegate here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import views
from .compressor import LayerView
from .errors import KVCompressError
from .storage import Segment, state_tensors

if TYPE_CHECKING:
    from .layer import KVCompressLayer


def croppable(layer: KVCompressLayer, max_length: int) -> str | None:
    """Why :func:`crop` to ``max_length`` is impossible, or None. Only entries appended after the layer's last
    selection can be removed: they are the newest slots of the dense buffer, in order, for every pair."""
    target = layer.logical + max_length if max_length < 0 else max_length
    drop = layer.logical - target
    if drop <= 0 or not layer.is_initialized:
        return None
    if target < layer.compressed_at:
        return (f"layer {layer.layer_idx} was compressed at {layer.compressed_at} positions; only later tokens can be "
                "cropped")
    if drop > layer.length:
        return f"layer {layer.layer_idx} holds only its newest {layer.length} tokens in full precision"
    return None


def crop(layer: KVCompressLayer, max_length: int) -> None:
    """``DynamicCache.crop``: keep the first ``max_length`` positions (negative: drop ``-max_length``). Raises
    :class:`KVCompressError` where it is impossible (:meth:`~kvcompress.layer.KVCompressLayer.croppable`)."""
    why = layer.croppable(max_length)
    if why is not None:
        raise KVCompressError(f"cannot crop to {max_length}: {why}; valid: max_length >= {layer.compressed_at} "
                              "(or a copy of the cache taken before the tokens to drop: copy.deepcopy(cache))")
    target = layer.logical + max_length if max_length < 0 else max_length
    drop = layer.logical - target
    if drop > 0 and layer.is_initialized:
        layer.length -= drop
        layer.logical -= drop


def batch_select_indices(layer: KVCompressLayer, indices: torch.Tensor) -> None:
    """Rows ``indices`` of the layer, in that order (beam search's reorder; rows may repeat): dense buffers are
    indexed; ragged entries are re-packed for the new rows; encoded blocks keep their encoding, re-indexed by
    their codec (:meth:`~kvcompress.compressor.Codec.select`). Reads ``indices`` on the host for the last two
    (beam search already synchronises every step)."""
    if not layer.is_initialized:
        return
    held = [name for name, entry in layer.state.items() if any(True for _ in state_tensors(entry))]
    if held:
        raise KVCompressError(f"beam search / batch re-indexing with {held[0]!r} keeping per-entry state while "
                              "decoding (phase=decode) is not supported; valid: num_beams=1, or phase=prefill")
    host = indices.tolist() if (layer.segments or layer.ragged is not None or layer.pad is not None) else None
    segments = [_select_rows(seg, host, layer.keys.shape[1]) for seg in layer.segments]
    if layer.ragged is not None:
        view = views.rectangle(layer, include_encoded=False)  # ragged entries + buffer, in position order
        rows = indices.to(view.keys.device)
        selected = LayerView(view.keys[rows], view.values[rows], view.valid[rows],
                             view.positions[rows] if view.positions is not None else None)
        compressed_at = layer.compressed_at
        layer.store(selected)
        layer.compressed_at = compressed_at
    else:
        layer.keys, layer.values = layer.keys[indices], layer.values[indices]
        if layer.positions is not None:
            layer.positions = layer.positions[indices]
    layer.segments = segments
    if layer.pad is not None:
        layer.pad = [layer.pad[i] for i in host]


def _select_rows(seg: Segment, rows: list[int], kv_heads: int) -> Segment:
    """An encoded block for new rows ``rows`` (new row ``r`` takes old row ``rows[r]``'s pairs), its codec indexed by
    pair (:meth:`~kvcompress.compressor.Codec.select`), pairs ordered by new row."""
    old = [(i, pair // kv_heads, pair % kv_heads) for i, pair in enumerate(seg.pairs)]
    chosen = [(i, new_row, head) for new_row, source in enumerate(rows) for i, row, head in old if row == source]
    device = seg.rows.device
    index = torch.tensor([i for i, _, _ in chosen], dtype=torch.long, device=device)
    return Segment(
        rows=torch.tensor([r for _, r, _ in chosen], dtype=torch.long, device=device),
        heads=torch.tensor([h for _, _, h in chosen], dtype=torch.long, device=device),
        codec=seg.codec.select(index), count=seg.count, pairs=tuple(r * kv_heads + h for _, r, h in chosen),
        positions=seg.positions[index] if seg.positions is not None else None,
    )

