"""What the latency model's options accept (:mod:`kvcompress.constraints`), declared once for the two CLIs that take
them: ``python -m kvcompress.latency`` (top-level keys) and ``python -m kvcompress.run`` (under ``latency.``)."""

from __future__ import annotations

from ..constraints import AnyOf, Boolean, Call, Choice, Constraint, Integer, Number, Optional, OutputDir
from .dtypes import dtype_name
from .hardware import load_efficiency, load_hardware
from .metrics import CONVENTIONS, parse_tokens
from .model_profile import load_model_profile

HARDWARE = Call(load_hardware, "a hardware profile (configs/hardware/) or a YAML file")
EFFICIENCY = Call(load_efficiency, "an efficiency preset")
MODEL = Call(load_model_profile, "a model preset (configs/model/) or a model directory")
TOKENS = AnyOf((Integer(min=1), Call(parse_tokens, "a token count (e.g. 50000, 50K)")))
DTYPE = Optional(Call(dtype_name, "a dtype (bf16, fp16, fp8, fp4, fp32)"))
FRACTION = Optional(Number(0, 1, open_min=True))

#: the :class:`~kvcompress.latency.serving.Serving` options
SERVING: dict[str, Constraint] = {
    "memory_utilization": Number(0, 1, open_min=True),
    "activation_reserve": AnyOf((Choice(["auto"]), Number(min=0))),
    "tp_communication": Boolean(),
}

#: ``python -m kvcompress.latency`` (estimate): ``context`` / ``tp`` (one value or a list) are checked by the command
ESTIMATE: dict[str, Constraint] = {
    "model": MODEL,
    "hardware": HARDWARE,
    "efficiency": EFFICIENCY,
    "convention": Choice(CONVENTIONS),
    "format": Choice(("table", "json")),
    "output": Integer(min=1),
    "users": Integer(min=1),
    **SERVING,
    "weight_dtype": DTYPE,
    "kv_dtype": DTYPE,
    "prefix_tokens": AnyOf((Integer(min=0), Call(parse_tokens, "a token count (e.g. 4096, 4K)"))),
    **{key: FRACTION for key in ("token_fraction", "head_fraction", "layer_fraction", "rank_fraction")},
    **{key: Optional(Number(0, 64, open_min=True)) for key in ("key_bits", "value_bits")},
    "group_size": Optional(Integer(min=1)),
}

#: ``python -m kvcompress.latency table``
TABLE: dict[str, Constraint] = {"out": Optional(OutputDir())}

#: ``python -m kvcompress.run``'s ``latency`` block (keys under ``latency.``)
RUN: dict[str, Constraint] = {
    "hardware": HARDWARE,
    "efficiency": EFFICIENCY,
    "output_tokens": Integer(min=1),
    "convention": Choice(CONVENTIONS),
    **{f"serving.{key}": constraint for key, constraint in SERVING.items()},
    "deployment.model": MODEL,
    "deployment.hardware": HARDWARE,
    "deployment.context": TOKENS,
    "deployment.output_tokens": Integer(min=1),
    "deployment.tp": Integer(min=1),
    "deployment.weight_dtype": DTYPE,
    "deployment.kv_dtype": DTYPE,
    "deployment.prefix_tokens": Integer(min=0),
}
