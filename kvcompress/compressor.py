"""The compressor interface, the method registry and the shared budget/selection helpers.

A compressor acts on one axis of the KV cache:

* ``layer``  — which layers keep their full context (others keep a small window);
* ``head``   — which KV heads keep their full context;
* ``token``  — which positions each KV head keeps (eviction, merging);
* ``hidden`` — how each kept vector is stored (bits, rank, channels).

``ratio`` is always the fraction **kept** along the compressor's axis (1.0 = nothing dropped). NVIDIA kvpress's
``compression_ratio`` is the fraction *removed*: kvpress ``compression_ratio=0.75`` is our ``ratio=0.25``.

Selection compressors (layer, head, token axes) see a :class:`LayerView` of one layer — the keys and values the
cache currently holds for it, with a validity mask — and return the subset to keep. They run after the prefill
forward of that layer (and, for methods that define it, during decoding), so the model's own attention over the
full prompt is untouched; only what is stored for later steps shrinks.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import KVCompressError, check_budget_fields, check_positive_int, check_ratio, unknown_choice


class Axis(str, enum.Enum):
    LAYER = "layer"
    HEAD = "head"
    TOKEN = "token"
    HIDDEN = "hidden"


#: the two phases of a generation: the prompt's forward, then one token at a time
PHASES = ("prefill", "decode")

#: Composition order: each later compressor works on what the earlier ones kept.
AXIS_ORDER: tuple[Axis, ...] = (Axis.LAYER, Axis.HEAD, Axis.TOKEN, Axis.HIDDEN)


@dataclass
class LayerView:
    """What one layer currently holds, padded to a rectangle for scoring.

    keys, values: ``(batch, kv_heads, n, head_dim)``; valid: ``(batch, kv_heads, n)`` bool — False for left padding,
    for the rectangle's filler and for entries an earlier compressor dropped. Entries are in position order, unless
    ``ordered`` is False: then they are in the order of the cache's slots (a decode-time eviction in place scores the
    buffer as it is stored) and ``positions`` gives the order — :meth:`rank` and the selection helpers use it.
    positions: logical positions ``(batch, kv_heads, n)`` when known (always for a layer that was never compressed).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor | None = None
    ordered: bool = True

    def order(self) -> torch.Tensor:
        """The permutation ``(batch, kv_heads, n)`` that puts each (row, head)'s valid entries in position order
        (invalid entries last): ``x.gather(-1, view.order())`` is ``x`` in position order."""
        if self.ordered:
            return torch.arange(self.valid.shape[-1], device=self.valid.device).expand_as(self.valid)
        last = torch.iinfo(self.positions.dtype).max
        return torch.argsort(self.positions.masked_fill(~self.valid, last), dim=-1, stable=True)

    @property
    def counts(self) -> torch.Tensor:
        """Valid entries per (row, head): ``(batch, kv_heads)``."""
        return self.valid.sum(-1)

    def rank(self) -> torch.Tensor:
        """Rank of each entry among the valid entries of its (row, head), 0-based; −1 where invalid.

        Ranks make methods independent of padding and of the other rows of a batch: a row's sink is its first
        real token whatever its left padding.
        """
        if self.ordered:
            return torch.where(self.valid, self.valid.long().cumsum(-1) - 1, -1)
        order = self.order()
        slots = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        return torch.where(self.valid, torch.empty_like(order).scatter_(-1, order, slots), -1)


@dataclass
class CompressionContext:
    """What a compressor may use besides the layer's keys and values.

    query: the post-RoPE queries of the forward that just ran, ``(batch, q_heads, q_len, head_dim)`` — at prefill
    these are the prompt's queries, so a scorer takes its observation window as ``query[:, :, -w:]`` without any
    recomputation and without materialising full attention. When a cross-layer compressor defers selection to the
    end of the prefill, :meth:`Compressor.select` sees only the last ``query_window`` queries; work that needs every
    prompt query belongs in :meth:`Compressor.observe`, which always sees them all.
    state: per-layer, per-compressor scratch space persisting across steps (tensors in it count as cache memory).
    shared: per-compressor space shared by all layers (e.g. per-layer importance scores for a layer-axis method, or
    what one layer leaves for another): a compressor sees its own layer and this, never the cache.
    hidden_states: the attention block's input ``(batch, q_len, hidden)`` and attn_output its output before
    ``o_proj`` ``(batch, q_len, q_heads, head_dim)`` — available in :meth:`Compressor.observe` (and in an immediate,
    non-deferred select), None otherwise.
    """

    layer_idx: int
    num_layers: int
    phase: str  # "prefill" or "decode"
    query: torch.Tensor
    module: torch.nn.Module
    num_kv_heads: int
    state: dict[str, Any]
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    hidden_states: torch.Tensor | None = None
    attn_output: torch.Tensor | None = None
    #: at a decode step, the entries every (row, head) holds when the layer is one dense buffer (host int), else None
    decode_count: int | None = None
    #: the cache was created with ``diagnostics=True`` (opt-in measurements off the hot path)
    diagnostics: bool = False

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.num_kv_heads

    @property
    def scaling(self) -> float:
        return float(getattr(self.module, "scaling", self.query.shape[-1] ** -0.5))


