"""A transformers ``Cache`` whose layers physically hold only what the compressors kept.

Layout of one :class:`KVCompressLayer`, per (row, KV head) pair and in position order:

* ``segments`` — blocks encoded by a hidden-axis codec (:class:`Segment`: the pairs ``(rows[i], heads[i])`` holding the
  same number of encoded entries). A block flushed while decoding is joined to the same pairs' previous block (codec
  ``concat``), so attention visits one block per pair group however long the generation.
* ``ragged`` — full-precision entries when rows or KV heads keep different numbers of tokens
  (:class:`~kvcompress.ragged.Ragged`: one packed tensor, no padding, so the bytes held are the bytes kept).
* ``keys`` / ``values`` — a dense append buffer ``(batch, kv_heads, capacity, head_dim)``, of which the first
  ``length`` slots are used (the same count for every pair). Decoding appends into spare capacity (no per-step copy of
  the layer, unlike the stock ``DynamicLayer``'s ``torch.cat``); when it is full it grows by 1/128 of the layer's held
  bytes (at least one slot), so the reserved-but-unused part stays under 1% of what the layer holds. Right after a
  compression the buffer is allocated to the exact size.
* ``positions`` — the logical position of every buffer slot (and ``ragged.positions``), kept when the cache traces
  positions (a diagnostic, not counted) or when a method evicts while decoding (then counted as cache memory): eviction
  at decode replaces the evicted slot by the newest entry in place, so slots stop being in position order.

A layer is *pristine* until its first compression: the buffer then holds every logical position (left padding
included, as ``DynamicCache`` does) and attention is the stock sdpa path with the model's own mask, so an
uncompressed run is numerically the stock one. After a compression the layer holds only real, kept tokens, and
attention is computed here: the model's own sdpa kernel when the layer is one dense buffer (two matmuls for a single
query on the CPU, where they are faster), otherwise an exact log-sum-exp merge of the parts
(:func:`~kvcompress.attention.merged_attention`) in a number of ops that does not grow with batch, heads or counts.

Logical length (positions seen, what ``get_seq_length`` reports, what RoPE of the next token depends on) and
physical length (entries stored) are kept apart, so positions stay right under ``generate()`` and in a manual loop
without ``position_ids``.

No host-device synchronisation on the decode path of a dense layer: shapes, counts and accounting come from host
metadata (``length``, ``ragged.counts``, segment ``pairs``: Python ints); syncs happen only where the kept set is
decided (prefill, eviction fallbacks, codec flushes).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attention import decode_attention, merged_attention
from .compressor import Axis, Codec, CompressionContext, Compressor, HiddenCompressor, LayerView, Workspace
from .errors import KVCompressError
from .ragged import Ragged

_ACTIVE = threading.local()  # the layer whose `update` ran last: the attention call that follows belongs to it
POSITION_DTYPE = torch.int32


def active_layer() -> KVCompressLayer | None:
    return getattr(_ACTIVE, "layer", None)


@dataclass
class Segment:
    """A block of entries encoded by a hidden-axis codec: the pairs ``(rows[i], heads[i])``, ``count`` entries each.

    ``pairs`` is a host copy of ``rows · kv_heads + heads`` (ints), so accounting and joining never read the device. A
    pair may appear in several segments; for each pair, segments are in position order (older first), before the
    layer's ragged entries and its buffer."""

    rows: torch.Tensor  # (pairs,) long, on the cache's device
    heads: torch.Tensor  # (pairs,) long
    codec: Codec
    count: int
    pairs: tuple[int, ...]  # rows · kv_heads + heads, on the host
    positions: torch.Tensor | None = None  # (pairs, count) — only with cache.trace (diagnostic, not counted)

    def kv(
        self, workspace: Workspace | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(pairs, count, head_dim)`` decoded (into ``workspace`` if given), in ``dtype``."""
        return self.codec.decode(workspace, dtype)

    def joined(self, later: Segment) -> Segment | None:
        """This block followed by ``later`` (same pairs, a codec that can ``concat``) as one segment, or None."""
        if (
            not hasattr(self.codec, "concat")
            or type(self.codec) is not type(later.codec)
            or (self.positions is None) != (later.positions is None)
            or self.pairs != later.pairs
        ):
            return None
        codec = self.codec.concat(later.codec)
        if codec is None:
            return None
        positions = torch.cat([self.positions, later.positions], 1) if self.positions is not None else None
        return Segment(self.rows, self.heads, codec, self.count + later.count, self.pairs, positions)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.heads, *self.codec.tensors()]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _state_tensors(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _state_tensors(value)


class KVCompressLayer(CacheLayerMixin):
    """One layer of a :class:`KVCompressCache` (see the module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, cache: KVCompressCache | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.cache = cache
        self.length = 0  # used slots of the buffer
        self.logical = 0  # positions seen (includes left padding, like DynamicCache)
        self.pristine = True
        self.segments: list[Segment] = []
        self.ragged: Ragged | None = None
        self.pad: list[int] | None = None  # left-padding per row, from the prefill mask
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, capacity) logical position of each buffer slot
        self.slots_ordered = True  # False once a decode-time eviction moved entries in place
        self.state: dict[str, Any] = {}
        self.pending: tuple[Any, ...] | None = None  # deferred prefill selection (cross-layer compressors)
        self._returned_key: torch.Tensor | None = None

    @property
    def _tracks_positions(self) -> bool:
        return self.cache is not None and (self.cache.trace or self.cache.positions_counted)

    @property
    def _positions_counted(self) -> bool:
        return self.cache is not None and self.cache.positions_counted

    # -- CacheLayerMixin ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        if self._tracks_positions:
            self.positions = torch.empty((b, h, 0), dtype=POSITION_DTYPE, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        self._returned_key = keys
        _ACTIVE.layer = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built over logical positions. A pristine layer holds exactly those, so the model's mask is right
        # for it; a compressed layer ignores the model's mask and builds its own (see `attend`).
        return self.logical + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.length = self.logical = 0
        self.pristine, self.segments, self.ragged, self.pad, self.positions, self.state = True, [], None, None, None, {}
        self.slots_ordered = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.segments or self.ragged is not None:
            raise KVCompressError("beam search / batch re-indexing is not supported on a ragged or encoded layer")
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            if self.positions is not None:
                self.positions = self.positions[indices]
            if self.pad is not None:
                self.pad = [self.pad[i] for i in indices.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    # -- storage --------------------------------------------------------------------------------------------
    @property
    def pairs(self) -> int:
        return self.keys.shape[0] * self.keys.shape[1]

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[-2]
        need = self.length + n
        if need > self.keys.shape[-2]:
            # Exact size for a first fill (prefill), headroom once we are appending (decode).
            self._rebuffer(0, need if self.length == 0 else need + self._headroom())
        self.keys[:, :, self.length : need] = k
        self.values[:, :, self.length : need] = v
        if self.positions is not None:
            self.positions[:, :, self.length : need] = torch.arange(
                self.logical, self.logical + n, dtype=POSITION_DTYPE, device=self.positions.device)
        self.length = need
        self.logical += n

    def _headroom(self, leaving: int = 0) -> int:
        """Spare buffer slots to reserve when growing: under 1% of what the layer holds (at least one slot), so
        resident bytes stay within 1% of kept bytes while a regrow (a copy of the buffer) happens once every
        ~1/128 of the layer's size in appended tokens. ``leaving``: used buffer slots about to be dropped."""
        slot = self._slot_bytes()
        return max(1, (self.kept_bytes() - leaving * slot) // 128 // slot)

    def _slot_bytes(self) -> int:
        """Bytes of one buffer slot across the batch and heads (keys, values and counted positions)."""
        b, h = self.keys.shape[:2]
        per_pair = (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()
        if self.positions is not None and self._positions_counted:
            per_pair += self.positions.element_size()
        return b * h * per_pair

    def _rebuffer(self, start: int, capacity: int) -> None:
        """Move the used slots ``[start, length)`` to the front of fresh buffers of ``capacity`` slots."""
        rest = self.length - start
        for name in ("keys", "values", "positions"):
            buf = getattr(self, name)
            if buf is None:
                continue
            new = buf.new_empty((*buf.shape[:2], capacity, *buf.shape[3:]))
            new[:, :, :rest] = buf[:, :, start : self.length]
            setattr(self, name, new)
        self.length = rest

    def _holdings(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Every tensor the layer holds, with the bytes of its used part: the buffer's first ``length`` slots, ragged
        and encoded entries with their index metadata, counted positions, and any state a compressor keeps between
        steps (e.g. accumulated scores)."""
        if self.is_initialized:
            for t in (self.keys, self.values, self.positions if self._positions_counted else None):
                if t is not None:
                    yield t, _nbytes(t) // t.shape[2] * self.length if t.shape[2] else 0
        if self.ragged is not None:
            for t in (self.ragged.keys, self.ragged.values, *self.ragged.metadata()):
                yield t, _nbytes(t)
            if self.ragged.positions is not None and self._positions_counted:
                yield self.ragged.positions, _nbytes(self.ragged.positions)
        for seg in self.segments:
            for t in seg.tensors():
                yield t, _nbytes(t)
        for t in _state_tensors(self.state):
            yield t, _nbytes(t)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this layer holds (whole allocations)."""
        for t, _ in self._holdings():
            yield t

    def kept_bytes(self) -> int:
        return sum(used for _, used in self._holdings())

    def resident_bytes(self) -> int:
        """Bytes allocated, including the buffer's reserved headroom."""
        return sum(_nbytes(t) for t, _ in self._holdings())

    def kept_tokens(self) -> torch.Tensor:
        """Real (non-padding) tokens held per (row, KV head), as a CPU float tensor ``(batch, kv_heads)`` (from host
        metadata: no device read)."""
        if not self.is_initialized:
            return torch.zeros(0, 0, device="cpu")
        b, h = self.keys.shape[:2]
        kept = torch.full((b, h), float(self.length), device="cpu")
        if self.pristine and self.pad is not None:
            kept -= torch.tensor(self.pad, dtype=torch.float, device="cpu").unsqueeze(-1)
        kept = kept.view(-1)
        if self.ragged is not None:
            kept += torch.tensor(self.ragged.counts, dtype=torch.float, device="cpu")
        for seg in self.segments:
            kept[list(seg.pairs)] += seg.count
        return kept.view(b, h)

    @property
    def dense(self) -> bool:
        """One dense buffer of real entries, the same count for every pair (no ragged or encoded part, no left
        padding held): what a decode step can treat with host-known shapes."""
        return self.ragged is None and not self.segments and not (self.pristine and any(self.pad or ()))

    def plain_tail(self) -> int:
        """Longest run of full-precision entries at the end of any (row, head): its ragged entries plus the buffer."""
        return (max(self.ragged.counts, default=0) if self.ragged is not None else 0) + self.length

    # -- views for the compressors --------------------------------------------------------------------------
    def materialize(self, padding_valid: torch.Tensor | None) -> LayerView:
        """The layer as a rectangle ``(batch, kv_heads, n, head_dim)`` with a validity mask (entries in position order;
        encoded segments are decoded).

        padding_valid: ``(batch, length)`` bool for a pristine layer (False on left padding), from the model's mask.
        """
        b, h = self.keys.shape[:2]
        buf_k, buf_v = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        buf_pos = self.positions[:, :, : self.length] if self.positions is not None else None
        if not self.segments and self.ragged is None:
            valid = torch.ones(b, h, self.length, dtype=torch.bool, device=buf_k.device)
            if self.pristine and padding_valid is not None:
                valid &= padding_valid[:, None, : self.length]
            return LayerView(buf_k, buf_v, valid, buf_pos, ordered=self.slots_ordered)
        return self._rectangle(include_encoded=True)

    def _rectangle(self, include_encoded: bool) -> LayerView:
        """Pairs' entries (encoded blocks decoded if ``include_encoded``, ragged entries, buffer) gathered into a
        ``(batch, kv_heads, width, d)`` rectangle in position order, with a validity mask. Widths and offsets come
        from host metadata; the copy runs in a fixed number of ops per part."""
        b, h = self.keys.shape[:2]
        pairs, length = b * h, self.length
        device = self.keys.device
        before = torch.zeros(pairs, dtype=torch.long, device="cpu")  # entries per pair before the buffer
        segments = self.segments if include_encoded else []
        for seg in segments:
            before[list(seg.pairs)] += seg.count
        if self.ragged is not None:
            before += torch.tensor(self.ragged.counts, device="cpu")
        width = int(before.max()) + length if pairs else length
        keys = self.keys.new_zeros((pairs * width, self.keys.shape[-1]))
        values = self.values.new_zeros((pairs * width, self.values.shape[-1]))
        valid = torch.zeros(pairs * width, dtype=torch.bool, device=device)
        traced = self.positions is not None or (self.ragged is not None and self.ragged.positions is not None)
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
            put(ids.repeat_interleave(seg.count, output_size=ids.shape[0] * seg.count), column.flatten(),
                seg_k.reshape(-1, seg_k.shape[-1]).to(keys.dtype), seg_v.reshape(-1, seg_v.shape[-1]).to(values.dtype),
                seg.positions.flatten() if seg.positions is not None else None)
            fill.index_add_(0, ids, torch.full_like(ids, seg.count))
        if self.ragged is not None:
            pair, rank = self.ragged.entry_pairs_and_ranks()
            put(pair, fill[pair] + rank, self.ragged.keys, self.ragged.values, self.ragged.positions)
            fill += self.ragged.pages_per_pair.long() * self.ragged.page + self.ragged.tails_per_pair.long()
        if length:
            pair = torch.arange(pairs, device=device).repeat_interleave(length, output_size=pairs * length)
            column = (fill.unsqueeze(-1) + torch.arange(length, device=device)).flatten()
            put(pair, column, self.keys[:, :, :length].reshape(-1, self.keys.shape[-1]),
                self.values[:, :, :length].reshape(-1, self.values.shape[-1]),
                self.positions[:, :, :length].flatten() if self.positions is not None else None)
        return LayerView(keys.view(b, h, width, -1), values.view(b, h, width, -1), valid.view(b, h, width),
                         positions.view(b, h, width) if positions is not None else None)

    def slot_view(self) -> LayerView:
        """The dense buffer as it is stored (slot order, not position order) with its positions: what an in-place
        decode eviction scores (``ordered=False``; ranks come from the positions)."""
        b, h = self.keys.shape[:2]
        valid = torch.ones(b, h, self.length, dtype=torch.bool, device=self.keys.device)
        return LayerView(self.keys[:, :, : self.length], self.values[:, :, : self.length], valid,
                         self.positions[:, :, : self.length], ordered=False)

    def store(self, view: LayerView) -> None:
        """Replace the layer's content by the valid entries of ``view`` (in position order): uniform counts go to an
        exact-size buffer, unequal counts to the packed ragged storage. Reads the kept counts on the host (a sync:
        this runs where the kept set is decided, never on a plain decode step)."""
        keep = view.valid
        b, h, _, d_k = view.keys.shape
        d_v = view.values.shape[-1]
        counts = keep.sum(-1).flatten().cpu()  # (pairs,) on the host
        flat_k, flat_v = view.keys[keep], view.values[keep]  # pair after pair, position order within a pair
        flat_pos = None
        if view.positions is not None and self._tracks_positions:
            flat_pos = view.positions[keep].to(POSITION_DTYPE)
        self.pristine, self.slots_ordered = False, True
        self.segments, self.ragged = [], None
        if bool((counts == counts[0]).all()):
            c = int(counts[0])
            self.keys, self.values = flat_k.view(b, h, c, d_k), flat_v.view(b, h, c, d_v)
            self.length = c
            self.positions = flat_pos.view(b, h, c) if flat_pos is not None else None
            return
        self.ragged = Ragged.pack(flat_k, flat_v, flat_pos, counts)
        self.keys, self.values = view.keys.new_empty((b, h, 0, d_k)), view.values.new_empty((b, h, 0, d_v))
        self.length = 0
        self.positions = None
        if flat_pos is not None:
            self.positions = torch.empty((b, h, 0), dtype=POSITION_DTYPE, device=view.keys.device)

    def compact(self, keep: torch.Tensor, drop: int) -> None:
        """Evict in place: every pair of the dense buffer drops exactly ``drop`` of its ``length`` slots (``keep``
        ``(batch, kv_heads, length)`` False on them). The pair's surviving entries among its last ``drop`` slots move
        into the evicted slots before them, then ``length`` shrinks: ``drop`` slots copied per pair, no sync, no
        re-storing of the layer. Slots stop being in position order; ``positions`` moves along."""
        n = self.length
        device = self.keys.device
        slots = torch.arange(n, device=device)
        # the pair's evicted slots, ascending (exactly `drop` of them by the caller's contract)
        evicted = torch.topk(torch.where(keep, slots + n, slots), drop, dim=-1, largest=False, sorted=True).values
        tail = slots[n - drop :]
        # the kept slots among the last `drop`, ascending, first
        survivors = torch.sort(torch.where(keep[..., n - drop :], tail, tail + n), dim=-1).values
        moves = evicted < n - drop  # as many holes before the tail as survivors in it, matched in order
        spare = tail.expand_as(evicted)  # writes of unmatched moves land beyond the new length (harmless)
        dest = torch.where(moves, evicted, spare)
        src = torch.where(moves, survivors, spare)
        for name in ("keys", "values", "positions"):
            buf = getattr(self, name)
            if buf is None:
                continue
            index = src if buf.dim() == 3 else src.unsqueeze(-1).expand(*src.shape, buf.shape[-1])
            moved = buf[:, :, :n].gather(2, index)
            buf[:, :, :n].scatter_(2, dest if buf.dim() == 3 else dest.unsqueeze(-1).expand_as(index), moved)
        self.length = n - drop
        self.slots_ordered = self.pristine = False

    # -- hidden-axis encoding -------------------------------------------------------------------------------
    def encode(self, comp: HiddenCompressor, ctx: CompressionContext) -> bool:
        """Hand full-precision entries to a hidden-axis codec. Per (row, head) pair the plain tail keeps its newest
        ``residual_tokens``; the oldest whole ``chunk_tokens`` beyond that are encoded. Returns whether anything was."""
        residual, chunk = comp.residual_tokens(), comp.chunk_tokens()
        if self.ragged is None:
            return self._encode_buffer(comp, ctx, residual, chunk)
        # Ragged layout: each pair's plain tail is its ragged entries followed by the buffer.
        b, h = self.keys.shape[:2]
        plain = torch.tensor(self.ragged.counts, device="cpu") + self.length  # (pairs,) host
        encoded = torch.where(plain > residual, (plain - residual) // chunk * chunk, torch.zeros_like(plain))
        if not bool((encoded > 0).any()):
            return False
        view = self._rectangle(include_encoded=False)  # (b, h, width, d): plain entries in position order
        flat_k = view.keys.view(b * h, -1, view.keys.shape[-1])
        flat_v = view.values.view(b * h, -1, view.values.shape[-1])
        flat_pos = view.positions.view(b * h, -1) if view.positions is not None else None
        for count in sorted(set(encoded.tolist()) - {0}):
            pairs = (encoded == count).nonzero().flatten()  # host
            ids = pairs.to(flat_k.device)
            rows, heads = ids // h, ids % h
            pos = flat_pos[ids, :count] if flat_pos is not None and self.cache.trace else None
            block_k, block_v = flat_k[ids, :count].contiguous(), flat_v[ids, :count].contiguous()
            codec = comp.encode(block_k, block_v, ctx, rows, heads, pos)
            _add_encoded(self.segments, Segment(rows, heads, codec, count, tuple(pairs.tolist()), pos))
        rank = torch.arange(view.valid.shape[-1], device=view.valid.device)
        leftover = view.valid & (rank >= encoded.to(rank.device).view(b, h, 1))
        segments = self.segments
        self.store(LayerView(view.keys, view.values, leftover, view.positions))
        self.segments = segments
        return True

    def _encode_buffer(self, comp: HiddenCompressor, ctx: CompressionContext, residual: int, chunk: int) -> bool:
        """Uniform layout: encode the buffer's oldest whole chunks beyond the residual, for every pair at once."""
        n = (self.length - residual) // chunk * chunk if self.length > residual else 0
        if n <= 0:
            return False
        b, h = self.keys.shape[:2]
        keys = self.keys[:, :, :n].reshape(b * h, n, -1)
        values = self.values[:, :, :n].reshape(b * h, n, -1)
        if n == self.keys.shape[2] or b * h == 1:  # the reshape is a view of the buffer: the codec must own its input
            keys, values = keys.clone(), values.clone()
        pos = None
        if self.positions is not None and self.cache.trace:
            pos = self.positions[:, :, :n].reshape(b * h, n).clone()
        device = self.keys.device
        rows = torch.arange(b, device=device).repeat_interleave(h)
        heads = torch.arange(h, device=device).repeat(b)
        codec = comp.encode(keys, values, ctx, rows, heads, pos)
        _add_encoded(self.segments, Segment(rows, heads, codec, n, tuple(range(b * h)), pos))
        # The buffer now holds only the residual window: move it into a fresh buffer (exact size after prefill, the
        # usual ≤1% headroom while decoding), so the prefill-sized or pre-flush capacity is released.
        self._rebuffer(n, self.length - n + (0 if ctx.phase == "prefill" else self._headroom(leaving=n)))
        self.pristine = False
        return True

    # -- attention ------------------------------------------------------------------------------------------
    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, **kwargs
    ) -> torch.Tensor:
        """Attention of this forward's queries over everything the layer holds: ``(batch, q_len, heads, dim)``."""
        q_len = query.shape[2]
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        if self.pristine:
            return sdpa_attention_forward(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)[0]
        # Compressed: all held entries are real and precede this forward's queries, except the last q_len buffer
        # entries, which are this forward's own tokens (causal among themselves).
        causal = None
        if q_len > 1:
            causal = torch.ones(q_len, self.length, dtype=torch.bool, device=query.device).tril(self.length - q_len)
        if not self.segments and self.ragged is None:
            if q_len == 1 and query.device.type == "cpu":  # one query: two matmuls beat the CPU sdpa kernel
                return decode_attention(query, keys, values, scaling)
            mask = causal[None, None] if causal is not None else None
            return sdpa_attention_forward(module, query, keys, values, mask, scaling=scaling, is_causal=False)[0]
        return merged_attention(query, self, causal, scaling)


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


class KVCompressCache(Cache):
    """A ``Cache`` whose layers hold only what the compression pipeline kept. Create it with
    :func:`kvcompress.compress`, then pass it as ``cache`` (``past_key_values`` before transformers 5.24) to
    ``generate`` or to a forward loop."""

    def __init__(self, config: Any, compressors: list[Compressor], *, trace: bool = False, diagnostics: bool = False):
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.sliding_window = getattr(text_config, "sliding_window", None)
        self.compressors = compressors
        self.deferred = any(c.cross_layer for c in compressors)
        self.shared: dict[str, dict[str, Any]] = {}
        #: callables ``(layer_idx, probs (batch, q_heads, n), view)`` called at every decode step (q_len = 1)
        self.observers: list[Any] = []
        self._inputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.trace = trace  # keep logical positions of kept entries (a diagnostic; not counted as cache memory)
        #: selection compressors that also evict while decoding: they need each slot's position (counted)
        self.evictors = [c for c in compressors if c.axis is not Axis.HIDDEN and c.active("decode")]
        self.positions_counted = bool(self.evictors)
        # in-place eviction leaves slots out of position order: not when a codec will later encode the buffer in order
        self.evict_in_place = not any(c.axis is Axis.HIDDEN and c.active("decode") for c in compressors)
        #: opt-in diagnostics off the hot path (e.g. the reconstruction error of every hidden-axis encode)
        self.diagnostics = diagnostics
        self.enabled = True
        self.workspace = Workspace()  # scratch for reconstructing encoded blocks in attention (not cache data)
        super().__init__(layers=[KVCompressLayer(i, self) for i in range(self.num_layers)])

    # -- control --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards without compressing (e.g. append a question after compressing the context)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # -- attention entry point (called by the registered attention function) --------------------------------
    def attention(
        self,
        layer: KVCompressLayer,
        module: torch.nn.Module,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        q_len = query.shape[2]
        window = kwargs.get("sliding_window") or None
        if window is not None and layer.logical > window and not layer.pristine:
            raise KVCompressError(
                f"context of {layer.logical} tokens exceeds layer {layer.layer_idx}'s sliding window ({window}); "
                "compressing sliding-window layers beyond their window is not supported"
            )
        out = layer.attend(module, query, attention_mask, scaling, **kwargs)
        if self.observers and q_len == 1:
            self._notify(layer, query, attention_mask, scaling)
        phase = "prefill" if layer.logical == q_len else ("decode" if q_len == 1 else None)
        padding_valid = _padding_validity(attention_mask, layer.length) if phase == "prefill" else None
        if padding_valid is not None:
            layer.pad = (~padding_valid).sum(-1).tolist()
        if phase is not None and self.enabled and self.compressors:
            self._inputs = (hidden_states, out)
            try:
                if phase == "prefill":
                    self._prefill(layer, module, query, attention_mask)
                else:
                    self._decode(layer, module, query, attention_mask)
            finally:
                self._inputs = (None, None)
        return out, None

    def _context(self, layer: KVCompressLayer, comp: Compressor, module: torch.nn.Module, query: torch.Tensor, phase: str):
        return CompressionContext(
            layer_idx=layer.layer_idx,
            num_layers=self.num_layers,
            phase=phase,
            query=query,
            module=module,
            cache=self,
            state=layer.state.setdefault(comp.name, {}),
            shared=self.shared.setdefault(comp.name, {}),
            hidden_states=self._inputs[0],
            attn_output=self._inputs[1],
            decode_count=layer.length if layer.dense else None,
        )

    def _prefill(
        self, layer: KVCompressLayer, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        padding_valid = _padding_validity(attention_mask, layer.length)
        view = layer.materialize(padding_valid)
        for comp in self.compressors:
            comp.observe(view, self._context(layer, comp, module, query, "prefill"))
        if not self.deferred:
            self._apply(layer, module, query, view, "prefill")
            return
        # A cross-layer compressor needs every layer's observation: hold each layer's last queries until the last
        # layer has run, then select everywhere. Peak memory is then the uncompressed prefill cache.
        window = max(c.query_window for c in self.compressors)
        layer.pending = (module, query[:, :, -window:], padding_valid)
        if layer.layer_idx == self.num_layers - 1:
            for other in self.layers:
                if other.pending is not None:
                    mod, q, valid = other.pending
                    other.pending = None
                    self._apply(other, mod, q, other.materialize(valid), "prefill")

    def _decode(
        self, layer: KVCompressLayer, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        acting = [c for c in self.evictors
                  if c.decode_step(self._context(layer, c, module, query, "decode"))]
        if acting:
            targets = [c.decode_target(self._context(layer, c, module, query, "decode")) for c in acting]
            if self.evict_in_place and layer.dense and None not in targets:
                self._evict_in_place(layer, acting, module, query, min(targets))
            else:  # ragged or encoded layers, or a target not known on the host: re-select and re-store the layer
                view = layer.materialize(_padding_validity(attention_mask, layer.length))
                self._apply(layer, module, query, view, "decode", only=acting)
                return
        for comp in self.compressors:
            if comp.axis is Axis.HIDDEN and comp.active("decode"):
                if layer.plain_tail() >= comp.residual_tokens() + comp.chunk_tokens():
                    layer.encode(comp, self._context(layer, comp, module, query, "decode"))

    def _evict_in_place(
        self, layer: KVCompressLayer, acting: list[Compressor], module: torch.nn.Module, query: torch.Tensor,
        target: int,
    ) -> None:
        """Decode-time eviction on a dense buffer: the methods score the slots as stored (positions give the ranks),
        then every pair drops down to ``target`` entries by moving its newest entries into the evicted slots
        (:meth:`KVCompressLayer.compact`) — a few slots copied, no sync, the layer never re-stored."""
        view = layer.slot_view()
        for comp in acting:
            keep = comp.select(view, self._context(layer, comp, module, query, "decode"))
            view = LayerView(view.keys, view.values, keep, view.positions, ordered=False)
        if layer.length > target:
            layer.compact(view.valid, layer.length - target)

    def _apply(
        self, layer: KVCompressLayer, module: torch.nn.Module, query: torch.Tensor, view: LayerView, phase: str,
        only: list[Compressor] | None = None,
    ) -> None:
        """Run the selection axes in order on ``view`` (``only`` these at a decode step), store what is kept, then hand
        it to the hidden axis."""
        before = view.valid
        for comp in self.compressors:
            if comp.axis is Axis.HIDDEN or not comp.active(phase) or (only is not None and comp not in only):
                continue
            keep = comp.select(view, self._context(layer, comp, module, query, phase))
            if keep.shape != view.valid.shape or bool((keep & ~view.valid).any()):
                raise RuntimeError(f"{comp.name}.select must return a subset of the view's valid entries")
            view = LayerView(view.keys, view.values, keep, view.positions)
        hidden = [c for c in self.compressors if c.axis is Axis.HIDDEN and c.active(phase)]
        dropped = not bool(torch.equal(view.valid, before))
        padded = layer.pristine and not bool(before.all())
        if dropped or (hidden and padded) or (phase == "decode" and hidden and (layer.segments or layer.ragged)):
            layer.store(view)  # a pristine layer is left alone when nothing is dropped (identical to uncompressed)
        for comp in hidden:
            layer.encode(comp, self._context(layer, comp, module, query, phase))

    def _notify(
        self, layer: KVCompressLayer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        """Give attention observers this decode step's probabilities over the layer's entries, per query head."""
        view = layer.materialize(_padding_validity(attention_mask, layer.length))
        b, hq = query.shape[:2]
        g = hq // self.num_kv_heads
        keys = view.keys.float().repeat_interleave(g, 1)  # (b, hq, n, d)
        scores = (query.float() @ keys.transpose(-1, -2)).squeeze(2) * scaling  # (b, hq, n)
        scores = scores.masked_fill(~view.valid.repeat_interleave(g, 1), float("-inf"))
        probs = torch.softmax(scores, -1)
        for observer in self.observers:
            observer(layer.layer_idx, probs, view)

    # -- accounting -----------------------------------------------------------------------------------------
    def tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield from layer.tensors()

    def kept_bytes(self) -> int:
        """Bytes of every tensor the cache holds (used extents; index metadata included)."""
        return sum(layer.kept_bytes() for layer in self.layers)

    def resident_bytes(self) -> int:
        """Bytes allocated, including the append buffers' reserved headroom (≤ ~1% for long caches)."""
        return sum(layer.resident_bytes() for layer in self.layers)

    def dense_bytes(self) -> int:
        """What an uncompressed ``DynamicCache`` of the same run holds: every logical position (padding included)
        of every layer and KV head, keys and values, at the cache's dtype."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b = layer.keys.shape[0]
                elem = layer.keys.element_size()
                total += b * self.num_kv_heads * layer.logical * (layer.keys.shape[-1] + layer.values.shape[-1]) * elem
        return total

    def kept_tokens(self) -> list[list[float]]:
        """Mean over batch rows of the real tokens held, per layer × KV head."""
        return [layer.kept_tokens().mean(0).tolist() if layer.is_initialized else [] for layer in self.layers]

    def kept_positions(self, layer_idx: int, row: int = 0) -> list[list[int]]:
        """Logical positions held per KV head of one row (needs ``trace=True``)."""
        layer = self.layers[layer_idx]
        if not self.trace:
            raise KVCompressError("kept_positions needs a cache created with trace=True")
        view = layer.materialize(None)
        out = []
        for h in range(self.num_kv_heads):
            sel = view.valid[row, h]
            pos = view.positions[row, h][sel]
            if layer.pristine and layer.pad is not None:
                pos = pos[pos >= layer.pad[row]]
            out.append(sorted(pos.tolist()))  # slots need not be in position order (decode-time eviction)
        return out

    def bits_split(self) -> list[tuple[float, float]]:
        """Per layer, ``(fixed_bits, dtype_fraction)`` of a kept key/value element, so that
        ``effective bits = fixed_bits + dtype_fraction · 8 · dtype_bytes``.

        ``dtype_fraction`` = elements held in tensors of the cache's own dtype per kept element (full-precision
        buffers, low-rank coefficients, pruned channels: they scale with the dtype); ``fixed_bits`` = bits held in
        other dtypes per kept element (integer codes, int64 indices, float16 quantization scales/minima of a
        non-float16 cache: fixed whatever the cache dtype). Tensors are classed by dtype, so the float16 scales of
        a float16 cache count as dtype-scaled. Per element = per (kept token, d_k + d_v) of the layer. A layer
        holding no token reports ``(0, 1)`` (a dense layer of the cache dtype)."""
        out = []
        for layer in self.layers:
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

    def effective_bits(self, split: list[tuple[float, float]] | None = None) -> list[float]:
        """Per layer, the stored bits per kept key/value element, everything held included (quantization scales,
        indices, codec metadata, padding of an uncompressed batch): ``8 · kept_bytes / (kept tokens · (d_k + d_v))``
        = ``fixed_bits + dtype_fraction · 8 · dtype_bytes`` (:meth:`bits_split`). With it, kept tokens × dims ×
        bits reproduces each layer's bytes — what the latency model charges."""
        split = self.bits_split() if split is None else split
        return [fixed + frac * 8.0 * (layer.keys.element_size() if layer.is_initialized else 2)
                for (fixed, frac), layer in zip(split, self.layers)]

    def memory_report(self) -> dict[str, Any]:
        """The memory block of a results row.

        ``key_bits``/``value_bits`` are the effective bits per kept element (:meth:`effective_bits`);
        ``fixed_bits``/``dtype_fraction`` split them (:meth:`bits_split`) so that a projection onto a model of
        another dtype charges ``fixed_bits + dtype_fraction · target dtype bits``."""
        dense, kept = self.dense_bytes(), self.kept_bytes()
        first = next((layer for layer in self.layers if layer.is_initialized), None)
        split = self.bits_split()
        bits = self.effective_bits(split)
        return {
            "dense_bytes": dense,
            "kept_bytes": kept,
            "resident_bytes": self.resident_bytes(),
            "workspace_bytes": self.workspace.nbytes(),  # attention scratch, reused across steps; not cache data
            "kept_fraction": kept / dense if dense else math.nan,
            "context_tokens": first.logical if first is not None else 0,
            "dtype_bytes": first.keys.element_size() if first is not None else None,
            "kept_tokens": self.kept_tokens(),
            "key_bits": bits,  # effective (metadata included), the same for keys and values
            "value_bits": bits,
            "fixed_bits": [fixed for fixed, _ in split],  # bits in other dtypes (codes, fp16 scales, indices)
            "dtype_fraction": [frac for _, frac in split],  # cache-dtype elements per kept element
            "simulated": False,  # every byte counted here is a byte held by a tensor
        }


def _padding_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Which of the first ``length`` logical positions are real tokens, per row, from the model's mask.

    The last query row of a causal mask sees every real key up to itself; with left padding (what ``generate`` does
    for decoder-only models) that is exactly the set of non-padding positions.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    last = attention_mask[:, 0, -1, :length]
    return last if last.dtype == torch.bool else last == 0
