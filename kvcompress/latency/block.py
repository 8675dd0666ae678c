"""The ``latency`` block of a results row: the evaluated model, and a projection onto a deployment target."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .metrics import Workload, estimate
from .model_profile import load_model_profile
from .profile import CompressionProfile, project

#: Fu 2024's running example: Yi-34B-200K at 50K tokens on one A100-80GB, 250 output tokens.
DEPLOYMENT_TARGET: dict[str, Any] = {"model": "yi-34b-200k", "context": 50_000, "hardware": "a100-80gb",
                                     "output_tokens": 250, "tp": 1}


def latency_block(model: Any, memory_report: Mapping[str, Any] | None, hardware: str = "a100-80gb",
                  output_tokens: int = 250, target: Mapping[str, Any] | None = None,
                  efficiency: str = "peak", convention: str = "exact",
                  model_name: str | None = None) -> dict[str, Any]:
    """``{"evaluated": ..., "deployment": ...}`` for one results row.

    ``evaluated``: the model actually run (a ``PretrainedConfig``, preset or path; shown as ``model_name`` when
    given, e.g. the run's model name, else the profile's name), at the report's context, on ``hardware``, with the
    cache's own profile (:meth:`CompressionProfile.from_report`; ``None`` = dense).
    ``deployment``: the run's per-(layer, head) kept fractions and element widths transferred with
    :func:`project` onto ``target`` (default :data:`DEPLOYMENT_TARGET`). Each dict says which it is in
    ``label``, whether its prefill saving is real in ``prefill_saving`` (``"memory-only"`` or ``"skips K/V of
    layers [...]"``), and the deployment entry states ``projected_from``.
    """
    m = load_model_profile(model)
    if model_name:
        m = dataclasses.replace(m, name=str(model_name))
    tgt = {**DEPLOYMENT_TARGET, **(target or {})}
    if memory_report:
        prof = CompressionProfile.from_report(memory_report, m)
        context = int(prof.context_tokens)
    else:
        context = int(tgt["context"])
        prof = CompressionProfile.dense(m, context)
    evaluated = estimate(m, hardware, Workload(context, output_tokens), compression=prof, efficiency=efficiency,
                         convention=convention, label="evaluated").to_dict()
    evaluated["prefill_saving"] = prof.prefill_saving()
    tm = load_model_profile(tgt["model"])
    proj = project(prof, tm, int(tgt["context"]))
    deployment = estimate(tm, tgt["hardware"], Workload(int(tgt["context"]), int(tgt["output_tokens"]),
                                                        tp=int(tgt["tp"])),
                          compression=proj, efficiency=efficiency, convention=convention,
                          label="deployment").to_dict()
    deployment["prefill_saving"] = proj.prefill_saving()
    deployment["projected_from"] = {"model": m.name, "context": context}
    return {"evaluated": evaluated, "deployment": deployment}
