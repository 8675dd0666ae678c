"""Hardware profiles (``configs/hardware/*.yaml``) and efficiency presets.

Units: every rate is in plain SI units — FLOP/s, bytes/s (1 GB/s = 1e9 B/s). ``memory_gb`` is the marketed
capacity ("80GB"), the number Fu 2024 subtracts the weights from; ``memory_bytes`` is the capacity the driver
reports (nvidia-smi), used by the ``exact`` convention. ``pcie_bandwidth`` is per direction;
``nvlink_bandwidth`` (NVLink / Infinity Fabric) is the datasheet's per-GPU figure, both directions together.

FLOP rate per dtype (:meth:`HardwareProfile.flops`): ``flops_bf16`` for bf16 / fp16 (and fp32 weights, charged
as if cast to bf16), ``flops_fp8`` / ``flops_fp4`` where the GPU has tensor cores for that format (null where it
has none). A format without tensor cores runs weight-only: the weights are dequantised and the matmuls run at
the bf16 rate (A100 with fp8 weights, H100 with fp4 weights). Every constant's source is the comment above it in
``configs/hardware/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import KVCompressError, unknown_choice

DEFAULT_HARDWARE = "a100-80gb"

_REQUIRED = ("flops_bf16", "hbm_bandwidth", "memory_gb", "memory_bytes", "pcie_bandwidth")


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator. Rates are peak datasheet values; efficiency factors are applied by :func:`estimate`."""

    name: str
    flops_bf16: float  #: dense BF16 tensor FLOP/s (no sparsity)
    hbm_bandwidth: float  #: device memory bandwidth, B/s
    memory_gb: float  #: marketed capacity in "GB" (Fu 2024's number)
    memory_bytes: int  #: capacity in bytes as reported by the driver
    pcie_bandwidth: float  #: host link, B/s per direction
    nvlink_bandwidth: float | None = None  #: GPU-GPU link per GPU, both directions together (None: TP over PCIe)
    flops_fp8: float | None = None  #: dense FP8 tensor FLOP/s (None: no FP8 tensor cores)
    flops_fp4: float | None = None  #: dense FP4 tensor FLOP/s (None: no FP4 tensor cores)
    allreduce_latency: float = 10e-6  #: seconds per all-reduce call (an assumption, not a datasheet figure)
    description: str = ""

    def __post_init__(self) -> None:
        for key in _REQUIRED:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise KVCompressError(f"hardware {self.name!r}: {key}={value!r} is invalid; valid: a number > 0")
        for key in ("nvlink_bandwidth", "flops_fp8", "flops_fp4", "allreduce_latency"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                      or (key != "allreduce_latency" and value == 0)):
                raise KVCompressError(f"hardware {self.name!r}: {key}={value!r} is invalid; valid: a number > 0 "
                                      "or null")

    def flops(self, dtype: str = "bfloat16") -> tuple[float, str]:
        """Peak dense FLOP/s for matmuls with weights in ``dtype`` and the format they run in: ``(rate, format)``.

        fp8 / fp4 use their own tensor-core rate where the GPU has one; otherwise (and for bf16, fp16, fp32) the
        bf16 rate: weight-only quantisation dequantises into bf16 before the matmul."""
        from .dtypes import dtype_name

        name = dtype_name(dtype)
        native = {"fp8": self.flops_fp8, "fp4": self.flops_fp4}.get(name)
        if native:
            return float(native), name
        return float(self.flops_bf16), "bfloat16"

    def link_bandwidth(self) -> float:
        """B/s per direction between two GPUs of a TP group: half the NVLink / Infinity Fabric figure, else PCIe."""
        return self.nvlink_bandwidth / 2 if self.nvlink_bandwidth else self.pcie_bandwidth


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak: prefill FLOP/s, decode HBM bandwidth and PCIe bandwidth (each in (0, 1])."""

    name: str = "peak"
    flops: float = 1.0
    bandwidth: float = 1.0
    pcie: float = 1.0

    def __post_init__(self) -> None:
        for key in ("flops", "bandwidth", "pcie"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
                raise KVCompressError(f"efficiency {key}={value!r} is invalid; valid: a fraction in (0, 1]")


#: ``peak`` = Fu 2024's theoretical peak. ``measured-a100``: Vidur's measured A100 GEMM profiles reach about
#: 0.68-0.72 of 312 TFLOP/s at prefill and 0.73-0.77 of 2039 GB/s at decode; llm-analysis recommends 0.7 FLOP
#: efficiency. PCIe is left at 1.0 (no calibration data).
EFFICIENCY_PRESETS: dict[str, Efficiency] = {
    "peak": Efficiency("peak", 1.0, 1.0, 1.0),
    "measured-a100": Efficiency("measured-a100", 0.70, 0.75, 1.0),
}


def load_efficiency(spec: str | Efficiency | None = "peak") -> Efficiency:
    """An :class:`Efficiency` from a preset name (``peak``, ``measured-a100``) or an instance."""
    if spec is None:
        return EFFICIENCY_PRESETS["peak"]
    if isinstance(spec, Efficiency):
        return spec
    key = str(spec).lower()
    if key not in EFFICIENCY_PRESETS:
        raise unknown_choice("efficiency preset", spec, EFFICIENCY_PRESETS)
    return EFFICIENCY_PRESETS[key]


def _hardware_dir() -> Path:
    return Path(str(importlib.resources.files("kvcompress.configs"))) / "hardware"


def list_hardware() -> list[str]:
    """Names of the bundled hardware profiles (the file stems under ``configs/hardware``)."""
    return sorted(p.stem for p in _hardware_dir().glob("*.yaml"))


def hardware_from_dict(data: dict[str, Any], name: str = "custom") -> HardwareProfile:
    """Build a profile from a mapping with the YAML keys; missing keys raise one clear error."""
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if missing:
        raise KVCompressError(f"hardware {name!r} lacks {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
    fields = {f.name for f in dataclasses.fields(HardwareProfile)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs.setdefault("name", name)
    for key in ("flops_bf16", "hbm_bandwidth", "memory_gb", "pcie_bandwidth", "nvlink_bandwidth", "flops_fp8",
                "flops_fp4", "allreduce_latency"):
        if isinstance(kwargs.get(key), str):  # YAML reads "312e12" (no dot) as a string
            kwargs[key] = float(kwargs[key])
    kwargs["memory_bytes"] = int(float(kwargs["memory_bytes"]))
    return HardwareProfile(**kwargs)


def load_hardware(name_or_path: str | HardwareProfile = DEFAULT_HARDWARE) -> HardwareProfile:
    """A bundled profile by name (``a100-40gb``, ``a100-80gb``, ``a100-80gb-pcie``, ``h100-sxm``, ``h100-pcie``,
    ``h200``, ``b200``, ``mi300x``, ``l40s``) or a YAML file path.

    Unknown names raise :class:`~kvcompress.errors.KVCompressError` (a ``ValueError``) listing the valid names.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    spec = str(name_or_path)
    path = Path(spec)
    if not (spec.endswith((".yaml", ".yml")) and path.is_file()):
        path = _hardware_dir() / f"{spec.lower()}.yaml"
        if not path.is_file():
            raise unknown_choice("hardware", name_or_path, list_hardware())
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise KVCompressError(f"hardware file {str(path)!r} is not a mapping; valid: a YAML mapping of fields")
    return hardware_from_dict(data, name=data.get("name", path.stem))
