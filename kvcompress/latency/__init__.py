"""Modelled serving cost of (compressed) KV caches: Fu 2024's four metrics for any model, GPU and compression.

``estimate(model, hardware, Workload(context=50_000), compression)`` returns a :class:`LatencyReport` with KV
bytes, decode bytes per step, concurrency, prefill, decode and context-switch times and session throughput, for
the compressed cache and the uncompressed baseline. Formulas: :mod:`kvcompress.latency.metrics`.
CLI: ``python -m kvcompress.latency model=yi-34b-200k context=50000 hardware=a100-80gb``; paper tables:
``python -m kvcompress.latency table``.
"""

from .block import DEPLOYMENT_TARGET, latency_block
from .hardware import (
    DEFAULT_HARDWARE,
    EFFICIENCY_PRESETS,
    Efficiency,
    HardwareProfile,
    list_hardware,
    load_efficiency,
    load_hardware,
)
from .metrics import CONVENTIONS, LatencyReport, Metrics, Workload, estimate, kv_replication, parse_tokens, truncate
from .model_profile import ModelProfile, list_model_presets, load_model_profile
from .profile import CompressionProfile, project

__all__ = [
    "CONVENTIONS", "DEFAULT_HARDWARE", "DEPLOYMENT_TARGET", "EFFICIENCY_PRESETS", "CompressionProfile", "Efficiency", "HardwareProfile",
    "LatencyReport", "Metrics", "ModelProfile", "Workload", "estimate", "kv_replication", "latency_block", "list_hardware",
    "list_model_presets", "load_efficiency", "load_hardware", "load_model_profile", "parse_tokens", "project",
    "truncate",
]
