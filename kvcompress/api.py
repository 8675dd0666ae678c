"""Public entry point: ``cache = kvcompress.compress(model, "streaming", ratio=0.1)``.

Attachment uses transformers' own extension points only — no model forward is copied or patched:

* the cache is a ``Cache`` whose layers are :class:`~kvcompress.layer.KVCompressLayer` (``CacheLayerMixin``);
* attention goes through an implementation registered with ``AttentionInterface`` under the name ``"kvcompress"``
  (plus ``AttentionMaskInterface`` so the model still builds its usual masks). For any cache other than ours it is
  exactly the stock sdpa function, so switching a model to it changes nothing until a compressed cache is passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import KVCompressCache
from .layer import _ACTIVE, active_layer
from .compressor import AXIS_ORDER, Compressor
from .errors import KVCompressError, check_positive_int, check_ratio, check_ratio_or_budget, unknown_choice
from .registry import BASELINE, make_compressor

ATTENTION_NAME = "kvcompress"

#: ``config.model_type`` values whose attention follows the update-then-attend flow we rely on (tested with tiny
#: random configs of each in tests/test_equivalence.py and tests/test_streaming.py, from tests/tiny_models.py).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")


def kvcompress_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for models whose cache may be a :class:`KVCompressCache`; stock sdpa for any other cache."""
    hidden_states = module.__dict__.pop("_kvc_hidden_states", None)  # never outlives this call
    layer = active_layer()
    if layer is None or key is not layer._returned_key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _ACTIVE.layer = None  # do not keep the cache alive through the thread-local
    layer._returned_key = None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.cache.attention(layer, module, query, attention_mask, scaling, hidden_states=hidden_states, **kwargs)


