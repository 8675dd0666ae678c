"""Rendering of the GPU acceptance run (:mod:`kvcompress.bench.gpu`): the Markdown report ``gpu.md`` built from
the raw results dictionary (also written as ``gpu.json``) — the header table (GPU, versions, commit, command, model)
and one section per part (a. equivalence, b. every method, c. decode step, d. prefill overhead), with the byte and
median (min–max) formatting they share. Every figure in it comes from the results; nothing is estimated.
"""

from __future__ import annotations

from typing import Any

MiB = 2**20


def _mib(x: Any) -> str:
    """Bytes in MiB: whole MiB from 100 up, one decimal from 1, three significant digits below (smoke sizes)."""
    if x is None:
        return "–"
    v = x / MiB
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def _stat(d: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    if not d:
        return "–"
    return f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}–{d['max'] * scale:.{digits}f})"


def _fail(error: str) -> str:
    return "FAILED: `" + error.replace("|", "/").replace("`", "'") + "`"


def render(results: dict[str, Any]) -> str:
    """The Markdown report (every figure in it comes from ``results``; nothing is estimated)."""
    h, s = results["header"], results["settings"]
    lines = ["# GPU acceptance run (`python -m kvcompress.bench gpu`)", ""]
    if h["smoke"]:
        lines += ["> **CPU SMOKE RUN — tiny model on the CPU; these are NOT GPU figures.** Same code path as the GPU "
                  "run at tiny sizes: times are CPU times, the CUDA allocator columns are empty.", ""]
    if not results.get("complete"):
        done = ", ".join(results.get("parts_done", [])) or "none"
        why = f" ({results['aborted']})" if "aborted" in results else ""
        lines += [f"**INCOMPLETE**: the run stopped after parts {done}{why}.", ""]
    lines += header_lines(h, results)
    if "equivalence" in results:
        lines += equivalence_lines(results["equivalence"], s)
    if "methods" in results:
        lines += methods_lines(results["methods"], results, s)
    if "decode" in results:
        lines += decode_lines(results["decode"], s)
    if "prefill" in results:
        lines += prefill_lines(results["prefill"])
    return "\n".join(lines) + "\n"


