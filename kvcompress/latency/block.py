"""The ``latency`` block of a results row: the evaluated model, and a projection onto a deployment target."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import KVCompressError, unknown_choice
from .dtypes import name_of_bytes
from .fixed import FixedParts
from .metrics import Serving, Workload, estimate
from .model_profile import load_model_profile
from .profile import CompressionProfile
from .projection import project

#: Fu 2024's running example: Yi-34B-200K at 50K tokens on one A100-80GB, 250 output tokens; weights and KV in the
#: model's dtype (bf16), no shared prefix.
DEPLOYMENT_TARGET: dict[str, Any] = {"model": "yi-34b-200k", "context": 50_000, "hardware": "a100-80gb",
                                     "output_tokens": 250, "tp": 1, "weight_dtype": None, "kv_dtype": None,
                                     "prefix_tokens": 0}
#: The serving-engine options of both entries (:class:`Serving`, less the dtypes and prefix of the target).
SERVING_DEFAULTS: dict[str, Any] = {"memory_utilization": 0.9, "activation_reserve": "auto",
                                    "tp_communication": True}


def _serving(options: Mapping[str, Any] | None, **extra: Any) -> Serving:
    opts = {**SERVING_DEFAULTS, **(options or {})}
    unknown = sorted(set(opts) - set(SERVING_DEFAULTS))
    if unknown:
        raise unknown_choice("latency serving option", unknown[0], SERVING_DEFAULTS)
    return Serving(**opts, **extra)


def check_latency_config(latency: Mapping[str, Any]) -> None:
    """Every check of a run's ``latency`` block that needs no model run, with one-line errors naming the key: the
    convention, the serving options, the deployment target's options, its model and hardware, a TP degree that
    fits its heads, a context within its limit (``exact``) and a prefix within the context."""
    from .hardware import load_hardware
    from .metrics import CONVENTIONS, kv_replication, parse_tokens

    convention = latency.get("convention", "exact")
    if convention not in CONVENTIONS:
        raise unknown_choice("latency.convention", convention, CONVENTIONS)
    try:
        _serving(latency.get("serving"))
    except KVCompressError as err:
        raise KVCompressError(f"latency.serving: {err}") from None
    dep = dict(latency.get("deployment") or {})
    unknown = sorted(set(dep) - set(DEPLOYMENT_TARGET))
    if unknown:
        raise unknown_choice("latency.deployment option", unknown[0], DEPLOYMENT_TARGET)
    tgt = {**DEPLOYMENT_TARGET, **dep}
    try:
        context = parse_tokens(tgt["context"])
        if context < 1:
            raise KVCompressError(f"context={tgt['context']!r} is invalid; valid: tokens >= 1")
        tm = load_model_profile(tgt["model"])
        load_hardware(tgt["hardware"])
        kv_replication(tm, int(tgt["tp"]))
        serving = _serving(latency.get("serving"), weight_dtype=tgt["weight_dtype"], kv_dtype=tgt["kv_dtype"],
                           prefix_tokens=int(tgt["prefix_tokens"] or 0))
        if serving.prefix_tokens > context:
            raise KVCompressError(f"prefix_tokens={serving.prefix_tokens} exceeds the context of {context} tokens; "
                                  f"valid: 0..{context}")
        if convention == "exact":
            tm.check_context(context + int(tgt["output_tokens"]))
    except KVCompressError as err:
        raise KVCompressError(f"latency.deployment: {err}") from None


def latency_block(model: Any, memory_report: Mapping[str, Any] | None, hardware: str = "a100-80gb",
                  output_tokens: int = 250, target: Mapping[str, Any] | None = None,
                  efficiency: str = "peak", convention: str = "exact",
                  model_name: str | None = None, serving: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"evaluated": ..., "deployment": ...}`` for one results row.

    ``evaluated``: the model actually run (a ``PretrainedConfig``, preset or path; shown as ``model_name`` when
    given, e.g. the run's model name, else the profile's name), at the report's context, on ``hardware``, with the
    cache's own profile (:meth:`CompressionProfile.from_report`; ``None`` = dense), weights and KV in the run's
    dtype (the report's ``dtype_bytes``).
    ``deployment``: the run's per-(layer, head) kept fractions and element widths transferred with
    :func:`project` onto ``target`` (default :data:`DEPLOYMENT_TARGET`: model, context, hardware, output_tokens, tp,
    weight_dtype, kv_dtype, prefix_tokens), fixed-size parts (the report's ``fixed_size``) carried as token counts.
    ``serving``: engine options for both (:data:`SERVING_DEFAULTS`: memory_utilization, activation_reserve,
    tp_communication). Each dict says which it is in ``label``, whether its prefill saving is real in
    ``prefill_saving`` (``"memory-only"`` or ``"skips K/V of layers [...]"``), carries every option in ``serving``,
    and the deployment entry states ``projected_from`` and the ``fixed_size`` parts it carried.
    """
    m = load_model_profile(model)
    if model_name:
        m = dataclasses.replace(m, name=str(model_name))
    unknown = sorted(set(target or {}) - set(DEPLOYMENT_TARGET))
    if unknown:
        raise unknown_choice("latency deployment option", unknown[0], DEPLOYMENT_TARGET)
    tgt = {**DEPLOYMENT_TARGET, **(target or {})}
    fixed = FixedParts.from_dict((memory_report or {}).get("fixed_size"))
    if memory_report:
        prof = CompressionProfile.from_report(memory_report, m)
        context = int(prof.context_tokens)
        if prof.dtype_bytes == int(prof.dtype_bytes) and int(prof.dtype_bytes) != m.dtype_bytes:
            m = dataclasses.replace(m, dtype_bytes=int(prof.dtype_bytes))  # the run's weights were in its dtype
    else:
        context = int(tgt["context"])
        prof = CompressionProfile.dense(m, context)
    run_dtype = name_of_bytes(prof.dtype_bytes)
    evaluated = estimate(m, hardware, Workload(context, int(output_tokens)), compression=prof,
                         efficiency=efficiency, convention=convention, label="evaluated",
                         serving=_serving(serving, weight_dtype=run_dtype, kv_dtype=run_dtype)).to_dict()
    evaluated["prefill_saving"] = prof.prefill_saving()
    tm = load_model_profile(tgt["model"])
    t_serving = _serving(serving, weight_dtype=tgt["weight_dtype"], kv_dtype=tgt["kv_dtype"],
                         prefix_tokens=int(tgt["prefix_tokens"] or 0))
    kv_bytes = None
    if t_serving.kv_dtype is not None:
        from .dtypes import dtype_bytes

        kv_bytes = dtype_bytes(t_serving.kv_dtype)
    try:
        target_context = int(tgt["context"])
    except (TypeError, ValueError):
        raise KVCompressError(f"latency deployment context={tgt['context']!r} is not an integer; valid: tokens "
                              ">= 1") from None
    proj = project(prof, tm, target_context, fixed=fixed, kv_dtype_bytes=kv_bytes)
    deployment = estimate(tm, tgt["hardware"], Workload(target_context, int(tgt["output_tokens"]),
                                                        tp=int(tgt["tp"])),
                          compression=proj, efficiency=efficiency, convention=convention,
                          label="deployment", serving=t_serving).to_dict()
    deployment["prefill_saving"] = proj.prefill_saving()
    deployment["projected_from"] = {"model": m.name, "context": context}
    deployment["fixed_size"] = fixed.to_dict()
    return {"evaluated": evaluated, "deployment": deployment}
