"""``paper_tables/perf.md`` from the results dict (the JSON next to it holds every number)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import KVCompressError, unknown_choice
from .common import MiB, fmt


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**NOT met**")


def _methods(t: dict[str, Any]) -> list[str]:
    m = t.get("method")
    return [] if m is None else [m] if isinstance(m, str) else list(m)


def _name(t: dict[str, Any], method: str) -> str:
    return t.get("name") or f"`{method}`"


def _ctx(ctx: Any) -> str:
    return f"{int(ctx) // 1024}K"


# -- one function per `what` of a target (configs/bench/*.yaml: targets); each yields (target, figure, met) ---------
def _decode_vs_dynamic(t: dict[str, Any], dec: dict[str, Any], ref: str):
    out = dec["contexts"].get(str(t["context"]))
    for m in _methods(t):
        s = (out or {}).get(f"{m}_vs_dynamic")
        if s:
            yield (f"{_name(t, m)} decode step ≤ {t['limit']}× `DynamicCache` at {_ctx(t['context'])}", f"{fmt(s, 3)}×",
                   s["median"] <= t["limit"])


def _attention_vs_dense(t: dict[str, Any], dec: dict[str, Any], ref: str):
    out = dec["contexts"].get(str(t["context"]))
    if out and out.get("attention"):
        tolerance = t.get("tolerance", 0.03)
        cands = {v: a for v, a in out["attention"].items()
                 if a.get("vs_dense") and abs(a["kept_fraction"] - t["kept"]) < tolerance}
        for v, a in cands.items():
            yield (f"attention at kept {t['kept']}, {_ctx(t['context'])} ≤ {t['limit']}× dense attention",
                   f"{v}: {fmt(a['vs_dense'], 3)}× ({a['attend_us']['median']:.0f} vs "
                   f"{out['attention'][ref]['attend_us']['median']:.0f} µs)", a["vs_dense"]["median"] <= t["limit"])


def _decode_vs_reference(t: dict[str, Any], dec: dict[str, Any], ref: str):
    for ctx, out in dec["contexts"].items():
        if t.get("context") is not None and str(t["context"]) != ctx:
            continue
        for m in _methods(t):
            q = out["rows"].get(m)
            if q and q.get(f"vs_{ref}"):
                yield (f"{_name(t, m)} decode step ≤ {t['limit']}× `{ref}` ({_ctx(ctx)})", f"{fmt(q[f'vs_{ref}'], 3)}×",
                       q[f"vs_{ref}"]["median"] <= t["limit"])


def _prefill_hook(t: dict[str, Any], pre: dict[str, Any], ref: str):
    out = pre["contexts"].get(str(t["context"]))
    for m in _methods(t) if out else []:
        row = out["methods"].get(m)
        if row:
            h, p = row["hook_overhead"], row["overhead"]
            yield (f"prefill overhead ≤ {t['limit']:.0%} at {_ctx(t['context'])}: {_name(t, m)}",
                   f"hook {100 * h['median']:.1f}% ({100 * h['min']:.1f}–{100 * h['max']:.1f}); paired time "
                   f"{100 * p['median']:+.1f}% ({100 * p['min']:+.1f}–{100 * p['max']:+.1f})",
                   h["median"] <= t["limit"])


def _ragged_kernels(t: dict[str, Any], ops: dict[str, Any], ref: str):
    by = ops["ragged_distinct"]
    yield (f"ragged attention: the same kernels for {', '.join(map(str, by))} distinct per-pair counts",
           ", ".join(f"{k}: {n}" for k, n in by.items()) + " kernels", len(set(by.values())) == 1)


def _resident_vs_dense(t: dict[str, Any], mem: dict[str, Any], ref: str):
    for m in _methods(t):
        q = mem["rows"].get(m)
        if q:
            yield (f"{_name(t, m)} resident ≤ {t['limit']}× dense (incl. metadata)",
                   f"{q['resident_bytes'] / q['dense_bytes']:.3f}× ({q['resident_bytes'] / MiB:.2f} / "
                   f"{q['dense_bytes'] / MiB:.2f} MiB)", q["resident_bytes"] <= t["limit"] * q["dense_bytes"])


def _resident_vs_kept(t: dict[str, Any], mem: dict[str, Any], ref: str):
    worst, worst_m = 0.0, None
    for m, row in mem["rows"].items():
        for key in ("resident_bytes", "storage_bytes"):
            dev = abs(row[key] / row["kept_bytes"] - 1) if row["kept_bytes"] else 0.0
            if dev > worst:
                worst, worst_m = dev, f"{m} ({key.split('_')[0]})"
    yield (f"resident bytes = `kept_bytes` within {t['limit']:.0%}, every method",
           f"worst {100 * worst:.2f}%" + (f": {worst_m}" if worst_m else "") + f" over {len(mem['rows'])} methods",
           worst <= t["limit"])


#: ``what`` -> (the part of the results it reads, the function, the fields a target of it needs)
MEASURES = {
    "decode_vs_dynamic": ("decode", _decode_vs_dynamic, ("method", "context", "limit")),
    "attention_vs_dense": ("decode", _attention_vs_dense, ("kept", "context", "limit")),
    "decode_vs_reference": ("decode", _decode_vs_reference, ("method", "limit")),
    "prefill_hook": ("prefill", _prefill_hook, ("method", "context", "limit")),
    "ragged_kernels": ("ops", _ragged_kernels, ()),
    "resident_vs_dense": ("memory", _resident_vs_dense, ("method", "limit")),
    "resident_vs_kept": ("memory", _resident_vs_kept, ("limit",)),
}
#: the fields a target may have; parts are reported in the order of PARTS
FIELDS = ("what", "method", "name", "model", "context", "limit", "kept", "tolerance")
PARTS = ("decode", "prefill", "ops", "memory")


def check_targets(specs: Any) -> None:
    """A one-line error for a target the report could not judge (before anything is measured)."""
    for i, t in enumerate(specs or []):
        if not isinstance(t, dict) or t.get("what") not in MEASURES:
            what = t.get("what") if isinstance(t, dict) else t
            raise unknown_choice(f"targets[{i}] `what`", what, MEASURES)
        for key in t:
            if key not in FIELDS:
                raise unknown_choice(f"field of targets[{i}]", key, FIELDS)
        missing = [key for key in MEASURES[t["what"]][2] if t.get(key) is None]
        if missing:
            raise KVCompressError(f"targets[{i}] ({t['what']}) has no {', '.join(missing)}; valid: "
                                  f"{{what: {t['what']}, {', '.join(f'{k}: ...' for k in MEASURES[t['what']][2])}}}")


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target of the config (``r["config"]["targets"]``) and model measured: part by part, model by
    model, targets in their config order."""
    cfg = r.get("config") or {}
    specs = list(cfg.get("targets") or [])
    ref = (cfg.get("decode") or {}).get("reference")
    rows: list[dict[str, Any]] = []
    for part in PARTS:
        for model, block in (r.get(part) or {}).items():
            for t in specs:
                where, measure, _ = MEASURES[t["what"]]
                if where == part and t.get("model") in (None, model):
                    rows += [{"target": target, "model": model, "figure": figure, "met": ok}
                             for target, figure, ok in measure(t, block, ref)]
    return rows


