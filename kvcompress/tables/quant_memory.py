"""``paper_tables/quant_memory.md``: peak memory while decoding with ``quant`` vs the ``full`` cache, and the three
bounds checked, from the row ``scripts/quant_memory.py`` writes (``paper_tables/rows/quant_memory.jsonl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import latest
from .render import markdown

MB = 1 / 2**20
COLUMNS = ("resident cache", "dense cache", "one layer dense K/V", "workspace", "RSS before decode", "peak RSS",
           "transient")


def bounds(q: dict, f: dict, model_bytes: int) -> tuple[int, list[tuple[str, int, int]]]:
    """The process baseline and (name, measured, limit) of the three checked bounds (``scripts/quant_memory.py``)
    from the ``quant`` and ``full`` measurements."""
    baseline = f["rss_before_decode"] - f["resident_cache"] - model_bytes
    one = q["one_layer_dense_kv"]
    return baseline, [
        ("peak RSS (quant) − baseline ≤ model + resident cache + one layer's dense K/V", q["peak_rss"] - baseline,
         model_bytes + q["resident_cache"] + one),
        ("decode transient ≤ one layer's dense K/V + full cache's decode transient", q["transient"],
         one + f["transient"]),
        ("workspace_bytes ≤ one layer's dense fp32 K/V", q["workspace"], one),
    ]


def render(row: dict[str, Any]) -> str:
    acc, cfg, prov = row["accuracy"], row["config"], row["provenance"]
    rows, model, library = acc["caches"], acc["model"], acc["library_rss"]
    q, f = rows[0], rows[1]
    model_bytes = model["parameter_bytes"]
    baseline, checks = bounds(q, f, model_bytes)
    bits, slab = cfg["bits"], acc["slab_bytes"]
    block = q["one_layer_dense_kv"] * q["encoded_tokens"] / q["context"] / 2
    packed_keys = block * bits / 32
    predicted = block + min(packed_keys, slab)
    over = q["peak_rss"] - baseline - model_bytes - q["resident_cache"]
    layers = model["layers"]
    lines = [
        "# Peak memory while decoding with `quant` (KIVI layout) on the constructed testbed",
        "",
        (f"Context {q['context']} tokens (random token ids), {cfg['steps']} decode steps after a warm-up step, "
         f"`quant bits={bits}` (G={cfg['group']}, R={cfg['residual']}) vs the `full` cache; testbed model ({layers} "
         f"layers, {model['kv_heads']} KV heads, head_dim {model['head_dim']}, {model['dtype']}, "
         f"{model_bytes * MB:.2f} MiB of parameters). Memory = the process's resident set "
         "(VmRSS; peak = VmHWM after resetting it before decoding), with `MALLOC_MMAP_THRESHOLD_=65536` so freed "
         "tensors leave the RSS. **RSS includes the Python/torch baseline**: interpreter, torch and libraries "
         f"{library * MB:.1f} MiB (RSS after a 16-token forward, minus the parameters); the baseline used below adds "
         f"what the allocator keeps after the {q['context']}-token prefill: {baseline * MB:.1f} MiB = RSS before "
         "decoding with the `full` cache − its resident cache − the parameters."),
        "",
    ]
    body = []
    for r in rows:
        name = f"quant {bits}-bit" if r["method"] == "quant" else r["method"]
        body.append([name, f"{r['resident_cache'] * MB:.2f}", f"{r['dense_cache'] * MB:.2f}",
                     f"{r['one_layer_dense_kv'] * MB:.2f}", f"{r['workspace'] * MB:.2f}",
                     f"{r['rss_before_decode'] * MB:.1f}", f"{r['peak_rss'] * MB:.1f}", f"{r['transient'] * MB:.2f}"])
    lines.append(markdown(["cache", *(f"{c} (MiB)" for c in COLUMNS)], body).rstrip("\n"))
    lines += ["", "Bounds checked for `quant` (measured vs limit):", ""]
    lines.append(markdown(["bound", "measured (MiB)", "limit (MiB)", "held"],
                          [[name, f"{m * MB:.2f}", f"{lim * MB:.2f}", "yes" if m <= lim else "NO"]
                           for name, m, lim in checks]).rstrip("\n"))
    lines += [
        "",
        (f"Above baseline + model + resident cache, decoding with `quant` peaks {over * MB:.2f} MiB higher, mostly the "
         f"attention workspace ({q['workspace'] * MB:.2f} MiB, allocated once and reused) plus the per-step transient "
         f"({q['transient'] * MB:.2f} MiB; the `full` cache's decode needs {f['transient'] * MB:.2f} MiB), "
         f"against {q['one_layer_dense_kv'] * MB:.2f} MiB allowed for one layer's dense K/V. The attention dequantizes "
         "an encoded block's keys, takes the scores, then its values into the same fp32 buffer, so the workspace "
         "holds half of one layer's encoded K/V plus a byte slab for unpacking (the packed keys, at most "
         f"{slab / 1024:.0f} KiB): {q['one_layer_dense_kv'] * MB:.2f} × {q['encoded_tokens']}/{q['context']} / 2 + "
         f"{min(packed_keys, slab) * MB:.2f} = {predicted * MB:.2f} MiB (measured {q['workspace'] * MB:.2f})."),
        "",
        (f"For scale: a whole-cache dequantized copy would be {layers * q['one_layer_dense_kv'] * MB:.2f} MiB "
         f"({layers} layers × one layer's dense K/V). The attention reconstructs encoded blocks one at a time into "
         "the per-cache reusable workspace (`workspace_bytes` in `cache.memory_report()`, not counted as cache data)."),
        "",
        (f"Generated by `{cfg['command']}` in {row['timing']['total_s']:.1f} s on {prov['cpu']} "
         f"({prov['logical_cpus']} cores visible, {prov['threads']} torch thread(s)); torch {prov['torch']} (row in "
         "`paper_tables/rows/quant_memory.jsonl`, table by `python -m kvcompress.tables quant_memory`)."),
    ]
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    path = out / "quant_memory.md"
    path.write_text(render([r for r in latest(rows) if r.get("task") == "quant_memory"][-1]), encoding="utf-8")
    return [path]
