"""Fu 2024's four serving metrics (plus session throughput) for any model, GPU, workload and compression.

Reference: Yao Fu, *Challenges in Deploying Long-Context Transformers: A Theoretical Peak Performance Analysis*,
arXiv 2405.08944. Notation: n context tokens, N_out output tokens, B users batched (``Workload.users``), N GPUs of
tensor parallelism, P_act active parameters, W = P_total·bytes (weights in HBM), W_act = P_act·bytes (weights read
per decode step), KV(n) the KV bytes of one sequence (compressed or dense), F/BW/PCIe the GPU's peak rates times
the efficiency factors (default 1.0 = the paper's theoretical peak), r = KV replication under TP (below).

* **prefill** (compute bound)::

      T_pre = B · (2·P_act·n + A(n) + X − S) / (N · F)

  A(n) = Σ_l 2·(n_q·d_h)·Σ_{i≤n} min(i, w_l) ≈ L·d·n² (Fu 2024 / Kaplan), X the method's declared extra scoring
  FLOPs, S = 4·d·n_kv·d_h·n per layer whose K/V projection the method skips at prefill.
* **decode** (bandwidth bound; no FLOP term, no lm_head special case, as in the paper)::

      paper:  T_dec = N_out · (W_act + r·B·KV(n)) / (N · BW)          # KV charged at the prompt length
      exact:  T_dec = Σ_{t=0}^{N_out−1} max((W_act + r·B·(KV(n+t) + KV₁)) / (N · BW), 2·P_act·B / (N·F))

  where ``exact`` reads each step's KV once at its actual length n+t, writes the new token's entry (KV₁), and takes
  the compute roofline into account. KV is counted with the KV heads (never the query heads).
* **concurrency** (HBM bound)::

      paper:  C = (N·memory_gb − W/1e9) / (r·KV(n) / 2**30)    # GB-labelled HBM and weights, GiB-valued KV
      exact:  C = (N·memory_bytes − W) / (r·KV(n + N_out))      # bytes throughout, KV at the session's end

  The paper divides "80 − 68 = 12" by a KV size in GiB; both ignore activations and fragmentation. Reported as a
  float (``users_fit``) and floored (``concurrency``).
* **context switch** (PCIe bound), Fu 2024: "(user 1's KV cache + user 2's KV cache) / PCIE bandwidth"::

      T_sw = r · (KV(n) + KV(n)) / (N · PCIe)        # one user swapped out, one swapped in, same context

  PCIe is the per-direction figure of one GPU's link; under TP each GPU moves its own shard over its own link.
* **session throughput** (our definition; the paper's formula was not recovered)::

      TPS(B) = B · N_out / (T_pre(B) + T_dec(B))     # B prompts prefilled one after another, decoded as a batch

  reported at the workload's B and at B = concurrency (``capacity_throughput_tok_s``).
* **tensor parallelism**: compute, bandwidth and PCIe terms divide by N, spare HBM is N·HBM − W, communication is
  free (Fu 2024: "negligible communication overhead"). N must divide n_q, and either divide n_kv (r = 1) or be a
  multiple of it (each KV head is replicated r = N / n_kv times, as vLLM does for MQA/GQA); an N that neither
  divides nor is a multiple of n_kv is an error (:func:`kv_replication`).

Units: times in seconds, rates in B/s and FLOP/s, bytes raw; ``*_gib`` = bytes / 2**30. Fu 2024 prints GiB values
labelled "GB" and truncated (22.888 → "22.8"): see :func:`truncate`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import KVCompressError
from .hardware import Efficiency, HardwareProfile, load_efficiency, load_hardware
from .model_profile import ModelProfile, load_model_profile
from .profile import CompressionProfile

CONVENTIONS = ("exact", "paper")
GIB = 2**30


def truncate(value: float, digits: int) -> float:
    """Truncate (not round) to ``digits`` decimals, as Fu 2024 displays memory: 22.888 → 22.8 (digits=1)."""
    scale = 10**digits
    return math.floor(value * scale + 1e-9) / scale


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
class Metrics:
    """The metrics of one configuration (compressed or baseline); see the module docstring for formulas."""

    kv_bytes: float  #: KV of one user at the context (all GPUs together, replication included)
    kv_gib: float
    decode_bytes_per_step: float  #: W_act + r·B·KV(n), all GPUs together, first decode step
    users_fit: float
    concurrency: int
    prefill_s: float
    decode_s: float
    decode_ms_per_token: float
    context_switch_s: float
    session_throughput_tok_s: float
    capacity_throughput_tok_s: float
    fits: bool  #: weights fit and the workload's users fit


_RATIO_KEYS = ("kv_bytes", "decode_bytes_per_step", "users_fit", "prefill_s", "decode_s", "context_switch_s",
               "session_throughput_tok_s")


@dataclass
class LatencyReport:
    """Metrics with and without compression, plus their ratios (compressed / baseline)."""

    model: str
    hardware: str
    efficiency: str
    convention: str
    workload: Workload
    metrics: Metrics
    baseline: Metrics
    ratios: dict[str, float] = field(default_factory=dict)
    kept_fractions: dict[str, float] = field(default_factory=dict)
    compression: str = "dense"
    label: str = ""

    def __getattr__(self, name: str) -> Any:  # report.kv_bytes, report.prefill_s, ... come from ``metrics``
        if name != "metrics" and "metrics" in self.__dict__ and hasattr(self.__dict__["metrics"], name):
            return getattr(self.__dict__["metrics"], name)
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: identity keys and the compressed metrics at top level; ``baseline``, ``ratio`` nested."""
        out: dict[str, Any] = {"label": self.label, "model": self.model, "hardware": self.hardware,
                               "efficiency": self.efficiency, "convention": self.convention,
                               "compression": self.compression, **asdict(self.workload), **asdict(self.metrics)}
        out["baseline"] = asdict(self.baseline)
        out["ratio"] = dict(self.ratios)
        out["kept_fractions"] = dict(self.kept_fractions)
        return out


