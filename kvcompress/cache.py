"""A transformers ``Cache`` whose layers physically hold only what the compressors kept.

Layout of one :class:`KVCompressLayer`:

* ``keys`` / ``values`` — a dense append buffer ``(batch, kv_heads, capacity, head_dim)``, of which the first
  ``length`` slots are used. Decoding appends into spare capacity (no per-step copy of the layer, unlike the stock
  ``DynamicLayer``'s ``torch.cat``); when it is full it grows by 1/128 of the layer's held bytes (at least one slot),
  so the reserved-but-unused part stays under 1% of what the layer holds. Right after a compression the buffer is
  allocated to the exact size.
* ``segments`` — ragged storage for when rows or KV heads keep different numbers of tokens: each
  :class:`Segment` holds the (row, head) pairs that keep the same count ``c``, as ``(pairs, c, head_dim)`` tensors.
  Nothing is padded, so the bytes held are the bytes kept. A hidden codec's block flushed while decoding is joined
  to the same pairs' previous block (codec ``concat``): one copy of the encoded layer per flush (every ``chunk``
  steps), so attention loops over one block per pair group however long the generation.

A layer is *pristine* until its first compression: the buffer then holds every logical position (left padding
included, as ``DynamicCache`` does) and attention is the stock sdpa path with the model's own mask, so an
uncompressed run is numerically the stock one. After a compression the layer holds only real, kept tokens in
position order (segments first, then the buffer), and attention is computed here: one sdpa call when the layer is
uniform, otherwise an exact log-sum-exp merge over segments and buffer.

Logical length (positions seen, what ``get_seq_length`` reports, what RoPE of the next token depends on) and
physical length (entries stored) are kept apart, so positions stay right under ``generate()`` and in a manual loop
without ``position_ids``.
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

from .compressor import Axis, Codec, CompressionContext, Compressor, HiddenCompressor, LayerView, Workspace
from .errors import KVCompressError

_ACTIVE = threading.local()  # the layer whose `update` ran last: the attention call that follows belongs to it


def active_layer() -> KVCompressLayer | None:
    return getattr(_ACTIVE, "layer", None)


@dataclass
class Segment:
    """KV entries of the (row, head) pairs ``(rows[i], heads[i])``, each holding ``count`` tokens.

    Stored either in full precision (``keys``/``values``) or encoded by a hidden-axis codec (``codec``). A pair may
    appear in several segments; for each pair, segments are in position order (older first), then the buffer.
    """

    rows: torch.Tensor  # (pairs,) long
    heads: torch.Tensor  # (pairs,) long
    keys: torch.Tensor | None  # (pairs, count, head_dim), None when encoded
    values: torch.Tensor | None
    positions: torch.Tensor | None = None  # (pairs, count) — only with cache.trace (diagnostic, not counted)
    codec: Codec | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if self.keys is not None:
            self.count = self.keys.shape[1]

    def kv(self, workspace: Workspace | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values (decoded on the fly if encoded, into ``workspace`` if given), in ``dtype``
        (default: as stored)."""
        if self.codec is not None:
            return self.codec.decode(workspace, dtype)
        if dtype is None:
            return self.keys, self.values
        return self.keys.to(dtype), self.values.to(dtype)

    def joined(self, later: Segment) -> Segment | None:
        """This encoded segment followed by ``later`` (same pairs, encoded by a codec that can ``concat``) as one
        segment, or None when they cannot be joined."""
        if (
            self.codec is None
            or later.codec is None
            or not hasattr(self.codec, "concat")
            or type(self.codec) is not type(later.codec)
            or (self.positions is None) != (later.positions is None)
            or not torch.equal(self.rows, later.rows)
            or not torch.equal(self.heads, later.heads)
        ):
            return None
        codec = self.codec.concat(later.codec)
        if codec is None:
            return None
        positions = torch.cat([self.positions, later.positions], 1) if self.positions is not None else None
        return Segment(self.rows, self.heads, None, None, positions, codec=codec, count=self.count + later.count)

    def tensors(self) -> list[torch.Tensor]:
        payload = self.codec.tensors() if self.codec is not None else [self.keys, self.values]
        return [self.rows, self.heads, *payload]


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

    def __init__(self, layer_idx: int, cache: KVCompressCache):
        super().__init__()
        self.layer_idx = layer_idx
        self.cache = cache
        self.length = 0  # used slots of the buffer
        self.logical = 0  # positions seen (includes left padding, like DynamicCache)
        self.pristine = True
        self.segments: list[Segment] = []
        self.pad: list[int] | None = None  # left-padding per row, from the prefill mask
        self.positions: torch.Tensor | None = None  # buffer positions (batch, kv_heads, capacity), trace only
        self.state: dict[str, Any] = {}
        self.pending: tuple[Any, ...] | None = None  # deferred prefill selection (cross-layer compressors)
        self._returned_key: torch.Tensor | None = None

    # -- CacheLayerMixin ------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        start = self.logical
        self._append(key_states, value_states)
        self.logical += n
        if self.positions is not None or (self.cache.trace and self.pristine):
            self._append_positions(start, n)
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
        self.pristine, self.segments, self.pad, self.positions, self.state = True, [], None, None, {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.segments:
            raise KVCompressError("beam search / batch re-indexing is not supported on a ragged compressed layer")
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            if self.positions is not None:
                self.positions = self.positions[indices]
            if self.pad is not None:
                self.pad = [self.pad[int(i)] for i in indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    # -- storage --------------------------------------------------------------------------------------------
    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[-2]
        need = self.length + n
        if need > self.keys.shape[-2]:
            # Exact size for a first fill (prefill), headroom once we are appending (decode).
            self._rebuffer(0, need if self.length == 0 else need + self._headroom())
        self.keys[:, :, self.length : need] = k
        self.values[:, :, self.length : need] = v
        self.length = need

    def _headroom(self, leaving: int = 0) -> int:
        """Spare buffer slots to reserve when growing: under 1% of what the layer holds (at least one slot), so
        resident bytes stay within 1% of kept bytes while a regrow (a copy of the buffer) happens once every
        ~1/128 of the layer's size in appended tokens. ``leaving``: used buffer slots about to be dropped."""
        b, h = self.keys.shape[:2]
        slot = b * h * (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()
        return max(1, (self.kept_bytes() - leaving * slot) // 128 // slot)

    def _rebuffer(self, start: int, capacity: int) -> None:
        """Move the used slots ``[start, length)`` to the front of fresh buffers of ``capacity`` slots."""
        rest = self.length - start
        for name in ("keys", "values"):
            buf = getattr(self, name)
            new = buf.new_empty((*buf.shape[:2], capacity, buf.shape[-1]))
            new[:, :, :rest] = buf[:, :, start : self.length]
            setattr(self, name, new)
        self.length = rest

    def _append_positions(self, start: int, n: int) -> None:
        b, h = self.keys.shape[:2]
        new = torch.arange(start, start + n, device=self.keys.device).expand(b, h, n)
        old = self.positions[:, :, : self.length - n] if self.positions is not None else new[:, :, :0]
        self.positions = torch.cat([old, new], dim=-1)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this layer holds, cut to its used extent: keys, values, segment indices and any state a
        compressor keeps between steps (e.g. accumulated scores)."""
        if self.is_initialized:
            yield self.keys[:, :, : self.length]
            yield self.values[:, :, : self.length]
        for seg in self.segments:
            yield from seg.tensors()
        yield from _state_tensors(self.state)

    def kept_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors())

    def resident_bytes(self) -> int:
        """Bytes allocated, including the buffer's reserved headroom."""
        total = sum(_nbytes(t) for seg in self.segments for t in seg.tensors())
        total += sum(_nbytes(t) for t in _state_tensors(self.state))
        if self.is_initialized:
            total += _nbytes(self.keys) + _nbytes(self.values)
        return total

    def kept_tokens(self) -> torch.Tensor:
        """Real (non-padding) tokens held per (row, KV head), as a float tensor ``(batch, kv_heads)``."""
        if not self.is_initialized:
            return torch.zeros(0, 0)
        b, h = self.keys.shape[:2]
        kept = torch.full((b, h), float(self.length))
        if self.pristine and self.pad is not None:
            kept -= torch.tensor(self.pad, dtype=torch.float).unsqueeze(-1)
        for seg in self.segments:
            kept[seg.rows, seg.heads] += seg.count
        return kept

    # -- views for the compressors --------------------------------------------------------------------------
    def materialize(self, padding_valid: torch.Tensor | None) -> LayerView:
        """The layer as a rectangle ``(batch, kv_heads, n, head_dim)`` with a validity mask (entries in position order;
        encoded segments are decoded).

        padding_valid: ``(batch, length)`` bool for a pristine layer (False on left padding), from the model's mask.
        """
        b, h = self.keys.shape[:2]
        buf_k, buf_v = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        buf_valid = torch.ones(b, h, self.length, dtype=torch.bool, device=self.keys.device)
        if self.pristine and padding_valid is not None:
            buf_valid &= padding_valid[:, None, : self.length]
        buf_pos = self.positions[:, :, : self.length] if self.positions is not None else None
        if not self.segments:
            return LayerView(buf_k, buf_v, buf_valid, buf_pos)
        fill = torch.zeros(b, h, dtype=torch.long)
        for seg in self.segments:
            fill[seg.rows, seg.heads] += seg.count
        width = int(fill.max()) + self.length
        keys = buf_k.new_zeros((b, h, width, buf_k.shape[-1]))
        values = buf_v.new_zeros((b, h, width, buf_v.shape[-1]))
        valid = torch.zeros(b, h, width, dtype=torch.bool, device=buf_k.device)
        positions = torch.full((b, h, width), -1, dtype=torch.long) if getattr(self.cache, "trace", False) else None
        fill.zero_()

        def put(rows, heads, k, v, pos):
            idx = fill[rows, heads].unsqueeze(-1) + torch.arange(k.shape[1])
            r, hh = rows.unsqueeze(-1), heads.unsqueeze(-1)
            keys[r, hh, idx], values[r, hh, idx], valid[r, hh, idx] = k, v, True
            if positions is not None and pos is not None:
                positions[r, hh, idx] = pos
            fill[rows, heads] += k.shape[1]

        for seg in self.segments:
            seg_k, seg_v = seg.kv()
            put(seg.rows, seg.heads, seg_k, seg_v, seg.positions)
        if self.length:
            rows = torch.arange(b).repeat_interleave(h)
            heads = torch.arange(h).repeat(b)
            put(rows, heads, buf_k.reshape(b * h, self.length, -1), buf_v.reshape(b * h, self.length, -1),
                buf_pos.reshape(b * h, -1) if buf_pos is not None else None)
        return LayerView(keys, values, valid, positions)

    def store(self, view: LayerView) -> None:
        """Replace the layer's content by the valid entries of ``view``: uniform counts go to an exact-size buffer,
        unequal counts to ragged segments."""
        keep = view.valid
        counts = keep.sum(-1)  # (batch, kv_heads)
        b, h, _, d_k = view.keys.shape
        d_v = view.values.shape[-1]
        nz = keep.nonzero()  # sorted by (row, head, position): position order is preserved
        flat_k = view.keys[nz[:, 0], nz[:, 1], nz[:, 2]]
        flat_v = view.values[nz[:, 0], nz[:, 1], nz[:, 2]]
        flat_pos = view.positions[nz[:, 0], nz[:, 1], nz[:, 2]] if view.positions is not None else None
        self.pristine = False
        self.segments = []
        if bool((counts == counts.flatten()[0]).all()):
            c = int(counts.flatten()[0])
            self.keys = flat_k.reshape(b, h, c, d_k).contiguous()
            self.values = flat_v.reshape(b, h, c, d_v).contiguous()
            self.length = c
            self.positions = flat_pos.reshape(b, h, c) if flat_pos is not None else None
            return
        flat_counts = counts.flatten()
        offsets = torch.cumsum(flat_counts, 0) - flat_counts
        for c in sorted(set(flat_counts.tolist())):
            if c == 0:
                continue
            pairs = (flat_counts == c).nonzero().squeeze(-1)
            idx = (offsets[pairs].unsqueeze(-1) + torch.arange(c)).flatten()
            self.segments.append(
                Segment(
                    rows=pairs // h,
                    heads=pairs % h,
                    keys=flat_k[idx].reshape(len(pairs), c, d_k),
                    values=flat_v[idx].reshape(len(pairs), c, d_v),
                    positions=flat_pos[idx].reshape(len(pairs), c) if flat_pos is not None else None,
                )
            )
        self.keys = view.keys.new_empty((b, h, 0, d_k))
        self.values = view.values.new_empty((b, h, 0, d_v))
        self.length = 0
        self.positions = view.keys.new_empty((b, h, 0), dtype=torch.long) if flat_pos is not None else None

    def plain_tail(self) -> int:
        """Longest run of full-precision entries at the end of any (row, head): its plain segment plus the buffer."""
        return max((s.count for s in self.segments if s.codec is None), default=0) + self.length

    def encode(self, comp: HiddenCompressor, ctx: CompressionContext) -> bool:
        """Hand full-precision entries to a hidden-axis codec. Per (row, head) pair the plain tail keeps its newest
        ``residual_tokens``; the oldest whole ``chunk_tokens`` beyond that are encoded. Returns whether anything was."""
        residual, chunk = comp.residual_tokens(), comp.chunk_tokens()
        if not any(s.codec is None for s in self.segments):
            return self._encode_buffer(comp, ctx, residual, chunk)
        # Ragged layout: each pair's tail is its plain segment (at most one, its newest) followed by the buffer.
        b, h = self.keys.shape[:2]
        t = self.length
        covered = torch.zeros(b, h, dtype=torch.bool)
        groups = []
        for seg in self.segments:
            if seg.codec is None:
                covered[seg.rows, seg.heads] = True
                groups.append((seg.rows, seg.heads, seg.keys, seg.values, seg.positions))
        rest = (~covered).nonzero()
        if len(rest) and t:
            empty_pos = torch.empty(len(rest), 0, dtype=torch.long) if self.positions is not None else None
            groups.append((rest[:, 0], rest[:, 1], self.keys.new_empty(len(rest), 0, self.keys.shape[-1]),
                           self.values.new_empty(len(rest), 0, self.values.shape[-1]), empty_pos))
        segments = [s for s in self.segments if s.codec is not None]
        changed = False
        for rows, heads, k, v, pos in groups:
            if t:  # move this pair group's buffer entries into its tail
                k = torch.cat([k, self.keys[rows, heads, :t]], 1)
                v = torch.cat([v, self.values[rows, heads, :t]], 1)
                if pos is not None and self.positions is not None:
                    pos = torch.cat([pos, self.positions[rows, heads, :t]], 1)
            total = k.shape[1]
            n = (total - residual) // chunk * chunk if total > residual else 0
            if n:
                codec = comp.encode(k[:, :n].contiguous(), v[:, :n].contiguous(), ctx, rows, heads,
                                    pos[:, :n] if pos is not None else None)
                _add_encoded(segments, Segment(rows, heads, None, None, pos[:, :n] if pos is not None else None,
                                               codec=codec, count=n), h)
                changed = True
            if total > n:
                segments.append(Segment(rows, heads, k[:, n:].contiguous(), v[:, n:].contiguous(),
                                        pos[:, n:] if pos is not None else None))
        self.segments = segments
        self._rebuffer(self.length, 0)  # the buffer's entries now live in the segments: release it
        if self.positions is not None:
            self.positions = self.positions[:, :, :0]
        self.pristine = False
        return changed

    def _encode_buffer(self, comp: HiddenCompressor, ctx: CompressionContext, residual: int, chunk: int) -> bool:
        """Uniform layout: encode the buffer's oldest whole chunks beyond the residual, for every pair at once."""
        n = (self.length - residual) // chunk * chunk if self.length > residual else 0
        if n <= 0:
            return False
        b, h = self.keys.shape[:2]
        keys = self.keys[:, :, :n].reshape(b * h, n, -1)
        values = self.values[:, :, :n].reshape(b * h, n, -1)
        if keys.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr():
            keys, values = keys.clone(), values.clone()  # the codec must not hold a view of the buffer
        pos = self.positions[:, :, :n].reshape(b * h, n) if self.positions is not None else None
        rows, heads = torch.arange(b).repeat_interleave(h), torch.arange(h).repeat(b)
        codec = comp.encode(keys, values, ctx, rows, heads, pos)
        _add_encoded(self.segments, Segment(rows, heads, None, None, pos, codec=codec, count=n), h)
        if self.positions is not None:
            self.positions = self.positions[:, :, n : self.length].clone()
        # The buffer now holds only the residual window: move it into a fresh buffer (exact size after prefill, the
        # usual ≤1% headroom while decoding), so the prefill-sized or pre-flush capacity is released.
        self._rebuffer(n, self.length - n + (0 if ctx.phase == "prefill" else self._headroom(leaving=n)))
        self.pristine = False
        return True

    # -- attention ------------------------------------------------------------------------------------------
    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, **kwargs
    ) -> torch.Tensor:
        """Attention of this forward's queries over everything the layer holds; returns ``(batch, q_len, heads, dim)``."""
        q_len = query.shape[2]
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        if self.pristine:
            return sdpa_attention_forward(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)[0]
        # Compressed: all held entries are real and precede this forward's queries, except the last q_len buffer
        # entries, which are this forward's own tokens (causal among themselves).
        causal = None
        if q_len > 1:
            causal = torch.ones(q_len, self.length, dtype=torch.bool, device=query.device).tril(self.length - q_len)
        if not self.segments:
            if q_len == 1:  # one query: two matmuls read K and V faster than the CPU sdpa kernel does
                return _decode_attention(query, keys, values, scaling)
            mask = causal[None, None] if causal is not None else None
            return sdpa_attention_forward(module, query, keys, values, mask, scaling=scaling, is_causal=False)[0]
        return _merged_attention(query, self.segments, keys, values, causal, scaling, self.cache.workspace)


def _add_encoded(segments: list[Segment], seg: Segment, kv_heads: int) -> None:
    """Append an encoded segment, joined to its pairs' previous block when that block is the newest segment holding
    any of these pairs and covers exactly the same pairs (position order per pair is kept)."""
    ids = seg.rows * kv_heads + seg.heads
    for i in range(len(segments) - 1, -1, -1):
        other = segments[i]
        if bool(torch.isin(other.rows * kv_heads + other.heads, ids).any()):
            joined = other.joined(seg)
            if joined is not None:
                segments[i] = joined
                return
            break
    segments.append(seg)


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Single-query attention ``softmax(q·Kᵀ·s)·V`` with GQA by grouping the query heads of each KV head."""
    b, hq, _, d = query.shape
    h = keys.shape[1]
    q = query.reshape(b, h, hq // h, d)  # query head h*g + j serves KV head h (as repeat_kv)
    probs = torch.softmax((q @ keys.transpose(-1, -2)).float() * scaling, dim=-1).to(values.dtype)
    return (probs @ values).reshape(b, hq, 1, -1).transpose(1, 2)


def _merged_attention(
    query: torch.Tensor,
    segments: list[Segment],
    buf_k: torch.Tensor,
    buf_v: torch.Tensor,
    causal: torch.Tensor | None,
    scaling: float,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Exact softmax attention over ragged segments plus the dense buffer, merged by log-sum-exp (fp32). Encoded
    segments are attended through their codec's ``scores``/``mix`` when it has them, otherwise reconstructed one at a
    time into ``workspace``."""
    b, hq, q_len, d = query.shape
    h = buf_k.shape[1]
    g = hq // h
    q = query.float().reshape(b, h, g * q_len, d)  # query head h*g + j serves KV head h (as repeat_kv)
    run_max = torch.full((b, h, g * q_len), float("-inf"), device=query.device)
    run_sum = torch.zeros(b, h, g * q_len, device=query.device)
    run_out = torch.zeros(b, h, g * q_len, buf_v.shape[-1], device=query.device)

    def merge(scores: torch.Tensor, mix: Any, rows: Any, heads: Any) -> None:
        blk_max = scores.amax(-1)
        safe = torch.where(torch.isfinite(blk_max), blk_max, torch.zeros_like(blk_max))
        p = torch.exp(scores - safe.unsqueeze(-1))
        old_max = run_max[rows, heads]
        new_max = torch.maximum(old_max, blk_max)
        new_safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        a_old = torch.exp(old_max - new_safe)
        a_blk = torch.exp(safe - new_safe)
        run_sum[rows, heads] = run_sum[rows, heads] * a_old + p.sum(-1) * a_blk
        run_out[rows, heads] = run_out[rows, heads] * a_old.unsqueeze(-1) + mix(p) * a_blk.unsqueeze(-1)
        run_max[rows, heads] = new_max

    for seg in segments:
        qs = q[seg.rows, seg.heads]  # (pairs, g*q_len, d)
        if seg.codec is not None and hasattr(seg.codec, "scores"):
            codec = seg.codec
            merge(codec.scores(qs, workspace) * scaling, lambda p: codec.mix(p, workspace), seg.rows, seg.heads)
            continue
        seg_k, seg_v = seg.kv(workspace, torch.float32)  # reconstructed here, one segment at a time
        merge((qs @ seg_k.transpose(-1, -2)) * scaling, lambda p: p @ seg_v, seg.rows, seg.heads)
    if buf_k.shape[-2] > 0:
        scores = (q @ buf_k.float().transpose(-1, -2)) * scaling  # (b, h, g*q_len, n)
        if causal is not None:
            scores = scores.view(b, h, g, q_len, -1).masked_fill(~causal, float("-inf")).view(b, h, g * q_len, -1)
        merge(scores, lambda p: p @ buf_v.float(), slice(None), slice(None))
    out = run_out / run_sum.unsqueeze(-1)
    return out.view(b, hq, q_len, -1).transpose(1, 2).to(query.dtype)


class KVCompressCache(Cache):
    """A ``Cache`` whose layers hold only what the compression pipeline kept. Create it with
    :func:`kvcompress.compress`, then pass it as ``cache`` (``past_key_values`` before transformers 5.24) to
    ``generate`` or to a forward loop."""

    def __init__(self, config: Any, compressors: list[Compressor], *, trace: bool = False):
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
        if any(c.axis is not Axis.HIDDEN and c.active("decode") for c in self.compressors):
            view = layer.materialize(_padding_validity(attention_mask, layer.length))
            self._apply(layer, module, query, view, "decode")
            return
        for comp in self.compressors:
            if comp.axis is Axis.HIDDEN and comp.active("decode"):
                if layer.plain_tail() >= comp.residual_tokens() + comp.chunk_tokens():
                    layer.encode(comp, self._context(layer, comp, module, query, "decode"))

    def _apply(
        self, layer: KVCompressLayer, module: torch.nn.Module, query: torch.Tensor, view: LayerView, phase: str
    ) -> None:
        """Run the selection axes in order on ``view``, store what is kept, then hand it to the hidden axis."""
        before = view.valid
        for comp in self.compressors:
            if comp.axis is Axis.HIDDEN or not comp.active(phase):
                continue
            keep = comp.select(view, self._context(layer, comp, module, query, phase))
            if keep.shape != view.valid.shape or bool((keep & ~view.valid).any()):
                raise RuntimeError(f"{comp.name}.select must return a subset of the view's valid entries")
            view = LayerView(view.keys, view.values, keep, view.positions)
        hidden = [c for c in self.compressors if c.axis is Axis.HIDDEN and c.active(phase)]
        dropped = not bool(torch.equal(view.valid, before))
        padded = layer.pristine and not bool(before.all())
        if dropped or (hidden and padded) or (phase == "decode" and hidden and layer.segments):
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
        if layer.positions is None and not any(s.positions is not None for s in layer.segments):
            raise KVCompressError("kept_positions needs a cache created with trace=True")
        view = layer.materialize(None)
        out = []
        for h in range(self.num_kv_heads):
            sel = view.valid[row, h]
            pos = view.positions[row, h][sel]
            if layer.pristine and layer.pad is not None:
                pos = pos[pos >= layer.pad[row]]
            out.append(pos.tolist())
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
            for t in layer.tensors():
                if t.dtype == dtype:
                    own += _nbytes(t)
                else:
                    other += _nbytes(t)
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
