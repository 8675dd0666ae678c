"""The cache container: a transformers ``Cache`` of :class:`~kvcompress.layer.KVCompressLayer` layers that holds the
compression pipeline's configuration and delegates to it (:mod:`kvcompress.pipeline`: what runs in each attention
call), to the layers (:mod:`kvcompress.layer`: storage; :mod:`kvcompress.views`, :mod:`kvcompress.encoding`) and to
the accounting (:mod:`kvcompress.accounting`). See :mod:`kvcompress.layer` for the storage layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import accounting, pipeline
from .compressor import Axis, Compressor, Workspace
from .errors import KVCompressError
from .layer import KVCompressLayer


class KVCompressCache(Cache):
    """A ``Cache`` whose layers hold only what the compression pipeline kept. Create it with
    :func:`kvcompress.compress`, then pass it as ``cache`` (``past_key_values`` before transformers 5.24) to
    ``generate`` or to a forward loop.

    One cache is one prompt: its first forward (the prefill) is compressed, then single-token forwards decode.
    Misuse raises :class:`~kvcompress.errors.KVCompressError` instead of giving a silently wrong answer:

    * a second multi-token forward on a compressing cache (a new prompt, chunked prefill, multi-turn): use a fresh
      ``kvcompress.compress(...)`` cache per prompt, or append a continuation uncompressed with
      ``with cache.paused():``. A ``full`` cache (no compressors) accepts multi-token continuations as they are:
      it compresses nothing, so storing them whole is what it would do anyway (as ``DynamicCache`` does);
    * a model that was never attached (its attention is not kvcompress's, so nothing would be compressed): create
      the cache with ``kvcompress.compress(model, ...)`` for that model, or call ``kvcompress.attach(model)``;
    * a model of another layout than the config the cache was built from (more layers, or fewer, other KV heads or
      head_dim), or another batch size than the prefill's.
    """

    def __init__(self, config: Any, compressors: list[Compressor], *, trace: bool = False, diagnostics: bool = False):
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        heads = text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
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
        #: the layer updated last: its attention must have consumed its keys by the next update (misuse check)
        self._last_updated: KVCompressLayer | None = None
        #: kept / dense bytes right after the prefill (:meth:`note_prefill`), before decoding appends anything
        self.kept_fraction_prefill: float | None = None
        super().__init__(layers=[KVCompressLayer(i, self) for i in range(self.num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= self.num_layers:
            raise KVCompressError(
                f"the model has a layer {layer_idx} but the cache was built for {self.num_layers} layers "
                f"({self.num_kv_heads} KV heads x head_dim {self.head_dim}); valid: a cache from "
                "kvcompress.compress(model, ...) for the model it is used with"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- control --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards without compressing: append a continuation uncompressed (a question after a compressed
        context, the next turn of a conversation, the next chunk of a prefill)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # -- the attention entry point (called by the registered attention function) ------------------------------
    def attention(self, layer: KVCompressLayer, module: torch.nn.Module, query: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, hidden_states: torch.Tensor | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Attention of ``layer`` for this forward, then compression (:func:`kvcompress.pipeline.attention`)."""
        return pipeline.attention(self, layer, module, query, attention_mask, scaling, hidden_states, **kwargs)

    # -- accounting (kvcompress.accounting) ---------------------------------------------------------------------
    def tensors(self) -> Iterator[torch.Tensor]:
        return accounting.tensors(self)

    def kept_bytes(self) -> int:
        """Bytes of every tensor the cache holds (used extents; index metadata included)."""
        return accounting.kept_bytes(self)

    def resident_bytes(self) -> int:
        """Bytes allocated, including the append buffers' reserved headroom (≤ ~1% for long caches)."""
        return accounting.resident_bytes(self)

    def dense_bytes(self) -> int:
        """What an uncompressed ``DynamicCache`` of the same run holds."""
        return accounting.dense_bytes(self)

    def kept_tokens(self) -> list[list[float]]:
        """Mean over batch rows of the real tokens held, per layer × KV head."""
        return accounting.kept_tokens(self)

    def kept_positions(self, layer_idx: int, row: int = 0) -> list[list[int]]:
        """Logical positions held per KV head of one row (needs ``trace=True``)."""
        return accounting.kept_positions(self, layer_idx, row)

    def bits_split(self) -> list[tuple[float, float]]:
        return accounting.bits_split(self)

    def effective_bits(self, split: list[tuple[float, float]] | None = None) -> list[float]:
        return accounting.effective_bits(self, split)

    def crop(self, max_length: int) -> None:
        """Drop the newest positions so that ``max_length`` remain (negative: drop ``-max_length``), as
        ``DynamicCache.crop``: possible for tokens appended after the compression (a question, decoded tokens), not
        into the compressed prompt, and not while a token method evicts during decoding (its state follows the
        entries). Checked on every layer before any changes."""
        decoding = [c.name for c in self.compressors if c.active("decode") and c.axis is not Axis.HIDDEN]
        if decoding and any(layer.logical > (layer.logical + max_length if max_length < 0 else max_length)
                            for layer in self.layers):
            raise KVCompressError(f"cannot crop a cache whose {decoding[0]!r} evicts while decoding (its scores follow "
                                  "the entries); valid: a copy taken before the tokens to drop (copy.deepcopy(cache))")
        for layer in self.layers:
            why = layer.croppable(max_length)
            if why is not None:
                layer.crop(max_length)  # raises with the reason
        for layer in self.layers:
            layer.crop(max_length)

    def note_prefill(self) -> None:
        """Record :attr:`kept_fraction_prefill` (called when the last layer's prefill is stored and compressed;
        host metadata only, no device read)."""
        dense = self.dense_bytes()
        self.kept_fraction_prefill = self.kept_bytes() / dense if dense else None

    def memory_report(self) -> accounting.MemoryReport:
        """The memory block of a results row (:func:`kvcompress.accounting.memory_report`)."""
        return accounting.memory_report(self)
