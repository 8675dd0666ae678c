"""Generate ``paper_tables/fu2024.md`` and ``.tex``: Fu 2024's running example recomputed with this library.

Run ``python -m kvcompress.latency table`` or ``python -m kvcompress.tables fu2024`` (also part of
``python -m kvcompress.tables``, which regenerates every paper table). Every number is computed here by
:func:`kvcompress.latency.estimate`; the paper's published figures are read from ``fu2024_published.yaml`` only to
fill the "paper" column of the comparison table. The Markdown and LaTeX are rendered by :mod:`kvcompress.tables`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..tables.render import Table, latex_lines, markdown_sections
from .hardware import list_hardware, load_hardware
from .metrics import Serving, Workload, estimate, kv_replication, truncate
from .model_profile import load_model_profile
from .profile import CompressionProfile

MODEL, HARDWARE, N_OUT = "yi-34b-200k", "a100-80gb", 250
CONTEXTS = (4_000, 50_000, 100_000, 200_000, 1_000_000)
TP_DEGREES = (1, 2, 4, 8)


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "does not fit"
    if isinstance(x, float) and not math.isfinite(x):
        return "∞"
    return f"{x:,.{digits}f}"


def _display(value: float, how: str, digits: int) -> float:
    if how == "truncate":
        return truncate(value, digits)
    if how == "floor":
        return float(math.floor(value + 1e-9))
    return round(value, digits)


def comparison_table() -> Table:
    """Paper vs recomputed, with a status per row (published figures from ``fu2024_published.yaml``)."""
    with open(Path(__file__).with_name("fu2024_published.yaml")) as fh:
        published: list[dict[str, Any]] = yaml.safe_load(fh)
    rows, notes = [], []
    for item in published:
        r = estimate(MODEL, HARDWARE, Workload(item["context"], N_OUT, tp=item["tp"]), convention="paper")
        raw = float(getattr(r.metrics, item["metric"]))
        shown = _display(raw, item["display"], item["digits"])
        pub = float(item["published"])
        rel = (raw - pub) / pub
        if shown == pub:
            status = "reproduced"
        elif abs(rel) <= 0.02:
            status = f"within {abs(rel):.1%}"
        else:
            status = "**not reproduced**"
        if item.get("why") and status != "reproduced":
            notes.append(f"{item['quantity']}: {item['why']}.")
        digits = item["digits"]
        rows.append([item["quantity"], f"{pub:.{digits}f}", f"{shown:.{digits}f}", f"{raw:.4g}", status,
                     item["source"]])
    return Table("Paper vs this library (Yi-34B-200K, A100-80GB, 250 output tokens, `paper` convention)",
                 ["quantity", "paper", "recomputed (paper's display)", "raw", "status", "paper figure from"],
                 rows, notes)


def context_table() -> Table:
    rows = []
    limit = load_model_profile(MODEL).max_position_embeddings
    for n in CONTEXTS:
        p1 = estimate(MODEL, HARDWARE, Workload(n, N_OUT), convention="paper")
        p2 = estimate(MODEL, HARDWARE, Workload(n, N_OUT, tp=2), convention="paper")
        if n + N_OUT <= limit:
            ex = estimate(MODEL, HARDWARE, Workload(n, N_OUT), convention="exact")
            bare = estimate(MODEL, HARDWARE, Workload(n, N_OUT), convention="exact",
                            serving=Serving(memory_utilization=1.0, activation_reserve=0))
            exact = [_f(ex.prefill_s, 2), _f(ex.decode_s, 2), _f(bare.users_fit, 2), _f(ex.users_fit, 2),
                     _f(ex.session_throughput_tok_s, 1)]
        else:
            exact = [f"> {limit // 1000}K limit"] * 5
        rows.append([f"{n:,}", _f(p1.kv_gib, 3), _f(p1.prefill_s, 2), _f(p1.decode_s, 2),
                     _f(p1.decode_ms_per_token, 1), _f(p1.users_fit, 2), _f(p2.users_fit, 1),
                     _f(p1.context_switch_s, 2), *exact])
    return Table("Context sweep (Yi-34B-200K, 1 × A100-80GB unless stated)",
                 ["context", "KV GiB", "prefill s", "decode s", "ms/token", "users 1 GPU", "users 2 GPUs",
                  "switch s", "prefill s (exact)", "decode s (exact)", "users (exact, all HBM)",
                  "users (exact, 0.9 + reserve)", "tok/s, 1 user (exact)"], rows,
                 ["`paper` columns: P = 34e9, prefill charges QKᵀ only, decode charges the prompt's KV for all 250 "
                  "steps; users = (N·80 − 68) / KV in GiB.",
                  "`exact` columns: P = 34.39e9 counted from the architecture; prefill charges QKᵀ and AV, no "
                  "embedding FLOPs and the lm_head at the last position only; decode reads each step's KV at its "
                  "actual length plus the new entry's write, the lm_head but not the embedding table; users = "
                  "(u·N·memory_bytes − W − N·reserve) / KV(n + 250) with 80 GiB = 85.9e9 B per A100-80GB, u = 1 and "
                  "no reserve ('all HBM') or vLLM's u = 0.9 and the activation reserve (default serving options).",
                  f"Yi-34B-200K's limit is {limit:,} positions: the `exact` convention rejects longer contexts; the "
                  "`paper` one follows the paper's sweep to 1M.",
                  "switch = (KV₁ + KV₂) / PCIe at 32 GB/s per direction (PCIe Gen4 x16); the paper gives the "
                  "formula only, its PCIe figure is unknown."])


def tp_table(contexts: Sequence[int] = CONTEXTS, gpus: Sequence[int] = TP_DEGREES) -> Table:
    """Users, prefill, decode and switch for every context × TP degree (`paper` convention)."""
    rows = []
    for n in contexts:
        for tp in gpus:
            r = estimate(MODEL, HARDWARE, Workload(n, N_OUT, tp=tp), convention="paper")
            rows.append([f"{n:,}", str(tp), _f(r.users_fit, 2), str(r.concurrency), _f(r.prefill_s, 2),
                         _f(r.decode_s, 2), _f(r.context_switch_s, 3)])
    yi = load_model_profile(MODEL)
    replicated = [f"N = {tp}: ×{kv_replication(yi, tp)}" for tp in gpus if kv_replication(yi, tp) > 1]
    kv_note = (f"KV heads replicated ({', '.join(replicated)})" if replicated
               else f"the {yi.num_kv_heads} KV heads divide every N here, so none is replicated")
    return Table("Tensor parallelism (`paper` convention)",
                 ["context", "GPUs", "users (float)", "users", "prefill s", "decode s", "switch s"], rows,
                 [("Compute, HBM bandwidth and PCIe divide by N; spare HBM is N·80 − 68; communication is free "
                   f"(Fu 2024: 'negligible communication overhead'); {kv_note}.")])


def attention_table() -> Table:
    yi = load_model_profile(MODEL)
    rows = []
    for label, kv in (("MHA", yi.num_q_heads), ("GQA", yi.num_kv_heads), ("MQA", 1)):
        m = yi.with_kv_heads(kv, name=f"yi-34b-{label.lower()}")
        r100 = estimate(m, HARDWARE, Workload(100_000, N_OUT), convention="paper")
        r50 = estimate(m, HARDWARE, Workload(50_000, N_OUT), convention="paper")
        r4 = estimate(m, HARDWARE, Workload(4_000, N_OUT, tp=2), convention="paper")
        rows.append([label, str(kv), f"{m.kv_bytes_per_token:,}", _f(r100.kv_gib, 2), _f(r50.users_fit, 2),
                     _f(r4.users_fit, 1), _f(r50.decode_s, 2), _f(r50.context_switch_s, 3)])
    return Table("Attention type (Yi-34B-200K shape, P held at 34e9; `paper` convention)",
                 ["attention", "KV heads", "KV B/token", "KV GiB at 100K", "users at 50K, 1 GPU",
                  "users at 4K, 2 GPUs", "decode s at 50K", "switch s at 50K"], rows,
                 ["Prefill is unchanged: attention FLOPs use the 56 query heads whatever the KV head count."])


def compression_table() -> Table:
    yi = load_model_profile(MODEL)
    heads = yi.num_layers * yi.num_kv_heads
    cases: list[tuple[str, dict[str, Any]]] = [
        ("none", {}),
        ("layer: 1 of 60 layers", {"layer_fraction": 1 / 60}),
        (f"head: 20 of 1024 (→ nearest {round(heads * 20 / 1024)} of {heads} KV heads)",
         {"head_fraction": 20 / 1024}),
        ("token: 50%", {"token_fraction": 0.5}),
        ("hidden: rank 128 of 2048 (1/16)", {"rank_fraction": 1 / 16}),
        ("hidden: 4-bit, group 32, fp16 scale+zero", {"key_bits": 4, "value_bits": 4, "group_size": 32}),
    ]
    rows = []
    for label, kw in cases:
        prof = CompressionProfile.uniform(yi, 50_000, **kw)
        r50 = estimate(yi, HARDWARE, Workload(50_000, N_OUT), compression=prof, convention="paper")
        r100 = estimate(yi, HARDWARE, Workload(100_000, N_OUT), compression=prof, convention="paper")
        r2 = estimate(yi, HARDWARE, Workload(50_000, N_OUT, tp=2), compression=prof, convention="paper")
        rows.append([label, f"{prof.kept_fractions()['bytes']:.4f}", _f(r100.kv_gib, 2), _f(r50.kv_gib, 2),
                     _f(r50.users_fit, 1), _f(r2.users_fit, 1), _f(r50.decode_s, 2), _f(r50.context_switch_s, 3)])
    return Table("Compressing one axis by the paper's example factors (Yi-34B-200K, A100-80GB, `paper` convention)",
                 ["compression", "KV kept", "KV GiB at 100K", "KV GiB at 50K", "users at 50K, 1 GPU",
                  "users at 50K, 2 GPUs", "decode s at 50K", "switch s at 50K"], rows,
                 ["The factors are attributed to the paper's survey and unverified; a factor is rounded to what a "
                  "cache can realise (whole layers, whole KV heads; Yi has 60 × 8 = 480 KV heads).",
                  "Prefill is unchanged: these methods are memory-only (no declared scoring FLOPs, no skipped "
                  "K/V projections). Low-rank projection matrices (a per-layer constant) are not charged."])


def hardware_table(n: int = 50_000, tp: int = 2) -> Table:
    rows = []
    for name in list_hardware():
        hw = load_hardware(name)
        for eff in ("peak", "measured-a100"):
            r = estimate(MODEL, hw, Workload(n, N_OUT, tp=tp), efficiency=eff, convention="exact")
            rows.append([name, eff, _f(r.users_fit, 2), _f(r.prefill_s, 2), _f(r.decode_s, 2),
                         _f(r.context_switch_s, 3), _f(r.capacity_throughput_tok_s, 1)])
    return Table(f"Hardware at {n:,} tokens on {tp} GPUs (`exact` convention)",
                 ["hardware", "efficiency", "users", "prefill s", "decode s", "switch s", "tok/s at capacity"], rows,
                 ["`measured-a100` = 0.70 of peak FLOP/s and 0.75 of peak bandwidth (Vidur's A100 profiles); it is "
                  "applied to every GPU here only for comparison.",
                  "Default serving options: 0.9 of HBM, the activation reserve, bf16 weights and KV, TP all-reduces "
                  "over NVLink / Infinity Fabric (PCIe for the L40S) charged: two per layer, ring, 10 µs (30 µs on "
                  "PCIe) each plus the bytes; users are at the session's end (n + 250 tokens)."])


def all_tables() -> list[Table]:
    return [comparison_table(), context_table(), tp_table(), attention_table(), compression_table(),
            hardware_table()]


PREAMBLE = """\
Yao Fu, *Challenges in Deploying Long-Context Transformers: A Theoretical Peak Performance Analysis*, arXiv
2405.08944. Running example: Yi-34B-200K (60 layers, hidden 7168, 56 query / 8 KV heads, d_h 128, bf16), P = 34e9
and weights W = 68e9 B as the paper charges them, on A100-SXM4-80GB at the theoretical peak (312 TFLOP/s,
2.039 TB/s, efficiency 1.0), 250 output tokens, batch 1.