@dataclass
class Compressor:
    """Base class: hyperparameters are dataclass fields with defaults, validated in ``__post_init__``.

    Subclasses set ``name`` and ``axis`` and implement :meth:`select` (layer/head/token axes).
    """

    name: ClassVar[str] = ""
    axis: ClassVar[Axis | None] = None
    #: what the method keeps, in a phrase, and its paper (the README's method table is generated from these)
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: when the compressor acts while decoding: "never" (prefill only), "always" (a hidden codec flushing as the cache
    #: grows) or "optional" (its ``phase`` field chooses: "decode" keeps the cache within budget while generating)
    decode_phase: ClassVar[str] = "never"
    #: True if selecting for one layer needs every layer's observation (then all selection waits for the last layer)
    cross_layer: ClassVar[bool] = False
    #: prompt queries :meth:`select` needs when selection is deferred to the end of the prefill
    query_window: ClassVar[int] = 64

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(self)}
        if "ratio" in fields:
            self.ratio = check_ratio(self.ratio)
        if "budget" in fields and self.budget is not None:
            self.budget = check_positive_int(self.budget, "budget")
        check_budget_fields(self)
        if "phase" in fields:
            if self.phase not in PHASES:
                raise unknown_choice("phase", self.phase, PHASES)
            if self.phase == "decode" and self.decode_phase != "optional":
                raise KVCompressError(f"phase='decode' is not defined for {self.name}; valid: prefill")

    @property
    def adaptive(self) -> bool:
        """Whether kept counts may differ from the uniform per-head budget (per-head or per-layer budgets): the shared
        test matrix then checks layer totals instead of per-head counts."""
        return False

    def active(self, phase: str) -> bool:
        """Whether the compressor acts in ``phase`` ("prefill" always; "decode" as :attr:`decode_phase` says)."""
        if phase == "prefill":
            return True
        return self.decode_phase == "always" or (self.decode_phase == "optional" and self.phase == "decode")

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        """Model-dependent set-up, run by :func:`kvcompress.compress` (and so by every runner) before the model's first
        forward with this compressor: per-model artifacts (retrieval-head scores, low-rank bases), model constants
        (RoPE frequencies). Idempotent and cheap once done. Returns a one-line note of what was set up, or None."""
        return None

    def prefill_cost(self, config: Any, n: int) -> dict[str, Any]:
        """What the method adds to or saves from a prefill of ``n`` tokens, for the latency model: extra FLOPs of its
        scoring (``extra_prefill_flops``) and the layers whose K/V projection it skips (``prefill_skips_kv_layers``).
        Default: nothing declared (a cache-side method whose scoring is negligible next to the prefill)."""
        return {"extra_prefill_flops": 0.0, "prefill_skips_kv_layers": ()}

    def decode_step(self, ctx: CompressionContext) -> bool:
        """Called at every decode step of a compressor active in the decode phase, before any view is built: whether
        it selects at this step (False: the step only appends). Cheap per-step bookkeeping belongs here."""
        return True

    def decode_target(self, ctx: CompressionContext) -> int | None:
        """Entries every (row, head) keeps after a decode-step selection, known on the host (the same for all pairs),
        or None. With a target the cache evicts in place (:meth:`KVCompressLayer.compact`); without one it re-stores
        the layer after selecting on a materialized view."""
        return None

    def observe(self, view: LayerView, ctx: CompressionContext) -> None:
        """Prefill hook with every prompt query at hand (``ctx.query``), run for each layer as soon as its prefill
        attention is done, before any :meth:`select`. Store what select will need in ``ctx.state``/``ctx.shared``."""

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """Return the keep mask ``(batch, kv_heads, n)``, a subset of ``view.valid``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"


class Workspace:
    """Reusable scratch buffers for reconstructing encoded blocks inside attention, one block at a time.

    A decode step that reconstructs a long block into a freshly allocated tensor pays for new pages every step (the
    allocator returns large blocks to the OS); reusing one buffer per slot avoids that. Not cache data: ``quant``
    holds one block's keys *or* values in float32 plus an unpack slab there, reported apart (``workspace_bytes``);
    codecs that attend on their stored form (``lowrank``, ``think``) use none. Views returned by
    :meth:`get` stay valid until the next :meth:`get` of the same slot.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A view of ``shape`` into the slot's buffer on ``device`` (one buffer per slot and device, so layers of a
        model split across devices do not reallocate each other's)."""
        numel = 1
        for size in shape:
            numel *= size
        key = (slot, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class Codec:
    """Base of the encoded storage of a block of KV entries ``(pairs, count, head_dim)`` (quantized, low-rank,
    pruned...). Required: :meth:`decode` and :meth:`tensors`. Optional capabilities are declared by class flags:

    * ``attends_directly`` — :meth:`scores` ``(query, workspace) -> query · Kᵀ`` and :meth:`mix`
      ``(probs, workspace) -> probs · V`` for ``query (pairs, m, d_k)`` and ``probs (pairs, m, count)``, float32 in and
      out, called in that order, so attention need not reconstruct the block (low-rank coefficients and pruned
      channels are read as stored; quantized keys, then values, are dequantized into one workspace buffer);
    * ``joinable`` — :meth:`concat` ``(later) -> Codec | None`` joins a later block of the same (row, head) pairs, so
      decoding keeps one block per pair group instead of one per flush;
    * :meth:`select` ``(index) -> Codec`` — the block's pairs ``index`` still encoded (beam search); the base refuses.
    """

    attends_directly: ClassVar[bool] = False
    joinable: ClassVar[bool] = False

    def decode(
        self, workspace: Workspace | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(pairs, count, head_dim)`` reconstructed (a transient copy) in ``dtype`` (default: the
        cache dtype); with a ``workspace`` they may be views of its buffers."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the codec holds (payload and metadata): what is counted as cache memory."""
        raise NotImplementedError

    def scores(self, query: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not attend directly")

    def mix(self, probs: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not attend directly")

    def concat(self, later: Codec) -> Codec | None:
        raise NotImplementedError(f"{type(self).__name__} cannot join blocks")

    def select(self, index: torch.Tensor) -> Codec:
        """The block's pairs ``index`` ``(k,)`` long (repeats allowed), still encoded: beam search re-orders rows."""
        raise KVCompressError(f"beam search / batch re-indexing of a {type(self).__name__} block is not supported; "
                              "valid: num_beams=1 with this method, or a codec that implements Codec.select")


@dataclass
class HiddenCompressor(Compressor):
    """Hidden-axis compressors change how kept vectors are stored, not which are kept.

    After the selection axes, the cache hands blocks of kept entries to :meth:`encode` and stores the returned
    :class:`Codec` instead of the full-precision tensors. For every (row, KV head) pair the same rule holds, whatever
    the layout (uniform buffer or ragged storage, batch or alone): of the pair's full-precision tail, the newest
    :meth:`residual_tokens` stay in full precision and the oldest whole :meth:`chunk_tokens` beyond that are encoded —
    at prefill and, while decoding, whenever the tail reaches ``residual + chunk``. Attention reconstructs one block
    at a time (into the cache's :class:`Workspace`), or none where the codec attends directly (``scores``/``mix``).
    """

    axis: ClassVar[Axis | None] = Axis.HIDDEN
    decode_phase: ClassVar[str] = "always"

    def residual_tokens(self) -> int:
        return 0

    def chunk_tokens(self) -> int:
        return 1

    def encode(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        ctx: CompressionContext,
        rows: torch.Tensor,
        heads: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> Codec:
        """Encode a block ``(pairs, count, head_dim)``; pair ``i`` is batch row ``rows[i]``, KV head ``heads[i]``;
        ``positions`` (pairs, count) are the logical positions when the cache traces them."""
        raise NotImplementedError
