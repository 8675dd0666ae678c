"""Storage formats of weights and KV entries: names, aliases and bytes per element.

``weight_dtype`` / ``kv_dtype`` options take any of :data:`DTYPE_BYTES`' names or aliases (``bf16``, ``fp16``,
``fp8`` = ``float8`` = ``float8_e4m3fn``, ``fp4`` = ``nvfp4`` = ``mxfp4``). Bytes per element: fp32 4, bf16/fp16 2,
fp8 1, fp4 0.5. The scales of block-scaled formats (fp4 per-16/32-element scales, fp8 per-channel/-tensor scales) are
not charged: under 7% of an fp4 tensor, under 0.1% of an fp8 one.
"""

from __future__ import annotations

from typing import Any

from ..errors import unknown_choice

DTYPE_BYTES: dict[str, float] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "fp4": 0.5}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "int8": "fp8",
            "float4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "int4": "fp4"}


def dtype_name(value: Any) -> str:
    """The canonical name of a storage format (``torch.bfloat16``, ``"bf16"`` → ``"bfloat16"``); unknown names raise
    a one-line :class:`~kvcompress.errors.KVCompressError` listing the valid ones."""
    text = str(value).replace("torch.", "").strip().lower()
    text = _ALIASES.get(text, text)
    if text not in DTYPE_BYTES:
        raise unknown_choice("dtype", value, sorted(DTYPE_BYTES) + sorted(_ALIASES))
    return text


def dtype_bytes(value: Any) -> float:
    """Bytes per element of a storage format (0.5 for fp4)."""
    return DTYPE_BYTES[dtype_name(value)]


def name_of_bytes(nbytes: float) -> str:
    """The usual format of an element size: 4 → float32, 2 → bfloat16, 1 → fp8, 0.5 → fp4."""
    return {4: "float32", 2: "bfloat16", 1: "fp8", 0.5: "fp4"}.get(float(nbytes), f"{nbytes:g}-byte")
