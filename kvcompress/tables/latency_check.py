"""``paper_tables/latency_check.md``: the latency model (:mod:`kvcompress.latency`, ``exact`` convention) beside an
independent first-principles count, for public configs on A100 and H100 at 4K / 32K / 128K tokens.

``python -m kvcompress.tables latency_check`` (also part of ``python -m kvcompress.tables``) writes it; no rows are
read. The first-principles count (:func:`first_principles`) shares no code with :mod:`kvcompress.latency`: it reads
the same public config fields (``configs/model/*.yaml``'s ``hf_config``) and datasheet constants
(``configs/hardware/*.yaml``) as plain YAML and lists every weight matrix of a layer itself. What it assumes:

* prefill of n tokens, batch 1: every matmul of every layer once per token (2 FLOPs per multiply-add), causal
  attention with both matmuls (QKᵀ and AV, 2·d per (query, key) pair and head each, only the pairs a causal /
  sliding-window mask keeps), the lm_head at the last position only, the embedding lookup free; time =
  max(FLOPs / F, (weights read + KV written) / BW) over N GPUs;
* decode of 250 tokens, batch 1: each step reads the weights of the layers it computes with (a MoE layer: the k
  experts one token picks), the lm_head, one embedding row, the whole KV at its current length and writes one
  entry; time per step = max(bytes / BW, FLOPs / F); reported per token (the mean of the 250 steps);
* users = (N · HBM bytes − weight bytes) / (r · KV bytes at n + 250 tokens), r = KV replication under TP
  (a KV head or an MLA latent held by every GPU that needs it), no reserve;
* peak datasheet rates (efficiency 1), bf16 weights and KV, no TP communication.

The second table runs the same grid with the serving defaults of results rows (0.9 of HBM, the activation reserve,
TP all-reduces charged); the closing notes say where three published analysers disagree, and why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .render import Table, markdown_sections

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
#: (preset, TP degrees): six dense public configs (Llama-3.1-70B at TP 4 and 8), one MoE, one MLA + MoE model.
MODELS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("llama-2-7b", (1,)), ("llama-3.1-8b", (1,)), ("llama-3.1-70b", (4, 8)), ("yi-34b-200k", (1,)),
    ("mistral-7b", (1,)), ("qwen2.5-7b", (1,)), ("mixtral-8x7b", (2,)), ("deepseek-v2-lite", (1,)),
)
HARDWARE = ("a100-80gb", "h100-sxm")
CONTEXTS = (4_000, 32_000, 128_000)
N_OUT = 250
BYTES = 2  # bf16 weights and KV


# ---- the independent first-principles count ----------------------------------------------------------------------
def _yaml(kind: str, name: str) -> dict[str, Any]:
    with open(CONFIGS / kind / f"{name}.yaml") as fh:
        return yaml.safe_load(fh)


def _f(value: Any) -> float:
    return float(value)  # PyYAML reads 312.0e12 as a float but 312e12 as a string


class Architecture:
    """One model's weight matrices, cache shape and attention widths, listed from its config.json fields."""

    def __init__(self, hf: dict[str, Any]):
        self.layers = L = int(hf["num_hidden_layers"])
        self.d = d = int(hf["hidden_size"])
        self.heads = H = int(hf["num_attention_heads"])
        self.vocab = V = int(hf["vocab_size"])
        self.tied = bool(hf.get("tie_word_embeddings", False))
        experts = int(hf.get("num_local_experts") or hf.get("n_routed_experts") or 0)
        if hf.get("kv_lora_rank"):  # MLA: one latent of r + d_rope per token and layer, shared by all heads
            r, rope, nope, dv = (int(hf["kv_lora_rank"]), int(hf["qk_rope_head_dim"]), int(hf["qk_nope_head_dim"]),
                                 int(hf["v_head_dim"]))
            q = [(d, H * (nope + rope))] if not hf.get("q_lora_rank") else \
                [(d, int(hf["q_lora_rank"])), (int(hf["q_lora_rank"]), H * (nope + rope))]
            attention = q + [(d, r + rope), (r, H * (nope + dv)), (H * dv, d)]
            self.qk_width, self.v_width = H * (nope + rope), H * dv
            self.cache_elements, self.kv_heads = r + rope, 1
            extra_norms = r + (int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else 0)
        else:
            dh = int(hf.get("head_dim") or d // H)
            kv = int(hf.get("num_key_value_heads") or H)
            attention = [(d, H * dh), (d, kv * dh), (d, kv * dh), (H * dh, d)]
            self.qk_width = self.v_width = H * dh
            self.cache_elements, self.kv_heads = 2 * kv * dh, kv
            extra_norms = 0
        self.attention = sum(a * b for a, b in attention)
        f = int(hf["intermediate_size"])
        dense_ffn = 3 * d * f  # gate, up, down
        if experts:
            fe = int(hf.get("moe_intermediate_size") or f)
            expert = 3 * d * fe
            shared = int(hf.get("n_shared_experts") or 0) * expert + 3 * d * int(hf.get("shared_expert_intermediate_size") or 0)
            k = int(hf["num_experts_per_tok"])
            dense_layers = int(hf.get("first_k_dense_replace") or 0)
            moe_layers = L - dense_layers
            self.ffn_all = dense_layers * dense_ffn + moe_layers * (experts * expert + shared + d * experts)
            self.ffn_one_token = dense_layers * dense_ffn + moe_layers * (k * expert + shared + d * experts)
            self.moe = (moe_layers, experts, k, expert)
        else:
            self.ffn_all = self.ffn_one_token = L * dense_ffn
            self.moe = None
        self.norms = L * (2 * d + extra_norms) + d
        self.weights = L * self.attention + self.ffn_all + self.norms + V * d * (1 if self.tied else 2)
        self.matmul_per_token = L * self.attention + self.ffn_one_token  # layer matmuls one token goes through
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        self.window = int(window) if window else None

    def held(self, n: float) -> float:
        """Tokens one layer holds after n tokens."""
        return min(n, self.window) if self.window else n

    def kv_bytes(self, n: float) -> float:
        return self.layers * self.held(n) * self.cache_elements * BYTES

    def causal_pairs(self, n: int) -> float:
        """(query, key) pairs of a causal prefill of n tokens in one layer (the window caps each row)."""
        w = self.window
        if w and n > w:
            return w * (w + 1) / 2 + (n - w) * w
        return n * (n + 1) / 2

    def matmul_weights_for(self, tokens: float) -> float:
        """Layer weights a forward of ``tokens`` tokens reads (MoE: the experts they touch, uniform routing)."""
        if not self.moe:
            return self.matmul_per_token + self.norms
        layers, experts, k, expert = self.moe
        touched = experts * (1 - (1 - k / experts) ** tokens)
        return self.matmul_per_token + self.norms + layers * (touched - k) * expert


def first_principles(model: str, hardware: str, n: int, tp: int) -> dict[str, float]:
    """KV GiB per user, weights GB, prefill s, decode ms/token and users of ``model`` on ``tp`` × ``hardware`` at
    ``n`` tokens (module docstring), from the raw YAML files."""
    a = Architecture(_yaml("model", model)["hf_config"])
    hw = _yaml("hardware", hardware)
    flops, bw, hbm = _f(hw["flops_bf16"]) * tp, _f(hw["hbm_bandwidth"]) * tp, _f(hw["memory_bytes"]) * tp
    replicas = tp / a.kv_heads if tp > a.kv_heads else 1  # each GPU holds at least one KV head (or the latent)
    lm_head = a.vocab * a.d
    attn_pair = 2 * (a.qk_width + a.v_width)  # QKᵀ and AV FLOPs per (query, key) pair, all heads
    prefill_flops = 2 * a.matmul_per_token * n + 2 * lm_head + a.layers * attn_pair * a.causal_pairs(n)
    prefill_bytes = (a.matmul_weights_for(n) + lm_head + n * a.d) * BYTES + replicas * a.kv_bytes(n)
    prefill = max(prefill_flops / flops, prefill_bytes / bw)
    step_weights = (a.matmul_weights_for(1) + lm_head + a.d) * BYTES
    entry = a.layers * a.cache_elements * BYTES  # one new K/V entry per layer (a full window overwrites its oldest)
    total = 0.0
    for t in range(N_OUT):
        c = n + t
        step_bytes = step_weights + replicas * (a.kv_bytes(c) + entry)
        step_flops = 2 * a.matmul_per_token + 2 * lm_head + a.layers * attn_pair * a.held(c + 1)
        total += max(step_bytes / bw, step_flops / flops)
    weights = a.weights * BYTES
    users = (hbm - weights) / (replicas * a.kv_bytes(n + N_OUT))
    return {"kv_gib": replicas * a.kv_bytes(n) / 2**30, "weights_gb": weights / 1e9, "prefill_s": prefill,
            "decode_ms": 1e3 * total / N_OUT, "users": users}


# ---- the latency model ----------------------------------------------------------------------------------------
def modelled(model: str, hardware: str, n: int, tp: int, **serving: Any) -> Any:
    from kvcompress.latency import Serving, Workload, estimate

    options = {"memory_utilization": 1.0, "activation_reserve": 0, "tp_communication": False, **serving}
    return estimate(model, hardware, Workload(n, N_OUT, tp=tp), serving=Serving(**options))


def _within_limit(model: str, n: int) -> int | None:
    """The model's position limit when n + N_OUT exceeds it, else None."""
    limit = int(_yaml("model", model)["hf_config"].get("max_position_embeddings") or 0)
    return limit if limit and n + N_OUT > limit else None


def _context(model: str, n: int) -> int:
    """n, or limit − N_OUT for a model whose limit lies between n and n + N_OUT (Llama-2-7B at 4K: 3,846)."""
    limit = int(_yaml("model", model)["hf_config"].get("max_position_embeddings") or 0)
    return limit - N_OUT if limit and n <= limit < n + N_OUT else n


def grid() -> list[tuple[str, int, str, int]]:
    return [(m, tp, hw, _context(m, n)) for m, tps in MODELS for tp in tps for hw in HARDWARE for n in CONTEXTS]


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f}%"


