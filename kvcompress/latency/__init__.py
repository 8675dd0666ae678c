"""Modelled serving cost of (compressed) KV caches: Fu 2024's four metrics for any model, GPU and compression.

``estimate(model, hardware, Workload(context=50_000), compression)`` returns a :class:`LatencyReport` with KV
bytes, decode bytes per step, concurrency, prefill, decode and context-switch times and session throughput (or "does not
fit"), for the compressed cache and the uncompressed baseline, in the ``exact`` convention (default: a
first-principles count with serving-engine options, :class:`Serving`) or the ``paper`` one (Fu 2024's formulas).
Formulas: :mod:`kvcompress.latency.metrics`.
CLI: ``python -m kvcompress.latency model=yi-34b-200k context=50000 hardware=a100-80gb``; paper tables:
``python -m kvcompress.latency table``.
"""

from .block import DEPLOYMENT_TARGET, SERVING_DEFAULTS, check_latency_config, latency_block
from .dtypes import DTYPE_BYTES, dtype_bytes, dtype_name
from .fixed import FixedParts, Window
from .hardware import (
    DEFAULT_HARDWARE,
    EFFICIENCY_PRESETS,
    Efficiency,
    HardwareProfile,
    list_hardware,
    load_efficiency,
    load_hardware,
)
from .metrics import (
    CONVENTIONS,
    LatencyReport,
    Metrics,
    Serving,
    Workload,
    activation_reserve,
    estimate,
    kv_replication,
    parse_tokens,
    truncate,
)
from .model_profile import ModelProfile, list_model_presets, load_model_profile
from .profile import CompressionProfile
from .projection import project

__all__ = [
    "CONVENTIONS", "DEFAULT_HARDWARE", "DEPLOYMENT_TARGET", "DTYPE_BYTES", "EFFICIENCY_PRESETS", "SERVING_DEFAULTS",
    "CompressionProfile", "Efficiency", "FixedParts", "HardwareProfile", "LatencyReport", "Metrics", "ModelProfile",
    "Serving", "Window", "Workload", "activation_reserve", "check_latency_config", "dtype_bytes", "dtype_name", "estimate", "kv_replication",
    "latency_block", "list_hardware", "list_model_presets", "load_efficiency", "load_hardware", "load_model_profile",
    "parse_tokens", "project", "truncate",
]