def header_lines(h: dict[str, Any], results: dict[str, Any]) -> list[str]:
    gpu = (f"{h['gpu']} ({_mib(h['gpu_memory_bytes'])} MiB, compute capability {h['capability']}, CUDA {h['cuda']})"
           if h.get("gpu") else f"none — CPU, {h.get('cpu_threads')} thread(s)")
    wall = results.get("wall_seconds")
    rows = [("GPU", gpu), ("torch / transformers", f"{h['torch']} / {h['transformers']}"),
            ("git commit", h.get("git_commit") or "unknown"), ("date", h["date"]), ("command", f"`{h['command']}`"),
            ("wall time", f"{wall:.0f} s" if wall is not None else "–"), ("dtype, seed", f"{h['dtype']}, {h['seed']}")]
    if "model" in results:
        m = results["model"]
        rows.append(("model (b–d)", f"random-init Llama, Llama-3.1-8B's shape with {m['num_hidden_layers']} layers: "
                     f"hidden {m['hidden']}, {m['query_heads']} query / {m['kv_heads']} KV heads of dim "
                     f"{m['head_dim']}, intermediate {m['intermediate']}, vocab {m['vocab']}, rope "
                     f"{m['rope'].get('rope_type')} θ {m['rope'].get('rope_theta'):g}; {_mib(m['param_bytes'])} MiB "
                     "of weights, KV "
                     f"{m['kv_bytes_per_token'] / 1024:g} KiB/token; sdpa attention"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def equivalence_lines(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    out = [f"## a. Equivalence: `compress(model, \"{s['reference']}\")` vs `DynamicCache`", "",
           "Greedy `generate` (`do_sample=False`, `output_logits=True`) on a left-padded batch; tiny random-init "
           "models (2 layers, hidden 128, 4 query / 2 KV heads; lm_head ×8 so greedy decoding is far from ties, q/k "
           "projections ×4 so attention is sharp enough that a wrong position or a lost entry shows in the logits). "
           "Tolerance: max |Δlogit| ≤ 2⁻⁵ × max |logit| (4 bf16 ulps at the largest logit).", "",
           "| architecture | batch (prompt lengths) | new tokens | tokens identical | max abs logit diff | tolerance "
           "| result |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['architecture']} | {r['batch']} | {r['new_tokens']} | – | – | – | {_fail(r['error'])} |")
            continue
        out.append(f"| {r['architecture']} | {r['batch']} ({', '.join(map(str, r['prompt_lengths']))}) | "
                   f"{r['new_tokens']} | {'yes' if r['tokens_identical'] else 'NO'} | {r['max_abs_logit_diff']:.4g} | "
                   f"{r['tolerance']:.4g} | {'PASS' if r['passed'] else 'FAIL'} |")
    return out + [""]


def methods_lines(rows: list[dict[str, Any]], results: dict[str, Any], s: dict[str, Any]) -> list[str]:
    out = [f"## b. Every method: {s['context']}-token prefill + {s['steps']} greedy decode steps", "",
           f"Methods with a `ratio` get ratio={s['ratio']:g} (hidden-axis ones included); the others keep their "
           "defaults (parameters column). "
           "kept/resident/dense: `cache.memory_report()` after decoding. allocated growth: "
           "`torch.cuda.memory_allocated()` after prefill + decode (prefill outputs deleted) minus before the cache "
           "was created; peak: `max_memory_allocated()` over the same baseline (peak stats reset per method); "
           "unaccounted = growth − resident − workspace. Decode: mean over the steps, synchronised per step. "
           "`dynamic` is the stock `DynamicCache` (reference row).", "",
           "| method | kept MiB | resident MiB | dense MiB | kept fraction | allocated growth MiB "
           "| peak over baseline MiB | unaccounted MiB | prefill s | decode ms/step | parameters |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "FAILED":
            cells = [r["method"], _fail(f"{r.get('failed_in', '')}: {r['error']}"), *[""] * 9]
            out.append("| " + " | ".join(cells) + " |")
            continue
        out.append(f"| {r['method']} | {_mib(r['kept_bytes'])} | {_mib(r['resident_bytes'])} | "
                   f"{_mib(r['dense_bytes'])} | {r['kept_fraction']:.3f} | {_mib(r.get('allocated_growth_bytes'))} | "
                   f"{_mib(r.get('peak_over_baseline_bytes'))} | {_mib(r.get('unaccounted_bytes'))} | "
                   f"{r['prefill_s']:.3f} | {r['decode_ms_mean']:.2f} | `{r['params']}` |")
    failed = [r["method"] for r in rows if r["status"] == "FAILED"]
    out += ["", f"FAILED: {', '.join(failed)}." if failed else "No method failed."]
    notes = [f"* {r['method']}: {w}" for r in rows for w in r.get("warnings", [])]
    if notes:
        out += ["", "Warnings raised:", "", *notes]
    return out + [""]


def decode_lines(by_context: dict[str, Any], s: dict[str, Any]) -> list[str]:
    out = ["## c. Decode step vs DynamicCache", "",
           f"Each variant prefilled once per context, then {s['repeats']} interleaved repeats of {s['warmup']} warm-up "
           f"+ {s['timing_steps']} timed greedy steps; figure = median (min–max) over repeats of the per-step median; "
           "ratio to DynamicCache taken within each repeat.", "",
           "| context | variant | ms/step | vs DynamicCache | kept MiB | parameters |", "|---|---|---|---|---|---|"]
    for context, block in by_context.items():
        for v, r in block["rows"].items():
            if r["status"] == "FAILED":
                out.append(f"| {context} | {v} | {_fail(r['error'])} | | | |")
            else:
                out.append(f"| {context} | {v} | {_stat(r['step_ms'])} | {_stat(r['vs_dynamic'])} | "
                           f"{_mib(r['kept_bytes'])} | `{r['params']}` |")
        if block["cut_by_time_budget"]:
            out.append(f"| {context} | (repeats cut to {block['repeats_done']} by --time-budget) | | | | |")
    return out + [""]


def prefill_lines(block: dict[str, Any]) -> list[str]:
    out = [f"## d. Prefill overhead at {block['context']} tokens", "",
           f"Prefill time with the method / with DynamicCache, within each repeat ({block['repeats_done']} repeat(s)"
           + (", cut by --time-budget" if block["cut_by_time_budget"] else "") + "); median (min–max).", "",
           "| method | prefill s | vs DynamicCache |", "|---|---|---|"]
    for v, r in block["rows"].items():
        if r["status"] == "FAILED":
            out.append(f"| {v} | {_fail(r['error'])} | |")
        else:
            out.append(f"| {v} | {_stat(r['prefill_s'], 3)} | {_stat(r['vs_dynamic'])} |")
    return out + [""]