def write(r: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = r["machine"]
    L: list[str] = ["# Performance against the machine's limits (issue 10)", ""]
    L += [f"Generated by `{r.get('command', 'python -m kvcompress.bench')}` (config `{r.get('config_file')}`), "
          f"{r.get('started')}, {r.get('wall_seconds', 0):.0f} s.", "",
          f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB; "
          f"{m['platform']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
          f"**{m['torch_threads']} torch thread(s)** (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}). "
          f"Load average (1/5/15 min) at start {m['load_at_start']}, at end {r.get('load_at_end', '–')} — a shared "
          "machine: other jobs ran throughout, so variants are interleaved within each repeat and every comparison "
          "is a ratio taken in the same run.", "",
          "Every figure: median (min–max) over repeats. Models:", ""]
    for name, desc in (r.get("models") or {}).items():
        L.append(f"- {desc}")
    L += ["", f"Methods registered at run time: {', '.join(r.get('methods_registered', []))}.", ""]

    rows = targets(r)
    if rows:
        L += ["## Targets", "", "| target | model | figure | verdict |", "|---|---|---|---|"]
        L += [f"| {t['target']} | {t['model']} | {t['figure']} | {_verdict(t['met'])} |" for t in rows]
        L += ["", "Prefill verdicts use the time inside the compression hook over the rest of the prefill (robust to "
              "load); the paired end-to-end ratio (method vs the plain-model runs adjacent to it) is shown next to "
              "it and is within noise of it on this machine.", ""]

    if "bandwidth" in r:
        b = r["bandwidth"]
        L += ["## Memory bandwidth", "",
              f"{b['buffer_bytes'] / MiB:.0f} MiB fp32 buffer, {b['threads']} thread(s), {b.get('measured', 'at start')}: "
              f"streaming copy (`Tensor.copy_`, read + write bytes) **{fmt(b['bandwidth_GBps'])} GB/s**; "
              f"streaming read (`Tensor.sum`) **{fmt(b.get('read_GBps'))} GB/s** (load {fmt(b['load_1min'])}).", ""]

    for model, pre in (r.get("prefill") or {}).items():
        ctxs = list(pre["contexts"])
        L += [f"## Prefill overhead — {model}", "",
              f"Selection methods at ratio {pre['ratio']} (fraction kept), hidden-axis methods at their defaults; "
              "`logits_to_keep=1`. Plain-model prefill: "
              + "; ".join(f"{int(c) // 1024}K {fmt(pre['contexts'][c]['plain_seconds'])} s" for c in ctxs)
              + ". Cells: paired end-to-end overhead % / hook overhead % (median, min–max).", ""]
        L += ["| method | axis | " + " | ".join(f"{int(c) // 1024}K paired | {int(c) // 1024}K hook" for c in ctxs) + " |",
              "|---|---|" + "---|---|" * len(ctxs)]
        methods = list(dict.fromkeys(mm for c in ctxs for mm in pre["contexts"][c]["methods"]))
        for mm in methods:
            cells = []
            for c in ctxs:
                row = pre["contexts"][c]["methods"].get(mm)
                if row is None:
                    cells += ["", ""]
                    continue
                t, h = row["overhead"], row["hook_overhead"]
                cells.append(f"{100 * t['median']:+.1f} ({100 * t['min']:+.1f}…{100 * t['max']:+.1f})")
                cells.append(f"{100 * h['median']:.1f} ({100 * h['min']:.1f}–{100 * h['max']:.1f})")
            L.append(f"| {mm} | {(pre['contexts'][ctxs[0]]['methods'].get(mm) or {}).get('axis') or '–'} | "
                     + " | ".join(cells) + " |")
        L.append("")
        L.append("Load (1-min) during the runs: " + "; ".join(
            f"{int(c) // 1024}K {min(v['load_1min']['min'] for v in pre['contexts'][c]['methods'].values()):.1f}–"
            f"{max(v['load_1min']['max'] for v in pre['contexts'][c]['methods'].values()):.1f}" for c in ctxs) + ".")
        if pre.get("notes"):
            L.append("Set-up: " + "; ".join(f"{k}: {v}" for k, v in pre["notes"].items()) + ".")
        L.append("")

    ref = ((r.get("config") or {}).get("decode") or {}).get("reference")  # the variant decode compares with
    bw = (r.get("bandwidth") or {}).get("bandwidth_GBps", {}).get("median")
    bw_read = (r.get("bandwidth") or {}).get("read_GBps", {}).get("median")
    for model, dec in (r.get("decode") or {}).items():
        L += [f"## Decode — {model}", "",
              f"Per-step time ({dec['contexts'][next(iter(dec['contexts']))]['steps']} steps per repeat, "
              f"{dec['contexts'][next(iter(dec['contexts']))]['repeats']} repeats, interleaved). Bytes read = cache "
              f"`kept_bytes` + parameters ({dec['param_bytes'] / MiB:.1f} MiB). Effective GB/s = bytes read / step "
              "time.", ""]
        for c, out in dec["contexts"].items():
            L += [f"**{int(c) // 1024}K context** (load at end {out['load_end']})", "",
                  f"| variant | kept fraction | bytes read (MiB) | step (ms) | vs `{ref}` | effective GB/s | load |",
                  "|---|---|---|---|---|---|---|"]
            for v, row in out["rows"].items():
                vs = fmt(row[f"vs_{ref}"], 3) if row.get(f"vs_{ref}") else "–"
                L.append(f"| {v}{' (ragged)' if row['ragged'] else ''} | {row['kept_fraction']:.3f} | "
                         f"{row['bytes_read'] / MiB:.1f} | {fmt(row['step_ms'])} | {vs} | {row['effective_GBps']:.2f} | "
                         f"{row['load_1min']['median']:.1f} |")
            if out.get(f"{ref}_vs_dynamic"):
                L.append(f"\n`{ref}` / `DynamicCache` per-step ratio: **{fmt(out[f'{ref}_vs_dynamic'], 3)}**")
            if out.get("attention"):
                L += ["", "One layer's attention call (`KVCompressLayer.attend`, layer 0, random query):", "",
                      "| variant | kept fraction | attend (µs) | vs dense |", "|---|---|---|---|"]
                for v, a in out["attention"].items():
                    L.append(f"| {v} | {a['kept_fraction']:.3f} | {fmt(a['attend_us'], 0)} | "
                             f"{fmt(a['vs_dense'], 3) if a['vs_dense'] else '1'} |")
            L.append("")
        f = dec.get("fit") or {}
        if "b_s_per_GB" in f:
            frac = f["effective_GBps"] / bw if bw and math.isfinite(f["effective_GBps"]) else float("nan")
            L += [f"Fit over {f['points']} dense-path points (`{ref}` + uniform token methods, all contexts): "
                  f"t = {f['a_ms']:.2f} ms + {f['b_s_per_GB'] * 1e3:.2f} ms/GB · bytes (R² {f['r2']:.3f}); "
                  f"marginal bandwidth 1/b = **{f['effective_GBps']:.2f} GB/s** = **{frac:.2f}×** the measured copy "
                  f"bandwidth ({bw:.2f} GB/s)"
                  + (f", **{f['effective_GBps'] / bw_read:.2f}×** the streaming-read bandwidth ({bw_read:.2f} GB/s)"
                     if bw_read else "") + "." if bw else "", ""]
        if dec.get("notes"):
            L += ["Set-up: " + "; ".join(f"{k}: {v}" for k, v in dec["notes"].items()) + ".", ""]

    for model, ops in (r.get("ops") or {}).items():
        dynamic = ops["variants"].get("dynamic", {}).get("kernels_per_layer")
        L += [f"## Kernels per decode step — {model}", "",
              f"One decode step of a left-padded batch of {len(ops['rows'])} rows ({', '.join(map(str, ops['rows']))} "
              "tokens) on the virtual accelerator (`kvcompress.device_probe`: the code paths of a CUDA run), counted "
              "at the dispatcher: aten ops that run a kernel (views and bare allocations left out), per layer. The "
              "stock `DynamicCache` is the reference; the model's own ops (projections, MLP, norms, mask) are in "
              "every row.", "",
              "| variant | kernels / layer / step | vs `DynamicCache` | ragged layers | encoded layers |",
              "|---|---|---|---|---|"]
        for v, row in ops["variants"].items():
            extra = f"{row['kernels_per_layer'] - dynamic:+.1f}" if dynamic is not None else "–"
            L.append(f"| {v} | {row['kernels_per_layer']:.1f} | {extra} | {row['ragged_layers']} | "
                     f"{row['encoded_layers']} |")
        L += ["", "One ragged layer's attention (16 pairs, `Ragged.attend`) by the number of distinct per-pair counts: "
              + ", ".join(f"{k} distinct: **{n}** kernels" for k, n in ops["ragged_distinct"].items()) + ".", ""]
    for model, mem in (r.get("memory") or {}).items():
        L += [f"## Memory — {model}", "",
              f"{mem['context']}-token prefill + {mem['steps']} decode steps, selection ratio {mem['ratio']}; "
              f"{mem['method']}. Peak growth = peak RSS during prefill+decode − RSS before (activations and attention "
              f"scratch included). Parameters {mem['param_bytes'] / MiB:.1f} MiB.", "",
              "| method | kept fraction | kept (MiB) | resident (MiB) | resident/kept − 1 | storages (MiB) | "
              "RSS retained (MiB) | peak growth (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for mm, row in mem["rows"].items():
            dev = row["resident_bytes"] / row["kept_bytes"] - 1 if row["kept_bytes"] else float("nan")
            L.append(f"| {mm} | {row['kept_fraction']:.3f} | {row['kept_bytes'] / MiB:.2f} | "
                     f"{row['resident_bytes'] / MiB:.2f} | {100 * dev:+.2f}% | {row['storage_bytes'] / MiB:.2f} | "
                     f"{row['rss_retained'] / MiB:.1f} | {row['peak_growth'] / MiB:.1f} |")
        L.append("")

    for model, tp in (r.get("throughput") or {}).items():
        L += [f"## Evaluation throughput — {model}", "",
              f"Needle (`eval.needle.run`, `model.generate`), lengths {tp['lengths']}, {tp['samples_per_run']} samples "
              "per run.", "", "| method | samples / min | exact match | load |", "|---|---|---|---|"]
        for v, row in tp["methods"].items():
            L.append(f"| {v} | {fmt(row['samples_per_min'], 1)} | {row['exact_match']:.2f} | "
                     f"{row['load_1min']['median']:.1f} |")
        L.append("")

    note = (r.get("config") or {}).get("closing_note")
    if note:
        L += ["## Closing note", "", note.strip(), ""]
    path.write_text("\n".join(L) + "\n")
