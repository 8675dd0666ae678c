"""The compression pipeline: what happens in each attention call of a model using a :class:`KVCompressCache`.

After the layer's attention (stock sdpa while pristine, the layer's own kernels once compressed): at the prefill the
selection axes (layer → head → token) choose what each layer keeps, then the hidden axis encodes it; at each decode
step, methods that evict while decoding select again (in place on a dense layer), and hidden codecs flush the
full-precision tail when it reaches ``residual + chunk``. Compressors see one layer (:class:`LayerView`) and a narrow
:class:`CompressionContext`, never the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .compressor import Axis, CompressionContext, Compressor, LayerView
from .errors import KVCompressError
from .layer import KVCompressLayer

if TYPE_CHECKING:
    from .cache import KVCompressCache


def attention(
    cache: KVCompressCache,
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
    if cache.observers and q_len == 1:
        notify(cache, layer, query, attention_mask, scaling)
    # phase None (several tokens after earlier ones) only reaches here when nothing compresses (under
    # `cache.paused()`, or no compressors): `KVCompressLayer.update` refuses it on a compressing cache.
    phase = "prefill" if layer.logical == q_len else ("decode" if q_len == 1 else None)
    padding_valid = _padding_validity(attention_mask, layer.length) if phase == "prefill" else None
    if padding_valid is not None:
        layer.pad = (~padding_valid).sum(-1).tolist()
    if phase is not None and cache.enabled and cache.compressors:
        cache._inputs = (hidden_states, out)
        try:
            if phase == "prefill":
                prefill(cache, layer, module, query, attention_mask)
            else:
                decode(cache, layer, module, query, attention_mask)
        finally:
            cache._inputs = (None, None)
    if phase == "prefill" and layer.layer_idx == cache.num_layers - 1:  # every layer prefilled (and compressed)
        cache.note_prefill()
    return out, None


def context(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    comp: Compressor,
    module: torch.nn.Module,
    query: torch.Tensor,
    phase: str,
):
    return CompressionContext(
        layer_idx=layer.layer_idx,
        num_layers=cache.num_layers,
        phase=phase,
        query=query,
        module=module,
        num_kv_heads=cache.num_kv_heads,
        state=layer.state.setdefault(comp.name, {}),
        shared=cache.shared.setdefault(comp.name, {}),
        hidden_states=cache._inputs[0],
        attn_output=cache._inputs[1],
        decode_count=layer.length if layer.dense else None,
        diagnostics=cache.diagnostics,
    )


def prefill(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    padding_valid = _padding_validity(attention_mask, layer.length)
    view = layer.materialize(padding_valid)
    for comp in cache.compressors:
        comp.observe(view, context(cache, layer, comp, module, query, "prefill"))
    if not cache.deferred:
        apply(cache, layer, module, query, view, "prefill")
        return
    # A cross-layer compressor needs every layer's observation: hold each layer's last queries until the last
    # layer has run, then select everywhere. Peak memory is then the uncompressed prefill cache.
    window = max(c.query_window for c in cache.compressors)
    layer.pending = (module, query[:, :, -window:], padding_valid)
    if layer.layer_idx == cache.num_layers - 1:
        for other in cache.layers:
            if other.pending is not None:
                mod, q, valid = other.pending
                other.pending = None
                apply(cache, other, mod, q, other.materialize(valid), "prefill")


def decode(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    acting = [c for c in cache.evictors if c.decode_step(context(cache, layer, c, module, query, "decode"))]
    if acting:
        targets = [c.decode_target(context(cache, layer, c, module, query, "decode")) for c in acting]
        if cache.evict_in_place and layer.dense and None not in targets:
            evict_in_place(cache, layer, acting, module, query, min(targets))
        else:  # ragged or encoded layers, or a target not known on the host: re-select and re-store the layer
            view = layer.materialize(_padding_validity(attention_mask, layer.length))
            apply(cache, layer, module, query, view, "decode", only=acting)
            return
    for comp in cache.compressors:
        if comp.axis is Axis.HIDDEN and comp.active("decode"):
            if layer.plain_tail() >= comp.residual_tokens() + comp.chunk_tokens():
                layer.encode(comp, context(cache, layer, comp, module, query, "decode"))


def evict_in_place(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    acting: list[Compressor],
    module: torch.nn.Module,
    query: torch.Tensor,
    target: int,
) -> None:
    """Decode-time eviction on a dense buffer: the methods score the slots as stored (positions give the ranks),
    then every pair drops down to ``target`` entries by moving its newest entries into the evicted slots
    (:meth:`KVCompressLayer.compact`) — a few slots copied, no sync, the layer never re-stored."""
    view = layer.slot_view()
    for comp in acting:
        keep = comp.select(view, context(cache, layer, comp, module, query, "decode"))
        view = LayerView(view.keys, view.values, keep, view.positions, ordered=False)
    if layer.length > target:
        layer.compact(view.valid, layer.length - target)


def apply(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    module: torch.nn.Module,
    query: torch.Tensor,
    view: LayerView,
    phase: str,
    only: list[Compressor] | None = None,
) -> None:
    """Run the selection axes in order on ``view`` (``only`` these at a decode step), store what is kept, then hand
    it to the hidden axis."""
    before = view.valid
    for comp in cache.compressors:
        if comp.axis is Axis.HIDDEN or not comp.active(phase) or (only is not None and comp not in only):
            continue
        keep = comp.select(view, context(cache, layer, comp, module, query, phase))
        if keep.shape != view.valid.shape or bool((keep & ~view.valid).any()):
            raise RuntimeError(f"{comp.name}.select must return a subset of the view's valid entries")
        view = LayerView(view.keys, view.values, keep, view.positions)
    hidden = [c for c in cache.compressors if c.axis is Axis.HIDDEN and c.active(phase)]
    dropped = not bool(torch.equal(view.valid, before))
    padded = layer.pristine and not bool(before.all())
    if dropped or (hidden and padded) or (phase == "decode" and hidden and (layer.segments or layer.ragged)):
        layer.store(view)  # a pristine layer is left alone when nothing is dropped (identical to uncompressed)
    for comp in hidden:
        layer.encode(comp, context(cache, layer, comp, module, query, phase))


def notify(
    cache: KVCompressCache,
    layer: KVCompressLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> None:
    """Give attention observers this decode step's probabilities over the layer's entries, per query head."""
    view = layer.materialize(_padding_validity(attention_mask, layer.length))
    b, hq = query.shape[:2]
    g = hq // cache.num_kv_heads
    keys = view.keys.float().repeat_interleave(g, 1)  # (b, hq, n, d)
    scores = (query.float() @ keys.transpose(-1, -2)).squeeze(2) * scaling  # (b, hq, n)
    scores = scores.masked_fill(~view.valid.repeat_interleave(g, 1), float("-inf"))
    probs = torch.softmax(scores, -1)
    for observer in cache.observers:
        observer(layer.layer_idx, probs, view)


def _padding_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Which of the first ``length`` logical positions are real tokens, per row, from the model's mask.

    The last query row of a causal mask sees every real key up to itself; with left padding (what ``generate`` does
    for decoder-only models) that is exactly the set of non-padding positions.
    """
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    last = attention_mask[:, 0, -1, :length]
    return last if last.dtype == torch.bool else last == 0
