"""``paper_tables/hidden.md``: hidden-axis methods on the constructed testbed (needle accuracy, kept bytes,
reconstruction error) and the pre- vs post-RoPE low-rank projection check. Rows: ``python -m kvcompress.sweep
config=hidden`` (needle runs over ``kvcompress.run``, then ``scripts/rope_check.py`` for the ``rope_check`` row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import distractors, footer, latest, param, sample_state
from .render import markdown

SWEEP = "python -m kvcompress.sweep hidden"
#: Methods in the order the table lists them (each by its parameter, descending).
ORDER = ("full", "quant", "lowrank", "think")
#: Errors closer than this count as equal in the RoPE finding.
ROPE_TOLERANCE = 0.005


def _label(row: dict[str, Any]) -> str:
    if row["method"] == "quant":
        return f"quant {param(row, 'quant', 'bits')}-bit"
    if row["ratio"] is not None:
        return f"{row['method']} {row['ratio']:g}"
    return row["method"]


def _sort_key(row: dict[str, Any]) -> tuple[int, float]:
    method = row["method"]
    value = param(row, "quant", "bits") if method == "quant" else (row["ratio"] or 1.0)
    return (ORDER.index(method) if method in ORDER else len(ORDER), -float(value))


def rope_finding(checks: dict[str, dict]) -> str:
    """The finding, worded from the numbers: per model, at which ranks post-RoPE projection is worse / better / equal
    (within :data:`ROPE_TOLERANCE`) than pre-RoPE, and the largest gap."""
    parts, worse_everywhere = [], []
    for label, res in checks.items():
        gaps = {f: res["post-RoPE"][f] - res["pre-RoPE"][f] for f in res["pre-RoPE"]}
        worse = [f for f, g in gaps.items() if g > ROPE_TOLERANCE]
        better = [f for f, g in gaps.items() if g < -ROPE_TOLERANCE]
        largest = max(gaps, key=lambda f: abs(gaps[f]))
        if not worse and not better:
            verdict = f"equal within {ROPE_TOLERANCE} at every rank — this model cannot tell them apart"
        elif len(worse) == len(gaps):
            verdict = "post-RoPE worse at every rank"
            worse_everywhere.append(label)
        else:
            clauses = [f"{word} at r = {', '.join(fs)}·D" for word, fs in (("worse", worse), ("better", better)) if fs]
            verdict = "post-RoPE " + ", ".join(clauses) + ", equal elsewhere"
        parts.append(f"{label}: {verdict} (largest post − pre {gaps[largest]:+.4f} at r = {largest}·D)")
    text = "; ".join(parts) + "."
    if any(label.startswith("θ=1e4") for label in worse_everywhere):
        text += (" With the usual θ = 1e4, RoPE rotates the keys' subspace into more directions, so projecting "
                 "post-RoPE keys (what `lowrank` does) costs more error at a given rank than projecting pre-RoPE keys "
                 "and re-applying RoPE at attention time would; the testbed's huge θ hides this.")
    return text


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def render(rows: list[dict[str, Any]]) -> str:
    rows = latest(rows)
    needle = sorted((r for r in rows if r.get("task") == "needle"), key=_sort_key)
    rope = [r for r in rows if r.get("task") == "rope_check"]
    full = next(r for r in needle if r["method"] == "full")
    lengths = full["config"]["eval"]["lengths"]
    depths = full["config"]["eval"]["depths"]
    per_cell = full["config"]["eval"]["samples"]
    mem = full["memory"]
    n_layers, n_kv = len(mem["kept_tokens"]), len(mem["kept_tokens"][0])
    head_dim = mem["dense_bytes"] // (mem["context_tokens"] * n_layers * n_kv * 2 * mem["dtype_bytes"])
    lines = [
        "# Hidden axis on the constructed testbed: needle accuracy, bytes, reconstruction error",
        "",
        f"Testbed (constructed {n_layers}-layer Llama, head_dim {head_dim}, fp32 cache); needle "
        f"`{full['accuracy']['template']}` with {distractors(full)}; contexts {', '.join(map(str, lengths))} tokens × "
        f"{len(depths)} depths × {per_cell} samples = {full['accuracy']['samples']} prompts per method; greedy "
        "generation with the compressed cache; exact match.",
        f"Kept = cache bytes held / dense fp32 cache bytes (last prompt, {_tokens(lengths[-1])} context, decode tokens "
        "included). Recon = relative Frobenius error ‖X − X̂‖/‖X‖ of the encoded keys / values, mean over layers "
        "(last prompt).",
        "",
    ]
    body = []
    for r in needle:
        last = len(r["samples"]) - 1
        errors = sample_state(r, last).get(r["method"], {}).get("recon_error", {})
        rk = f"{sum(e['k'] for e in errors.values()) / len(errors):.4f}" if errors else "–"
        rv = f"{sum(e['v'] for e in errors.values()) / len(errors):.4f}" if errors else "–"
        acc = r["accuracy"]["exact_match"]
        body.append([_label(r), f"{acc:.3f}", f"{100 * (acc - full['accuracy']['exact_match']):+.1f}",
                     f"{r['samples'][last]['kept_fraction']:.3f}", rk, rv])
    text = "\n".join(lines) + "\n" + markdown(
        ["method", "needle acc.", "Δ vs full (points)", "kept bytes", "recon K", "recon V"], body)
    quant = next((r for r in needle if r["method"] == "quant"), None)
    think = next((r for r in needle if r["method"] == "think"), None)
    notes = []
    if quant:
        notes.append(f"quant: KIVI layout, G={param(quant, 'quant', 'group')}, R={param(quant, 'quant', 'residual')}, "
                     "fp16 scales/minima.")
    if rope:
        cal = rope[-1]["accuracy"]["calibration"]
        notes.append(f"lowrank: uncentered PCA bases per (layer, KV head), calibrated on {cal['tokens']} tokens of the "
                     f"built-in corpus (source `{cal['source']}`); the bases are model-side "
                     f"({cal['basis_bytes'] / 2**20:.2f} MiB, not counted as cache bytes).")
    if think:
        notes.append(f"think: key channels pruned in RoPE pairs (values untouched), window {param(think, 'think', 'window')}.")
    text += "\n" + " ".join(notes) + "\n"
    if rope:
        acc = rope[-1]["accuracy"]
        fracs = acc["rank_fractions"]
        rank = acc["tiny_key_rank"]
        text += "\n" + (
            "RoPE check (lowrank projects post-RoPE keys): relative error of projecting held-out keys on the top-r "
            "PCA basis of calibration keys, all layers and KV heads. Testbed: calibration text → the last "
            f"{_tokens(acc['eval_tokens_context'])} needle prompt. Tiny random-init Llamas (2 layers, head_dim 128; "
            f"`rank-{rank} keys` = k_proj restricted to a random {rank}-dim subspace of the hidden state, like the "
            "low-rank pre-RoPE keys of trained models; θ=1e30 is the control with RoPE mostly off): "
            f"{acc['tiny_calibration_tokens']} → {acc['tiny_eval_tokens']} random tokens.") + "\n\n"
        checks = {c["model"]: c for c in acc["checks"]}  # in the order they were measured
        body = [[label, name, *(f"{res[name][f'{f:g}']:.4f}" for f in fracs)]
                for label, res in checks.items() for name in ("pre-RoPE", "post-RoPE")]
        text += markdown(["model", "keys", *(f"r = {f:g}·D" for f in fracs)], body)
        text += "\nFinding (from the numbers above): " + rope_finding(checks) + "\n"
    return text + "\n" + footer("hidden", rows, SWEEP) + "\n"


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    path = out / "hidden.md"
    path.write_text(render(rows), encoding="utf-8")
    return [path]
