"""Fu 2024's four serving metrics (plus session throughput) for any model, GPU, workload and compression.

Reference: Yao Fu, *Challenges in Deploying Long-Context Transformers: A Theoretical Peak Performance Analysis*,
arXiv 2405.08944. Notation: n context tokens, N_out output tokens, B users batched (``Workload.users``), N GPUs of
tensor parallelism, F / BW / PCIe the GPU's peak FLOP/s (of the weights' format, :meth:`HardwareProfile.flops`),
HBM bandwidth and host link times the efficiency factors and N, b_w bytes per weight (``weight_dtype``), KV(n) the KV
bytes of one sequence (compressed or dense, in ``kv_dtype``), r the KV replication under TP (below), V·d the
embedding table. Two conventions:

**paper** — Fu 2024's formulas as they reproduce its published numbers (``paper_tables/fu2024.md``)::

    T_pre = B · (2·P_act·n + A₁(n) + X − S) / F             # A₁ = QKᵀ only: Σ_l 2·n_q·d_h·Σ_{i≤n} min(i, w_l) ≈ L·d·n²
    T_dec = N_out · (P_act·b_w + r·B·KV(n)) / BW            # all weights and the prompt's KV, every step
    C     = (N·memory_gb − P·b_w/1e9) / (r·KV(n) / 2**30)   # "80 − 68 = 12" GB over a GiB-valued KV
    P     = the preset's ``paper_params`` (Yi-34B-200K: 34e9) where it has one, else the architecture's count

  No memory reserve, no TP communication, no prefix sharing, no context limit (the paper sweeps Yi-34B-200K to 1M);
  these options are recorded as ``not_applied``.

**exact** — the default for results rows; what a first-principles count gives::

    T_pre = B · max(F_pre / F, R_pre / BW) + B · T_comm(n − p)
      F_pre = 2·P_body,act·(n − p) + 2·V·d + A₂(n) − A₂(p) + X − S      # no FLOPs for the embedding lookup;
      A₂    = QKᵀ and AV: Σ_l 2·n_q·(d_h + d_v)·Σ_{i≤n} min(i, w_l)      # lm_head at the last position only
      R_pre = W(n − p)·b_w + r·KV(n)                                    # weights read once, the cache written
    T_dec = Σ_{t=0}^{N_out−1} [ max((W(B)·b_w + r·B·(KV(n+t) + KV₁)) / BW, B·F_dec(n+t) / F) + T_comm(B) ]
      W(k)     = P_body,act + MoE experts the k tokens touch beyond their k-way share + V·d (lm_head, once per
                 generated token) + k·d (the embedding rows gathered; the table is not read whole)
      F_dec(c) = 2·P_body,act + 2·V·d + Σ_l 2·n_q·(d_h + d_v)·min(c + 1, w_l) · (kept token share)
    C     = (u·N·memory_bytes − P·b_w − N·R_act − r·KV(p)) / (r·(KV(n + N_out) − KV(p)))   # bytes throughout
    T_comm(k) = 2·L · (α + 2·(N−1)/N · k·d·2 B / link)   # two all-reduces per layer (Megatron TP), ring, bf16
                                                          # activations, link = NVLink/IF per direction; N = 1: 0

  P is the architecture's count (``paper_params`` is ignored); u = ``memory_utilization`` (default 0.9, vLLM's
  gpu_memory_utilization); R_act = ``activation_reserve`` per GPU (default ``auto`` = :func:`activation_reserve`);
  p = ``prefix_tokens`` shared by every user (their KV held once; their prefill computed once and amortised);
  each user still reads its whole KV while decoding (paged attention reads shared pages per sequence). The context
  must fit the model: n + N_out ≤ max_position_embeddings.

Both: X = the method's declared extra scoring FLOPs, S = 4·d·n_kv·d_h·n per layer whose K/V projection the method
skips at prefill; MoE prefill FLOPs follow the active parameters, HBM holds all experts; MLA caches one latent per
token and layer (:mod:`kvcompress.latency.architecture`).

* **context switch** (PCIe bound), Fu 2024: "(user 1's KV cache + user 2's KV cache) / PCIE bandwidth"::

      T_sw = r · (KV(n) + KV(n)) / (N · PCIe)        # one user swapped out, one swapped in, same context

  PCIe is the per-direction figure of one GPU's link; under TP each GPU moves its own shard over its own link.
* **session throughput** (our definition; the paper's formula was not recovered)::

      TPS(B) = B · N_out / (T_pre(B) + T_dec(B))     # B prompts prefilled one after another, decoded as a batch

  reported at the workload's B and at B = concurrency (``capacity_throughput_tok_s``); ``None`` (shown as "does
  not fit") when the weights or the B users do not fit (``fits``, ``fit``).
* **tensor parallelism**: compute, bandwidth and PCIe terms divide by N, HBM is N·HBM. N must divide n_q, and
  either divide n_kv (r = 1) or be a multiple of it (each KV head is replicated r = N / n_kv times, as vLLM does
  for MQA/GQA; an MLA latent is held by every rank, r = N); an N that neither divides nor is a multiple of n_kv
  is an error (:func:`kv_replication`).

Units: times in seconds, rates in B/s and FLOP/s, bytes raw; ``*_gib`` = bytes / 2**30. Fu 2024 prints GiB values
labelled "GB" and truncated (22.888 → "22.8"): see :func:`truncate`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import KVCompressError, unknown_choice
from .dtypes import dtype_bytes, name_of_bytes
from .hardware import Efficiency, HardwareProfile, load_efficiency, load_hardware
from .model_profile import ModelProfile, load_model_profile
from .profile import CompressionProfile
from .serving import ACTIVATION_BYTES, Serving, Workload, activation_reserve, kv_replication, parse_tokens

CONVENTIONS = ("exact", "paper")
GIB = 2**30


def truncate(value: float, digits: int) -> float:
    """Truncate (not round) to ``digits`` decimals, as Fu 2024 displays memory: 22.888 → 22.8 (digits=1)."""
    scale = 10**digits
    return math.floor(value * scale + 1e-9) / scale


@dataclass(frozen=True)
class Metrics:
    """The metrics of one configuration (compressed or baseline); see the module docstring for formulas."""

    kv_bytes: float  #: KV of one user at the context (all GPUs together, replication included)
    kv_gib: float
    decode_bytes_per_step: float  #: weights and KV read by the first decode step, all GPUs together
    users_fit: float
    concurrency: int
    prefill_s: float
    decode_s: float
    decode_ms_per_token: float
    context_switch_s: float
    session_throughput_tok_s: float | None  #: None when it does not fit
    capacity_throughput_tok_s: float | None  #: None when not even one user fits
    fits: bool  #: the weights and the workload's users fit
    fit: str = ""  #: "fits" or "does not fit: why"
    weight_bytes: float = 0.0  #: weights in HBM, all GPUs together
    kv_budget_bytes: float = 0.0  #: HBM left for KV (all GPUs): u·N·HBM − weights − N·reserve
    prefill_flops: float = 0.0  #: FLOPs of one user's prefill
    tp_comm_s: float = 0.0  #: of decode_s: TP all-reduce time (exact convention, tp > 1)


_RATIO_KEYS = ("kv_bytes", "decode_bytes_per_step", "users_fit", "prefill_s", "decode_s", "context_switch_s",
               "session_throughput_tok_s")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a / b if b else math.nan


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
    serving: dict[str, Any] = field(default_factory=dict)

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
        out["serving"] = dict(self.serving)
        return out


class _Setup:
    """Everything both conventions need, resolved once per estimate."""

    def __init__(self, model: ModelProfile, hw: HardwareProfile, wl: Workload, eff: Efficiency, serving: Serving,
                 weight_bytes: float, weight_format: str):
        self.m, self.hw, self.wl, self.eff, self.serving = model, hw, wl, eff, serving
        self.r = kv_replication(model, wl.tp)
        self.wb = weight_bytes
        rate, self.flops_format = hw.flops(weight_format)
        self.flops = rate * eff.flops * wl.tp
        self.bw = hw.hbm_bandwidth * eff.bandwidth * wl.tp
        self.pcie = hw.pcie_bandwidth * eff.pcie * wl.tp


def _comm(s: _Setup, tokens: float) -> float:
    """Two ring all-reduces per layer of ``tokens``·d bf16 activations: 2·L·(α + 2(N−1)/N·M/link); 0 at N = 1."""
    n = s.wl.tp
    if n == 1 or not s.serving.tp_communication:
        return 0.0
    message = tokens * s.m.hidden_size * ACTIVATION_BYTES
    return 2 * s.m.num_layers * (s.hw.allreduce_latency + 2 * (n - 1) / n * message / s.hw.link_bandwidth())


def _metrics(s: _Setup, convention: str, prof: CompressionProfile) -> Metrics:
    m, wl, hw = s.m, s.wl, s.hw
    n, n_out, b, tp, r = wl.context, wl.output_tokens, wl.users, wl.tp, s.r
    rates = prof.layer_rates()

    def kv(ctx: float) -> float:
        return sum(rt * c for rt, c in zip(rates, m.layer_tokens(ctx)))

    kv_n = kv(n)
    skipped = 4 * m.hidden_size * m.num_kv_heads * m.head_dim * n * len(prof.prefill_skips_kv_layers)
    extra = prof.at_context(n).extra_prefill_flops if prof.context_tokens != n else prof.extra_prefill_flops
    comm_s = 0.0
    if convention == "paper":
        p_total = m.paper_params or m.params_total
        p_act = m.paper_params * (m.params_active / m.params_total) if m.paper_params else m.params_active
        pre_flops = 2 * p_act * n + m.attention_flops(n) + extra - skipped
        prefill = b * pre_flops / s.flops
        w_act, w_all = p_act * s.wb, p_total * s.wb

        def decode_time(users: int) -> float:
            return n_out * (w_act + r * users * kv_n) / s.bw

        spare = tp * hw.memory_gb - w_all / 1e9
        budget = spare * 1e9
        users = spare / (r * kv_n / GIB) if kv_n else math.inf
        step_bytes = w_act + r * b * kv_n
    else:
        p = s.serving.prefix_tokens
        fresh = n - p
        pre_flops = (2 * m.body_params_active * fresh + 2 * m.lm_head_params + m.prefix_attention_flops(p, n)
                     + (extra - skipped) * fresh / n)
        pre_bytes = m.decode_weight_params(fresh) * s.wb + r * kv_n
        prefill = b * (max(pre_flops / s.flops, pre_bytes / s.bw) + _comm(s, fresh))
        write = sum(rates)  # one new entry per layer (a full sliding window overwrites one: still a write)
        steps = [kv(n + t) for t in range(n_out)]
        cap = m.layer_tokens(n)
        share = sum(sum(row) for row in prof.at_context(n).kept_tokens) / (m.num_kv_heads * sum(cap)) if sum(cap) \
            else 1.0
        w_all = m.params_total * s.wb

        def decode_time(users: int) -> float:
            w = m.decode_weight_params(users) * s.wb
            dense = 2 * m.body_params_active + 2 * m.lm_head_params
            comm = _comm(s, users)
            return sum(max((w + r * users * (kv_t + write)) / s.bw,
                           users * (dense + share * m.decode_attention_flops(n + t)) / s.flops) + comm
                       for t, kv_t in enumerate(steps))

        reserve = s.reserve
        budget = s.serving.memory_utilization * tp * hw.memory_bytes - w_all - tp * reserve
        shared = r * kv(p) if p else 0.0
        per_user = r * (kv(n + n_out) - (kv(p) if p else 0.0))
        users = (budget - shared) / per_user if per_user else math.inf
        spare = budget - shared
        step_bytes = m.decode_weight_params(b) * s.wb + r * b * (kv_n + write)
        comm_s = n_out * _comm(s, b)
    decode = decode_time(b)
    users = max(0.0, users)
    conc = int(math.floor(users + 1e-9)) if math.isfinite(users) else 2**31 - 1
    switch = r * 2 * kv_n / s.pcie
    fits = spare > 0 and users >= b
    hbm = (f"{tp} × {hw.memory_gb:g} GB" if convention == "paper"
           else f"{s.serving.memory_utilization:g} × {tp} × {hw.memory_bytes / 1e9:,.1f} GB")
    if fits:
        fit = "fits"
    elif spare <= 0:
        held = f"weights {w_all / 1e9:,.1f} GB"
        if convention != "paper":
            held += f" + activation reserve {tp * s.reserve / 1e9:,.1f} GB"
            held += f" + shared prefix {shared / 1e9:,.1f} GB" if shared else ""
        fit = f"does not fit: {held} exceed {hbm} ({hw.name})"
    else:
        need, left = (b * r * kv_n / GIB, spare) if convention == "paper" else (b * per_user / 1e9, spare / 1e9)
        fit = (f"does not fit: {b} user{' needs' if b == 1 else 's need'} {need:,.1f} GB of KV, "
               f"{left:,.1f} GB left of {hbm} ({hw.name})")
    tps = b * n_out / (prefill + decode) if fits else None
    cap_tps = None
    if conc >= 1 and spare > 0:
        cb = min(conc, 2**20)
        cap_tps = cb * n_out / (prefill / b * cb + decode_time(cb))
    return Metrics(
        kv_bytes=r * kv_n, kv_gib=r * kv_n / GIB, decode_bytes_per_step=step_bytes, users_fit=users,
        concurrency=conc, prefill_s=prefill, decode_s=decode, decode_ms_per_token=1e3 * decode / n_out,
        context_switch_s=switch, session_throughput_tok_s=tps, capacity_throughput_tok_s=cap_tps,
        fits=fits, fit=fit, weight_bytes=w_all, kv_budget_bytes=budget, prefill_flops=pre_flops, tp_comm_s=comm_s,
    )


def estimate(model_profile: Any, hardware: Any = "a100-80gb", workload: Workload | int | None = None,
             compression: CompressionProfile | None = None, efficiency: str | Efficiency = "peak",
             convention: str = "exact", label: str = "", serving: Serving | None = None) -> LatencyReport:
    """The four metrics and session throughput, compressed and uncompressed, and their ratios.

    ``model_profile``: a :class:`ModelProfile` or anything :func:`load_model_profile` takes; ``hardware``: a
    profile or a name; ``workload``: a :class:`Workload` (an int is a context length); ``compression``: a
    :class:`CompressionProfile` of the same model (``None`` = dense), rescaled to the workload's context by
    holding its per-(layer, head) fractions; ``convention``: ``exact`` (default) or ``paper`` (module docstring);
    ``serving``: :class:`Serving` options (default: vLLM-like, module docstring). Bad input raises a one-line
    :class:`~kvcompress.errors.KVCompressError`.
    """
    model = load_model_profile(model_profile)
    hw = load_hardware(hardware)
    eff = load_efficiency(efficiency)
    serving = serving or Serving()
    if workload is None:
        raise KVCompressError("workload is missing; valid: Workload(context=...) or a context length")
    wl = workload if isinstance(workload, Workload) else Workload(context=parse_tokens(workload))
    if convention not in CONVENTIONS:
        raise unknown_choice("convention", convention, CONVENTIONS)
    if convention == "exact":
        model.check_context(wl.context + wl.output_tokens)
    if serving.prefix_tokens > wl.context:
        raise KVCompressError(f"prefix_tokens={serving.prefix_tokens} exceeds the context of {wl.context} tokens; "
                              f"valid: 0..{wl.context}")
    weight_format = serving.weight_dtype or name_of_bytes(model.dtype_bytes)
    kv_format = serving.kv_dtype or name_of_bytes(compression.dtype_bytes if compression is not None
                                                 else model.dtype_bytes)
    kv_elem = dtype_bytes(kv_format)
    if compression is not None:
        if compression.model.num_layers != model.num_layers or compression.model.num_kv_heads != model.num_kv_heads:
            raise KVCompressError(f"compression profile is for {compression.model.name} ({compression.model.num_layers}"
                                  f" layers × {compression.model.num_kv_heads} KV heads), not {model.name}; valid: "
                                  "use project()")
        compression = dataclasses.replace(compression, model=model)
        if compression.dtype_bytes != kv_elem:
            compression = compression.at_dtype(kv_elem)
        if not compression.kv_bytes() > 0:
            raise KVCompressError(f"compression {compression.name!r} keeps nothing (every kept_tokens entry is 0 or "
                                  "every layer shared); valid: at least one kept token")
    dense = CompressionProfile.dense(model, wl.context, dtype_bytes=kv_elem)
    prof = dense if compression is None else compression
    setup = _Setup(model, hw, wl, eff, serving, dtype_bytes(weight_format), weight_format)
    setup.reserve = (activation_reserve(model, wl.tp) if serving.activation_reserve == "auto"
                     else float(serving.activation_reserve))
    comp = _metrics(setup, convention, prof)
    base = _metrics(setup, convention, dense)
    ratios = {k: _ratio(getattr(comp, k), getattr(base, k)) for k in _RATIO_KEYS}
    ratios["concurrency"] = ratios.pop("users_fit")
    info: dict[str, Any] = {
        "memory_utilization": serving.memory_utilization, "activation_reserve": serving.activation_reserve,
        "activation_reserve_bytes": setup.reserve, "weight_dtype": weight_format, "kv_dtype": kv_format,
        "flops_format": setup.flops_format, "flops_peak": setup.flops / wl.tp / eff.flops,
        "prefix_tokens": serving.prefix_tokens, "tp_communication": serving.tp_communication,
        "kv_replication": setup.r, "attention": model.attention_type,
        "params_total": model.params_total, "params_active": model.params_active,
        "max_position_embeddings": model.max_position_embeddings or None,
        "moe": ({"experts": model.num_experts, "per_token": model.experts_per_token,
                 "touched_per_decode_step": model.experts_touched(wl.users)} if model.is_moe else None),
    }
    if convention == "paper":
        info["params_charged"] = model.paper_params or model.params_total
        info["not_applied"] = ["memory_utilization", "activation_reserve", "prefix_tokens", "tp_communication",
                               "context limit"]
    return LatencyReport(model=model.name, hardware=hw.name, efficiency=eff.name, convention=convention,
                         workload=wl, metrics=comp, baseline=base, ratios=ratios,
                         kept_fractions=prof.at_context(wl.context).kept_fractions(),
                         compression=prof.name, label=label, serving=info)
