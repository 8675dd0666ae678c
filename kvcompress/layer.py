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

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import encoding, reindex, views
from .attention import decode_attention, merged_attention
from .compressor import CompressionContext, HiddenCompressor, LayerView
from .errors import KVCompressError
from .ragged import Ragged
from .storage import POSITION_DTYPE, Segment, nbytes, state_tensors

if TYPE_CHECKING:
    from .cache import KVCompressCache

_ACTIVE = threading.local()  # the layer whose `update` ran last: the attention call that follows belongs to it


def active_layer() -> KVCompressLayer | None:
    return getattr(_ACTIVE, "layer", None)


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
        self.compressed_at = 0  # logical length when the layer's content was last selected (store / compact)
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
        b, h, _, d = key_states.shape
        cache = self.cache
        if cache is not None and (h, d) != (cache.num_kv_heads, cache.head_dim):
            raise KVCompressError(
                f"layer {self.layer_idx} got keys of {h} KV heads x head_dim {d}, but the cache was built for "
                f"{cache.num_kv_heads} KV heads x head_dim {cache.head_dim} ({cache.num_layers} layers); "
                "valid: a cache from kvcompress.compress(model, ...) for the model it is used with"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        if self._tracks_positions:
            self.positions = torch.empty((b, h, 0), dtype=POSITION_DTYPE, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        cache = self.cache
        if cache is not None:
            self._check_use(cache, key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        self._returned_key = keys
        _ACTIVE.layer = self
        if cache is not None:
            cache._last_updated = self
        return keys, values

    def _check_use(self, cache: KVCompressCache, key_states: torch.Tensor) -> None:
        """Refuse API misuse before anything is stored (host metadata only: no device read on the decode path).

        * The attention of the previously updated layer never went through ``kvcompress_attention`` (which consumes
          ``_returned_key``): the model was never attached, so nothing would be compressed.
        * Keys of another layout than the buffer's (another model, or another batch size).
        * Layer 0 updated again while the cache's last layer is behind it: the model has fewer layers than the cache.
        * A second multi-token forward on a compressing cache: its tokens would be stored uncompressed.
        """
        last = cache._last_updated
        if last is not None and last._returned_key is not None:
            raise KVCompressError(
                f"layer {last.layer_idx}'s attention did not go through kvcompress (the model was never attached: "
                "it ran stock attention and nothing was compressed); valid: create the cache with "
                "kvcompress.compress(model, ...) for THIS model, or call kvcompress.attach(model) first"
            )
        if not self.logical:
            return
        held, got = self.keys.shape, key_states.shape
        if got[:2] != held[:2] or got[-1] != held[-1]:
            raise KVCompressError(
                f"layer {self.layer_idx} holds {held[0]} rows x {held[1]} KV heads x head_dim {held[-1]} but got keys "
                f"of {got[0]} rows x {got[1]} KV heads x head_dim {got[-1]}; valid: the same batch on a cache from "
                "kvcompress.compress(model, ...) for the model it is used with"
            )
        if self.layer_idx == 0 and cache.layers[-1].logical != self.logical:
            raise KVCompressError(
                f"layer 0 has seen {self.logical} positions but the cache's last layer ({cache.num_layers - 1}) "
                f"{cache.layers[-1].logical}: the model has fewer layers than the {cache.num_layers} the cache was "
                "built for, or a forward failed midway; valid: a fresh kvcompress.compress(model, ...) cache for "
                "this model"
            )
        n = key_states.shape[-2]
        if n > 1 and cache.enabled and cache.compressors:
            raise KVCompressError(
                f"a second multi-token forward: the cache already holds a prompt of {self.logical} positions and got "
                f"{n} new tokens, which would be stored uncompressed; valid: a fresh kvcompress.compress(...) cache "
                "per prompt (a new prompt), or `with cache.paused():` to append them uncompressed (a continuation: "
                "multi-turn, chunked prefill, a question after a compressed context)"
            )

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
        self.compressed_at = 0
        self.pending = self._returned_key = None

    def croppable(self, max_length: int) -> str | None:
        """Why :meth:`crop` to ``max_length`` is impossible, or None (:func:`kvcompress.reindex.croppable`)."""
        return reindex.croppable(self, max_length)

    def crop(self, max_length: int) -> None:
        """``DynamicCache.crop``: keep the first ``max_length`` positions (:func:`kvcompress.reindex.crop`)."""
        reindex.crop(self, max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows ``indices`` of the layer, in that order (:func:`kvcompress.reindex.batch_select_indices`)."""
        reindex.batch_select_indices(self, indices)

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
                    yield t, nbytes(t) // t.shape[2] * self.length if t.shape[2] else 0
        if self.ragged is not None:
            for t in (self.ragged.keys, self.ragged.values, *self.ragged.metadata()):
                yield t, nbytes(t)
            if self.ragged.positions is not None and self._positions_counted:
                yield self.ragged.positions, nbytes(self.ragged.positions)
        for seg in self.segments:
            for t in seg.tensors():
                yield t, nbytes(t)
        for t in state_tensors(self.state):
            yield t, nbytes(t)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this layer holds (whole allocations)."""
        for t, _ in self._holdings():
            yield t

    def kept_bytes(self) -> int:
        return sum(used for _, used in self._holdings())

    def resident_bytes(self) -> int:
        """Bytes allocated, including the buffer's reserved headroom."""
        return sum(nbytes(t) for t, _ in self._holdings())

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
        """The layer as a position-ordered rectangle with a validity mask (:func:`kvcompress.views.materialize`)."""
        return views.materialize(self, padding_valid)

    def slot_view(self) -> LayerView:
        """The dense buffer as stored, for eviction in place (:func:`kvcompress.views.slot_view`)."""
        return views.slot_view(self)

    def encode(self, comp: HiddenCompressor, ctx: CompressionContext) -> bool:
        """Hand full-precision entries to a hidden-axis codec (:func:`kvcompress.encoding.encode`)."""
        return encoding.encode(self, comp, ctx)

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
        self.compressed_at = self.logical
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
        self.compressed_at = self.logical

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