def _remember_hidden_states(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on attention modules: keep a reference to the attention input for compressors that score
    layers by how much attention changes the residual stream (released right after the attention call)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(hidden, torch.Tensor):
        module.__dict__["_kvc_hidden_states"] = hidden


def register_attention() -> None:
    """Register the ``"kvcompress"`` attention and mask functions (idempotent)."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, kvcompress_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def check_architecture(model_or_config: Any) -> None:
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise unknown_choice("architecture (config.model_type)", model_type, SUPPORTED_ARCHITECTURES)


class Attachment:
    """What :func:`attach` changed on a model, and how to undo it: the attention implementation it replaced and the
    forward pre-hooks it registered. ``detach()`` restores both (kvpress's ``with press(model):`` habit); used as a
    context manager, it detaches on exit."""

    def __init__(self, model: torch.nn.Module, previous: str | None):
        self.model, self.previous = model, previous
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.attached = True

    def detach(self) -> None:
        """Restore the model's attention implementation and remove every hook (idempotent)."""
        if not self.attached:
            return
        for hook in self.hooks:
            hook.remove()
        for module in self.model.modules():
            module.__dict__.pop("_kvc_hooked", None)
            module.__dict__.pop("_kvc_hidden_states", None)
        if self.model.config._attn_implementation == ATTENTION_NAME:
            self.model.set_attn_implementation(self.previous or "sdpa")
        self.model.__dict__.pop("_kvc_attachment", None)
        self.attached = False

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(model: torch.nn.Module) -> Attachment:
    """Switch ``model`` to the ``"kvcompress"`` attention (a no-op for any cache but ours) and register the hooks the
    methods use; returns the model's :class:`Attachment` (``.detach()`` undoes it). Attaching an attached model
    returns its existing attachment."""
    check_architecture(model)
    current = model.config._attn_implementation
    if current not in (None, "sdpa", "eager", ATTENTION_NAME):
        raise KVCompressError(
            f"attn_implementation={current!r} is not supported; valid: sdpa or eager (kvcompress uses sdpa kernels)"
        )
    register_attention()
    handle = model.__dict__.get("_kvc_attachment")
    if handle is None or not handle.attached:
        handle = Attachment(model, current if current != ATTENTION_NAME else None)
        model.__dict__["_kvc_attachment"] = handle
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj") and not getattr(module, "_kvc_hooked", False):
            handle.hooks.append(module.register_forward_pre_hook(_remember_hidden_states, with_kwargs=True))
            module._kvc_hooked = True
    from .artifacts import remember_model

    remember_model(model)  # every attach: artifacts.model_of(attention module) finds this model
    if current != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return handle


@contextlib.contextmanager
def attached(model: torch.nn.Module) -> Iterator[Attachment]:
    """``with kvcompress.attached(model): ...`` — the model runs kvcompress's attention inside the block and is
    restored on exit (its attention implementation and hooks), unless it was already attached before the block."""
    was = model.__dict__.get("_kvc_attachment")
    handle = attach(model)
    try:
        yield handle
    finally:
        if was is None or not was.attached:
            handle.detach()


MethodSpec = str | Compressor | Sequence[str | Compressor]


def build_pipeline(
    method: MethodSpec,
    ratio: float | None = None,
    budget: int | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Compressor]:
    """Turn ``"a+b"``, ``["a", "b"]`` or compressor instances into an ordered, validated pipeline.

    * ``ratio`` / ``budget`` are defaults for every named method that has such a field; ``params[name]`` overrides.
      They are alternatives: giving both (here, or a method receiving both from here and ``params``) is an error;
      to give a composition's methods different ones, use ``params`` (``{"layers": {"ratio": 0.5},
      "snapkv": {"budget": 128}}``).
    * Axes apply in the order layer → head → token → hidden; each later compressor works on what the earlier ones
      kept and scores the current tensors. ``full`` alone means no compression and cannot be composed.
    * Two compressors on the same axis have no rule that combines them, so that is rejected.
    """
    params = dict(params or {})
    check_ratio_or_budget(ratio, budget)
    if ratio is not None:
        ratio = check_ratio(ratio)
    if budget is not None:
        budget = check_positive_int(budget, "budget")
    if isinstance(method, (str, Compressor)):
        items: list[str | Compressor] = list(method.split("+")) if isinstance(method, str) else [method]
    else:
        items = list(method)
    if not items:
        raise KVCompressError("method=[] is empty; valid: a method name, 'a+b', or a list of names")
    named = [str(i).strip() for i in items if not isinstance(i, Compressor)]
    for key, value in (("ratio", ratio), ("budget", budget)):
        if value is not None and named and not any(key in _fields_of(n) for n in named):
            raise _not_a_parameter(key, value, named)
    compressors: list[Compressor] = []
    for item in items:
        if isinstance(item, Compressor):
            compressors.append(item)
            continue
        name = str(item).strip()
        cls_fields = _fields_of(name)
        kwargs: dict[str, Any] = {}
        if ratio is not None and "ratio" in cls_fields:
            kwargs["ratio"] = ratio
        if budget is not None and "budget" in cls_fields:
            kwargs["budget"] = budget
        kwargs.update(params.pop(name, {}) or {})
        compressors.append(make_compressor(name, **kwargs))
    if params:
        extra = sorted(params)[0]
        raise KVCompressError(f"parameters given for {extra!r}, which is not in method={'+'.join(map(str, items))}; "
                              f"valid: params for {', '.join(repr(c.name) for c in compressors)}")
    names = [c.name for c in compressors]
    if BASELINE in names and len(compressors) > 1:
        raise KVCompressError(f"method={'+'.join(names)} composes {BASELINE!r}; {BASELINE!r} keeps everything, drop it "
                              "from the list")
    seen: dict[Any, str] = {}
    for comp in compressors:
        if comp.axis is None:
            continue
        if comp.axis in seen:
            raise KVCompressError(
                f"method={'+'.join(names)} puts {seen[comp.axis]!r} and {comp.name!r} on the same axis "
                f"({comp.axis.value}) with no rule to combine them; valid: at most one method per axis (layer, head, token, hidden)"
            )
        seen[comp.axis] = comp.name
    order = {axis: i for i, axis in enumerate(AXIS_ORDER)}
    return sorted((c for c in compressors if c.axis is not None), key=lambda c: order[c.axis])


def _not_a_parameter(key: str, value: Any, names: list[str]) -> KVCompressError:
    """``ratio=0.1`` given to methods none of which takes it: an error, never a row recording what did not run."""
    from .registry import method_defaults

    if len(names) == 1:
        params = sorted(method_defaults(names[0]))
        return KVCompressError(f"{key}={value!r} is not a parameter of method {names[0]!r}; valid: its parameters "
                               f"{', '.join(params) or '(none)'} (method.{names[0]}.<param>=VALUE)")
    return KVCompressError(f"{key}={value!r} is not a parameter of any method of {'+'.join(names)}; valid: a "
                           f"{key} for a composition with a method that takes one, or each method's own parameters")


def applied(pipeline: Sequence[Compressor], ratio: float | None = None,
            budget: int | None = None) -> list[dict[str, Any]]:
    """What each method of a pipeline runs with, for a results row: its name and axis, its ``ratio`` / ``budget`` as
    applied (None where it has no such field), every other parameter, and ``not_applied``: the run-wide ``ratio`` /
    ``budget`` it does not take (in ``layers+snapkv budget=64``, ``layers`` keeps its own ratio)."""
    import dataclasses

    out = []
    for comp in pipeline:
        fields = {f.name: getattr(comp, f.name) for f in dataclasses.fields(comp) if f.init}
        size_ratio, size_budget = fields.pop("ratio", None), fields.pop("budget", None)
        out.append({
            "name": comp.name,
            "axis": comp.axis.value if comp.axis is not None else None,
            "ratio": None if size_budget is not None else size_ratio,  # a budget replaces the ratio
            "budget": size_budget,
            "params": {k: v for k, v in fields.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
            "not_applied": [k for k, v in (("ratio", ratio), ("budget", budget))
                            if v is not None and k not in {f.name for f in dataclasses.fields(comp)}],
        })
    return out


def _fields_of(name: str) -> set[str]:
    import dataclasses

    from .registry import get_method

    return {f.name for f in dataclasses.fields(get_method(name))}


def compress(
    model: torch.nn.Module,
    method: MethodSpec = BASELINE,
    ratio: float | None = None,
    *,
    budget: int | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    trace: bool = False,
    diagnostics: bool = False,
    tokenizer: Any = None,
    **method_params: Any,
) -> KVCompressCache:
    """Attach kvcompress to ``model`` and return a fresh compressed cache for one generation.

    >>> cache = kvcompress.compress(model, "streaming", ratio=0.1)
    >>> model.generate(**inputs, cache=cache)  # ``past_key_values=cache`` before transformers 5.24

    ``ratio`` is the fraction KEPT along each method's axis (kvpress's ``compression_ratio`` is the fraction removed);
    ``budget`` is a number of tokens kept per (row, KV head) instead. Give one of them, not both.
    Extra keyword arguments are the parameters of a single method (``sink=4``); for a composition pass
    ``params={"streaming": {"sink": 4}}``. ``trace=True`` records the logical positions of kept entries
    (diagnostics for tests and plots; not counted as cache memory). ``diagnostics=True`` also measures what the
    methods report only on request because it costs time on the hot path (the reconstruction error of every
    hidden-axis encode: a full decode of the block and a host sync, at the prefill and at every flush).
    ``tokenizer``: handed to each method's :meth:`~kvcompress.compressor.Compressor.prepare` (per-model set-up such as
    detecting retrieval heads with needle probes; without it such methods use their fallbacks and say so).
    """
    if method_params:
        names = [m.name if isinstance(m, Compressor) else m for m in ([method] if isinstance(method, (str, Compressor)) else method)]
        names = [n for item in names for n in (item.split("+") if isinstance(item, str) else [item])]
        if len(names) != 1:
            raise KVCompressError("keyword parameters are ambiguous for a composition; pass params={'method': {...}}")
        params = {**(params or {}), names[0]: {**(params or {}).get(names[0], {}), **method_params}}
    pipeline = build_pipeline(method, ratio=ratio, budget=budget, params=params)
    attach(model)
    prepare(model, pipeline, tokenizer)
    return KVCompressCache(model.config, pipeline, trace=trace, diagnostics=diagnostics)


def prepare(model: torch.nn.Module, pipeline: Sequence[Compressor], tokenizer: Any = None) -> dict[str, str]:
    """Run every compressor's model-dependent set-up (:meth:`~kvcompress.compressor.Compressor.prepare`); returns the
    notes they give, by method name. :func:`compress` calls it; runners call it once up front to keep the set-up
    (artifact computation) out of their timings."""
    notes = {}
    for comp in pipeline:
        note = comp.prepare(model, tokenizer)
        if note:
            notes[comp.name] = note
    return notes