def kv_replication(model: ModelProfile, tp: int) -> int:
    """KV replication r under N-way tensor parallelism (vLLM's rule for GQA/MQA).

    N must divide the query heads n_q. If N also divides the KV heads n_kv, each GPU holds n_kv / N of them (r = 1);
    if N is a multiple of n_kv, each KV head is replicated on N / n_kv GPUs (r = N / n_kv: more KV bytes in total,
    as vLLM does). An N that neither divides nor is a multiple of n_kv (or does not divide n_q) is an error."""
    nq, nkv = model.num_q_heads, model.num_kv_heads
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


def _metrics(model: ModelProfile, hw: HardwareProfile, wl: Workload, eff: Efficiency, convention: str,
             prof: CompressionProfile) -> Metrics:
    n, n_out, b, tp = wl.context, wl.output_tokens, wl.users, wl.tp
    r = kv_replication(model, tp)
    flops, bw, pcie = hw.flops_bf16 * eff.flops * tp, hw.hbm_bandwidth * eff.bandwidth * tp, \
        hw.pcie_bandwidth * eff.pcie * tp
    rates, m = prof.layer_rates(), model

    def kv(ctx: float) -> float:
        return sum(rt * c for rt, c in zip(rates, m.layer_tokens(ctx)))

    kv_n = kv(n)
    skipped = 4 * m.hidden_size * m.num_kv_heads * m.head_dim * n * len(prof.prefill_skips_kv_layers)
    extra = prof.at_context(n).extra_prefill_flops if prof.context_tokens != n else prof.extra_prefill_flops
    prefill = b * (2 * m.params_active * n + m.attention_flops(n) + extra - skipped) / flops
    w_act, w_all = m.active_weight_bytes, m.weight_bytes
    if convention == "paper":
        def decode_time(users: int) -> float:
            return n_out * (w_act + r * users * kv_n) / bw

        spare = tp * hw.memory_gb - w_all / 1e9
        users = spare / (r * kv_n / GIB) if kv_n else math.inf
    else:
        write = kv(n + 1) - kv_n
        steps = [kv(n + t) for t in range(n_out)]

        def decode_time(users: int) -> float:
            floor = 2 * m.params_active * users / flops
            return sum(max((w_act + r * users * (s + write)) / bw, floor) for s in steps)

        spare = tp * hw.memory_bytes - w_all
        users = spare / (r * kv(n + n_out)) if kv_n else math.inf
    decode = decode_time(b)
    users = max(0.0, users)
    conc = int(math.floor(users + 1e-9)) if math.isfinite(users) else 2**31 - 1
    switch = r * 2 * kv_n / pcie
    tps = b * n_out / (prefill + decode)
    cap = 0.0
    if conc >= 1:
        cb = min(conc, 2**20)
        cap = cb * n_out / (prefill / b * cb + decode_time(cb))
    return Metrics(
        kv_bytes=r * kv_n, kv_gib=r * kv_n / GIB, decode_bytes_per_step=w_act + r * b * kv_n, users_fit=users,
        concurrency=conc, prefill_s=prefill, decode_s=decode, decode_ms_per_token=1e3 * decode / n_out,
        context_switch_s=switch, session_throughput_tok_s=tps, capacity_throughput_tok_s=cap,
        fits=spare > 0 and users >= b,
    )