Formulas (docstring of `kvcompress.latency.metrics`): KV/token = 2·L·n_kv·d_h·2 B = 245,760 B;
prefill = (2·P·n + L·d·n²) / FLOP/s; decode = N_out·(W + KV) / BW; concurrency = (N·80 − 68) / KV[GiB];
context switch = (KV₁ + KV₂) / PCIe; tensor parallelism divides compute and bandwidth by N.
"4K" = 4,000 tokens. Memory is bytes / 2³⁰ ("GiB"); the paper labels it "GB" and truncates it (22.888 → 22.8).
Tables use the `paper` convention unless they say `exact` (the default of results rows: both attention matmuls,
no embedding FLOPs, the lm_head once per generated token, the architecture's parameter count, serving options;
README "Serving-cost model").
"""


def render_markdown(tables: Sequence[Table]) -> str:
    head = ["# Fu 2024 reproduced with `kvcompress.latency`", "",
            "Generated by `python -m kvcompress.latency table`; do not edit by hand.", "", PREAMBLE]
    return "\n".join(head) + "\n" + markdown_sections(tables)


def render_latex(tables: Sequence[Table]) -> str:
    out = ["% Generated by `python -m kvcompress.latency table`; do not edit by hand.",
           "% Fu 2024 (arXiv 2405.08944) running example recomputed with kvcompress.latency.",
           r"% Needs \usepackage{booktabs}.", ""]
    for t in tables:
        out += latex_lines(t, size="small", notes="inline") + [""]
    return "\n".join(out)


def default_out_dir() -> Path:
    """``paper_tables/`` of the source checkout (this file is kvcompress/latency/fu2024.py), else of the cwd."""
    repo = Path(__file__).resolve().parents[2]
    return repo / "paper_tables" if (repo / "pyproject.toml").is_file() else Path.cwd() / "paper_tables"


def write_tables(out_dir: str | Path | None = None) -> list[Path]:
    """Write ``fu2024.md`` and ``fu2024.tex`` into ``out_dir`` and return their paths."""
    out = Path(out_dir) if out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    tables = all_tables()
    paths = [out / "fu2024.md", out / "fu2024.tex"]
    paths[0].write_text(render_markdown(tables))
    paths[1].write_text(render_latex(tables))
    return paths


if __name__ == "__main__":
    for p in write_tables(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