def _num(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def check_table() -> tuple[Table, float]:
    """The model beside the first-principles count; returns the table and the largest |Δ| (prefill, decode, users)."""
    from kvcompress.latency import Workload, estimate

    rows, worst = [], 0.0
    for model, tp, hw, n in grid():
        head = [model, str(tp), hw, f"{n:,}"]
        limit = _within_limit(model, n)
        if limit:
            rows.append(head + [f"beyond the {limit:,}-position limit"] + ["—"] * 14)
            continue
        r, fp = modelled(model, hw, n, tp), first_principles(model, hw, n, tp)
        paper = estimate(model, hw, Workload(n, N_OUT, tp=tp), convention="paper")
        deltas = [r.prefill_s / fp["prefill_s"] - 1, r.decode_ms_per_token / fp["decode_ms"] - 1,
                  r.users_fit / fp["users"] - 1 if fp["users"] > 0 else 0.0]
        worst = max(worst, *(abs(x) for x in deltas))
        users = _num(r.users_fit, 2) if r.users_fit > 0 else "0 (weights do not fit)"
        rows.append(head + [
            _num(r.kv_gib, 3), _num(fp["kv_gib"], 3), _num(r.metrics.weight_bytes / 1e9, 2), _num(fp["weights_gb"], 2),
            _num(r.prefill_s, 3), _num(fp["prefill_s"], 3), _pct(r.prefill_s, fp["prefill_s"]),
            _num(r.decode_ms_per_token, 2), _num(fp["decode_ms"], 2), _pct(r.decode_ms_per_token, fp["decode_ms"]),
            users, _num(max(fp["users"], 0.0), 2), _pct(r.users_fit, fp["users"]) if fp["users"] > 0 else "—",
            _pct(paper.prefill_s, fp["prefill_s"]), _pct(paper.decode_ms_per_token, fp["decode_ms"]),
        ])
    header = ["model", "TP", "GPU", "context", "KV GiB/user", "KV (FP)", "weights GB", "weights (FP)", "prefill s",
              "prefill (FP)", "Δ", "decode ms/token", "decode (FP)", "Δ", "users", "users (FP)", "Δ",
              "`paper` prefill Δ", "`paper` decode Δ"]
    notes = [
        f"Largest |Δ| of the model (`exact` convention, memory_utilization=1, activation_reserve=0, no TP "
        f"communication) against the first-principles count (FP) over prefill, decode and users: {100 * worst:.2f}%. "
        "KV and weights agree to the byte; the residual gaps are the norm weights (counted as read, not as FLOPs).",
        "FP = `kvcompress.tables.latency_check.first_principles`, written apart from the latency model (module "
        "docstring): every matmul once per prompt token, causal attention with both matmuls, the lm_head at the last "
        "prompt position and once per generated token, no embedding FLOPs nor embedding-table reads, the whole KV read "
        "once per decode step at its current length, users = (N·HBM − weights) / KV(n + 250).",
        "`paper` Δ: Fu 2024's formulas (the `paper` convention: QKᵀ only, 2·P·n with the embedding and the lm_head "
        "at every position, all weights and the prompt's KV every decode step) against FP: what the `exact` "
        "convention corrects.",
        "Contexts are 4,000 / 32,000 / 128,000 tokens with 250 generated (Llama-2-7B: 3,846 + 250 = its 4,096 "
        "positions; contexts past a model's limit are rejected by the `exact` convention); bf16 weights and KV; peak datasheet rates "
        "(A100-SXM4-80GB: 312 TFLOP/s, 2.039 TB/s; H100-SXM: 989.4 TFLOP/s, 3.35 TB/s). Mixtral-8x7B (93 GB of "
        "weights) runs on 2 GPUs; Llama-3.1-70B on 4 and 8.",
    ]
    return Table("The latency model beside a first-principles count", header, rows, notes), worst


def serving_table() -> Table:
    """The same grid with the serving defaults of results rows."""
    rows = []
    for model, tp, hw, n in grid():
        head = [model, str(tp), hw, f"{n:,}"]
        limit = _within_limit(model, n)
        if limit:
            rows.append(head + [f"beyond the {limit:,}-position limit"] + ["—"] * 4)
            continue
        r = modelled(model, hw, n, tp, memory_utilization=0.9, activation_reserve="auto", tp_communication=True)
        comm = 1e3 * r.metrics.tp_comm_s / N_OUT
        rows.append(head + [
            _num(r.users_fit, 2), _num(r.serving["activation_reserve_bytes"] / 1e9, 2),
            _num(r.decode_ms_per_token, 2), f"{_num(comm, 2)} ({100 * comm / r.decode_ms_per_token:.0f}%)",
            "fits" if r.fits else "does not fit",
        ])
    return Table("Serving defaults of results rows (0.9 of HBM, activation reserve, TP all-reduces)",
                 ["model", "TP", "GPU", "context", "users", "reserve GB/GPU", "decode ms/token", "of which TP comm",
                  "1 user"], rows,
                 ["users = (0.9·N·HBM − weights − N·reserve) / KV(n + 250); reserve = the `auto` activation reserve "
                  "(a 2,048-token chunked-prefill step through one layer plus fp32 logits of 256 sequences).",
                  "TP communication: two ring all-reduces per layer of the step's activations (bf16), 10 µs each plus "
                  "2·(N−1)/N·bytes over half the NVLink figure, not overlapped with compute."])


PEERS = """\
## Where published analysers disagree, and why

Read from their source (stored copies of `cli99/llm-analysis` `llm_analysis/analysis.py`, `hahnyuan/LLM-Viewer`
`model_analyzer.py` and `hardwares/hardware_params.py`, `abhibambhaniya/GenZ-LLM-Analyzer` `GenZ/Models/attention.py`
and `GenZ/operators.py`); versions move, so treat these as of the copies read.

* **Prefill attention.** All three charge the full n × n score matrix: llm-analysis `4·b·s²·d` per layer (QKᵀ + AV),
  LLM-Viewer `qk_matmul` and `sv_matmul` of `s·s·d_h·H·2` each, GenZ `Logit` / `Attend` operators of M = N = s. A
  causal prefill (FlashAttention's causal mode) computes only the lower triangle, n(n+1)/2 pairs: they are ~2× high
  on the attention term, which dominates at 128K. Fu 2024 charges QKᵀ alone over the causal pairs, ~2× low (the
  `paper` prefill Δ above). This model: both matmuls over the causal pairs.
* **Sliding windows.** None of the three caps Mistral-7B-v0.1's cache or attention at its 4,096-token window, so at
  32K they charge ~7.8× its KV and most of its decode reads; this model and FP hold min(n, 4,096) per layer.
* **Embedding and lm_head.** llm-analysis adds an input-embedding latency that reads the whole V·d table (fp32 bytes by
  default) in every forward, decode steps included; LLM-Viewer's lm_head block is commented out in
  `model_analyzer.py` (a config's `post_process` may add it back). FP and this model: the table is gathered one
  row per token, the lm_head is read and computed once per generated token.
* **MLA.** GenZ's attention module carries a TODO for latent attention and costs DeepSeek's cache as `n_kv` heads of
  `d_h` (16 × 2 × 128 = 4,096 elements per token and layer for DeepSeek-V2-Lite instead of 512 + 64 = 576: 7.1×);
  llm-analysis derives `head_dim = hidden / n_head` and GQA heads the same way. This model caches one latent per
  token and layer, held by every TP rank.
* **GQA under TP.** llm-analysis (`max(n_kv / tp, 1)` heads per GPU) and GenZ (`ceil(Hkv / tp)`) replicate KV heads
  when TP exceeds them, as vLLM does and as this model does; Fu 2024 ignores it.
* **Constants.** LLM-Viewer lists H100 SXM at 3,072 GB/s (the datasheet says 3.35 TB/s: decode ~9% slower there);
  llm-analysis' example outputs use 0.7 of peak FLOP/s and 0.9 of peak bandwidth by default; this table uses peak
  datasheet rates (efficiency 1) on both sides.
* **Rooflines and TP.** LLM-Viewer bounds each operator separately and sums them, llm-analysis sums per-layer attention,
  MLP, layernorm and two TP all-reduces; GenZ adds an all-reduce after attention and after the FFN and reports it as
  28–58% of a TP-8 decode step. This model takes one roofline per step (max of bytes and FLOPs) and adds two ring
  all-reduces per layer (second table); Fu 2024 treats TP communication as free.
"""


def render() -> str:
    table, _ = check_table()
    head = ["# Latency model check: `kvcompress.latency` beside a first-principles count", "",
            "Generated by `python -m kvcompress.tables latency_check`; do not edit by hand.", "",
            "For each public config (Hugging Face config.json fields in `configs/model/`) on A100-SXM4-80GB and "
            "H100-SXM at 4K / 32K / 128K tokens: the model's KV bytes per user, weights, prefill, decode per token and "
            "users beside an independent first-principles count (`kvcompress.tables.latency_check.first_principles`, "
            "which shares no code with the model), the `paper` convention's error against the same count, the "
            "serving defaults, and where published analysers disagree.", ""]
    return "\n".join(head) + "\n" + markdown_sections([table, serving_table()]) + "\n" + PEERS


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``latency_check.md`` into ``out`` (no rows are read)."""
    path = Path(out) / "latency_check.md"
    path.write_text(render())
    return [path]


__all__ = ["Architecture", "check_table", "first_principles", "grid", "modelled", "render", "serving_table", "write"]