def estimate(model_profile: Any, hardware: Any = "a100-80gb", workload: Workload | int | None = None,
             compression: CompressionProfile | None = None, efficiency: str | Efficiency = "peak",
             convention: str = "exact", label: str = "") -> LatencyReport:
    """The four metrics and session throughput, compressed and uncompressed, and their ratios.

    ``model_profile``: a :class:`ModelProfile` or anything :func:`load_model_profile` takes; ``hardware``: a
    profile or a name; ``workload``: a :class:`Workload` (an int is a context length); ``compression``: a
    :class:`CompressionProfile` of the same model (``None`` = dense), rescaled to the workload's context by
    holding its per-(layer, head) fractions; ``convention``: ``exact`` (default) or ``paper`` (module docstring).
    """
    model = load_model_profile(model_profile)
    hw = load_hardware(hardware)
    eff = load_efficiency(efficiency)
    if workload is None:
        raise KVCompressError("workload is missing; valid: Workload(context=...) or a context length")
    wl = workload if isinstance(workload, Workload) else Workload(context=parse_tokens(workload))
    if convention not in CONVENTIONS:
        raise KVCompressError(f"unknown convention {convention!r}; valid choices: {', '.join(CONVENTIONS)}")
    if compression is not None:
        if compression.model.num_layers != model.num_layers or compression.model.num_kv_heads != model.num_kv_heads:
            raise KVCompressError(f"compression profile is for {compression.model.name} ({compression.model.num_layers}"
                                  f" layers × {compression.model.num_kv_heads} KV heads), not {model.name}; valid: "
                                  "use project()")
        if compression.dtype_bytes != model.dtype_bytes:  # the run's element size wins: weights and KV alike
            model = dataclasses.replace(model, dtype_bytes=compression.dtype_bytes)
        compression = dataclasses.replace(compression, model=model)
    dense = CompressionProfile.dense(model, wl.context)
    prof = dense if compression is None else compression
    comp = _metrics(model, hw, wl, eff, convention, prof)
    base = _metrics(model, hw, wl, eff, convention, dense)
    ratios = {k: (getattr(comp, k) / getattr(base, k) if getattr(base, k) else math.nan) for k in _RATIO_KEYS}
    ratios["concurrency"] = ratios.pop("users_fit")
    return LatencyReport(model=model.name, hardware=hw.name, efficiency=eff.name, convention=convention,
                         workload=wl, metrics=comp, baseline=base, ratios=ratios,
                         kept_fractions=prof.at_context(wl.context).kept_fractions(),
                         compression=prof.name, label=label)
