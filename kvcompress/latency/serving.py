"""The serving scenario the metrics are computed for: :class:`Workload` (context, output tokens, users, TP degree),
the serving-engine options :class:`Serving`, token counts (:func:`parse_tokens`), the ``auto`` activation reserve
(:func:`activation_reserve`) and the KV replication under tensor parallelism (:func:`kv_replication`).
Formulas: :mod:`kvcompress.latency.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import KVCompressError
from .dtypes import dtype_name
from .model_profile import ModelProfile

#: vLLM defaults behind ``activation_reserve="auto"``: a chunked-prefill step of this many tokens ...
RESERVE_CHUNK_TOKENS = 2048
#: ... and fp32 logits for this many sequences (max_num_seqs).
RESERVE_LOGIT_SEQS = 256
ACTIVATION_BYTES = 2  #: bf16 activations (all-reduce messages, the reserve)


def parse_tokens(value: Any) -> int:
    """``50000``, ``"50K"`` (= 50,000: the paper's K is 1000), ``"1M"`` (= 1,000,000) → an int."""
    text = str(value).strip().upper().replace("_", "").replace(",", "")
    mult = 1
    if text.endswith("K"):
        text, mult = text[:-1], 1000
    elif text.endswith("M"):
        text, mult = text[:-1], 1_000_000
    try:
        number = float(text) * mult
    except ValueError:
        raise KVCompressError(f"token count {value!r} is not a number; valid: e.g. 4000, 50K, 1M") from None
    if number != int(number):
        raise KVCompressError(f"token count {value!r} is not whole; valid: e.g. 4000, 50K, 1M")
    return int(number)


@dataclass(frozen=True)
class Workload:
    """One serving scenario: context length n, output tokens N_out, users B batched, tensor-parallel degree N."""

    context: int
    output_tokens: int = 250
    users: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for key, low in (("context", 1), ("output_tokens", 1), ("users", 1), ("tp", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KVCompressError(f"workload {key}={value!r} is invalid; valid: an integer >= {low}")


@dataclass(frozen=True)
class Serving:
    """Serving-engine options (:mod:`kvcompress.latency.metrics` docstring). Defaults match common engines (vLLM):
    90% of HBM for the engine, an activation reserve, weights and KV in the model's dtype, no shared prefix, TP
    all-reduces charged.

    * ``memory_utilization`` — fraction of each GPU's HBM the engine may use (vLLM's gpu_memory_utilization), (0, 1];
    * ``activation_reserve`` — bytes per GPU kept for activations / workspace, or ``"auto"``
      (:func:`activation_reserve`); 0 with ``memory_utilization=1`` is the bare first-principles capacity;
    * ``weight_dtype`` / ``kv_dtype`` — ``bf16``, ``fp16``, ``fp8``, ``fp4``, ``fp32`` (None = the model's dtype /
      the compression profile's); the weights' format picks the FLOP rate (:meth:`HardwareProfile.flops`);
    * ``prefix_tokens`` — leading context tokens shared by every user (prefix caching);
    * ``tp_communication`` — charge the all-reduces of tensor parallelism (False = Fu 2024's free communication).

    The ``paper`` convention applies the dtypes only (the rest is listed as ``not_applied`` in the report)."""

    memory_utilization: float = 0.9
    activation_reserve: float | str = "auto"
    weight_dtype: str | None = None
    kv_dtype: str | None = None
    prefix_tokens: int = 0
    tp_communication: bool = True

    def __post_init__(self) -> None:
        u = self.memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not (0.0 < u <= 1.0):
            raise KVCompressError(f"memory_utilization={u!r} is invalid; valid: a fraction in (0, 1] (vLLM: 0.9)")
        a = self.activation_reserve
        if isinstance(a, str):
            if a != "auto":
                try:
                    object.__setattr__(self, "activation_reserve", float(a))
                except ValueError:
                    raise KVCompressError(f"activation_reserve={a!r} is invalid; valid: auto or bytes per GPU "
                                          ">= 0") from None
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            raise KVCompressError(f"activation_reserve={a!r} is invalid; valid: auto or bytes per GPU >= 0")
        a = self.activation_reserve
        if not isinstance(a, str) and not (a >= 0 and math.isfinite(a)):
            raise KVCompressError(f"activation_reserve={a!r} is invalid; valid: auto or bytes per GPU >= 0")
        for key in ("weight_dtype", "kv_dtype"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, dtype_name(getattr(self, key)))
        p = self.prefix_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise KVCompressError(f"prefix_tokens={p!r} is invalid; valid: an integer >= 0 (<= context)")
        if not isinstance(self.tp_communication, bool):
            raise KVCompressError(f"tp_communication={self.tp_communication!r} is invalid; valid: true or false")


def activation_reserve(model: ModelProfile, tp: int = 1) -> float:
    """``activation_reserve="auto"``: bytes per GPU for the live activations of one chunked-prefill step of
    C = :data:`RESERVE_CHUNK_TOKENS` tokens through one layer, plus fp32 logits of S = :data:`RESERVE_LOGIT_SEQS`
    sequences::

        R_act = C · 2 B · (2·d + ((n_q + 2·n_kv)·d_h + n_q·d_v + 3·f) / N) + S · V · 4 B

    (residual stream and its normed copy; q/k/v, attention output, gate/up/activation of the FFN, sharded over N
    GPUs; f = the widest FFN a token goes through: the dense one, or k routed + shared experts). A lower bound of
    what engines reserve: CUDA graphs, the allocator's fragmentation and NCCL buffers are not included (vLLM
    measures them in a profiling run)."""
    m = model
    f = m.intermediate_size if (not m.is_moe or m.first_dense_layers) else 0
    if m.is_moe:
        f_e = m.moe_intermediate_size or m.intermediate_size
        f = max(f, m.experts_per_token * f_e + m.num_shared_experts * f_e + m.shared_expert_intermediate_size)
    sharded = (m.num_q_heads + 2 * m.num_kv_heads) * m.head_dim + m.num_q_heads * m.value_dim + 3 * f
    return (RESERVE_CHUNK_TOKENS * ACTIVATION_BYTES * (2 * m.hidden_size + sharded / tp)
            + RESERVE_LOGIT_SEQS * m.vocab_size * 4.0)


def kv_replication(model: ModelProfile, tp: int) -> int:
    """KV replication r under N-way tensor parallelism (vLLM's rule for GQA/MQA).

    N must divide the query heads n_q. If N also divides the KV heads n_kv, each GPU holds n_kv / N of them (r = 1);
    if N is a multiple of n_kv, each KV head is replicated on N / n_kv GPUs (r = N / n_kv: more KV bytes in total,
    as vLLM does). An N that neither divides nor is a multiple of n_kv (or does not divide n_q) is an error."""
    nq, nkv = model.num_q_heads, model.num_kv_heads
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise KVCompressError(f"tp={tp!r} is invalid; valid: an integer >= 1 dividing {nq} query heads")
    if nq % tp == 0 and nkv % tp == 0:
        return 1
    if nq % tp == 0 and tp % nkv == 0:
        return tp // nkv
    valid = [d for d in _divisors(nq) if nkv % d == 0 or d % nkv == 0]
    raise KVCompressError(f"tp={tp} does not fit {model.name} ({nq} query heads, {nkv} KV heads): tp must divide "
                          f"the query heads and either divide the KV heads or be a multiple of them (each KV head "
                          f"then replicated tp/{nkv} times, as vLLM does); valid: {', '.join(map(str, valid))}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
