"""``python -m kvcompress.tables`` — regenerate the paper tables and figures from results files.

    python -m kvcompress.tables [results/results.jsonl ...] [--out paper_tables] [--name methods]

Writes, deterministically (same rows → byte-identical files):

* ``<name>.md`` / ``<name>.tex`` (booktabs): one line per (model, method, parameters, task) — kept fraction, kept
  bytes, the modelled deployment metrics relative to the uncompressed cache (concurrency, decode time, context
  switch; Fu 2024's model on the row's deployment target), and the accuracy of each task;
* ``<name>_axes.md``: the best accuracy per axis at each kept-fraction bucket;
* ``<name>_pareto.png``: accuracy vs kept fraction, one series per method;
* ``<name>_needle.png``: the needle length × depth heatmaps of the rows that carry a grid, one panel each.

When a configuration appears in several rows, the last row wins.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .results import read_rows

#: The headline metric of each task's accuracy block, in order of preference.
HEADLINE = ("score", "average", "exact_match", "top1_agreement")
#: Tasks that report on a 0–100 scale (as their papers do); tables show every headline on 0–1.
PERCENT_TASKS = ("ruler", "longbench")


def headline(accuracy: dict[str, Any]) -> float | None:
    for key in HEADLINE:
        value = accuracy.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) / (100.0 if accuracy.get("task") in PERCENT_TASKS else 1.0)
    return None


def row_key(row: dict[str, Any]) -> str:
    """What identifies a configuration: the run's ``config_key`` (hash of the resolved config), else its model,
    method, parameters and task."""
    if row.get("config_key"):
        return str(row["config_key"])
    cfg = row.get("config", {})
    return json.dumps(
        {
            "model": row.get("model", {}).get("name"),
            "method": cfg.get("method", row.get("method")),
            "ratio": row.get("ratio"),
            "budget": row.get("budget"),
            "task": row.get("task"),
            "eval": cfg.get("eval"),
        },
        sort_keys=True,
    )


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[row_key(row)] = row
    return sorted(latest.values(), key=lambda r: (r.get("model", {}).get("name", ""), r.get("task", ""), r["method"],
                                                  r["memory"]["kept_fraction"], str(r.get("ratio"))))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params(row: dict[str, Any]) -> str:
    """``ratio=0.25`` / ``budget=128`` plus every method parameter that differs from its default."""
    import dataclasses

    from .compressor import REGISTRY, available_methods

    available_methods()
    parts = [f"budget={row['budget']}"] if row.get("budget") is not None else []
    if not parts and row.get("ratio") is not None:
        parts.append(f"ratio={row['ratio']}")
    method_cfg = row.get("config", {}).get("method")
    if isinstance(method_cfg, dict):
        for name, params in method_cfg.items():
            if name not in REGISTRY or not isinstance(params, dict):
                continue
            defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY[name])}
            parts += [f"{k}={v}" for k, v in sorted(params.items()) if k in defaults and defaults[k] != v]
    return " ".join(parts) or "default"


def method_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "task", "method", "params", "kept frac.", "kept MiB", "concurrency ×", "decode ×", "switch ×",
              "accuracy"]
    body = []
    for row in rows:
        mem = row["memory"]
        dep = row.get("latency", {}).get("deployment", {}).get("ratio", {})
        body.append([
            row.get("model", {}).get("name", "?"),
            row.get("task", "?"),
            row["method"],
            _params(row),
            _fmt(mem["kept_fraction"]),
            _fmt(mem["kept_bytes"] / 2**20),
            _fmt(dep.get("concurrency"), 2),
            _fmt(dep.get("decode_s"), 3),
            _fmt(dep.get("context_switch_s"), 3),
            _fmt(headline(row.get("accuracy", {}))),
        ])
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def latex(header: list[str], body: list[list[str]], caption: str) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&").replace("×", "$\\times$")

    lines = [
        "% Generated by python -m kvcompress.tables; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{esc(caption)}}}",
        "\\begin{tabular}{" + "l" * 4 + "r" * (len(header) - 4) + "}",
        "\\toprule",
        " & ".join(esc(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(esc(c) for c in cells) + " \\\\" for cells in body]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def axis_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Best accuracy per axis within kept-fraction buckets (≤0.1, ≤0.25, ≤0.5, ≤1)."""
    from .compressor import REGISTRY, available_methods

    available_methods()
    buckets = (0.1, 0.25, 0.5, 1.0)
    best: dict[tuple[str, str], dict[float, tuple[float, str]]] = defaultdict(dict)
    for row in rows:
        acc = headline(row.get("accuracy", {}))
        if acc is None:
            continue
        names = row["method"].split("+")
        axes = "+".join(sorted({(REGISTRY[n].axis.value if n in REGISTRY and REGISTRY[n].axis else "none") for n in names}))
        bucket = next(b for b in buckets if row["memory"]["kept_fraction"] <= b + 1e-9)
        cell = best[(row.get("task", "?"), axes)]
        if bucket not in cell or acc > cell[bucket][0]:
            cell[bucket] = (acc, row["method"])
    header = ["task", "axis"] + [f"kept ≤ {b:g}" for b in buckets]
    body = []
    for (task, axes), cell in sorted(best.items()):
        body.append([task, axes] + [f"{_fmt(cell[b][0])} ({cell[b][1]})" if b in cell else "–" for b in buckets])
    return header, body


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        acc = headline(row.get("accuracy", {}))
        if acc is not None:
            series[f"{row['method']} ({row.get('task', '?')})"].append((row["memory"]["kept_fraction"], acc))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label in sorted(series):
        points = sorted(series[label])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction of KV bytes")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def heatmaps(rows: list[dict[str, Any]], path: Path) -> bool:
    """One figure with the needle length × depth heatmap of every row that carries a ``grid``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in rows if r.get("task") == "needle" and isinstance(r.get("accuracy", {}).get("grid"), dict)
              and r["accuracy"]["grid"]]
    if not panels:
        return False
    cols = min(6, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.2 * cols, 2.0 * n_rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, panels):
        grid = row["accuracy"]["grid"]
        lengths = sorted(grid, key=lambda x: int(x))
        depths = sorted({d for cells in grid.values() for d in cells}, key=float)
        values = [[grid[length].get(d, float("nan")) for length in lengths] for d in depths]
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), lengths, fontsize=6)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths], fontsize=5)
        ax.set_title(f"{row['method']} {_params(row)}\nkept {row['memory']['kept_fraction']:.2f}", fontsize=6)
    fig.supxlabel("context length (tokens)", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def generate(results: list[Path], out: Path, name: str = "methods") -> list[Path]:
    rows = latest_rows(row for path in results for row in read_rows(path))
    out.mkdir(parents=True, exist_ok=True)
    header, body = method_table(rows)
    caption = "KV-cache compression: kept memory, modelled deployment cost (Fu 2024, relative to full) and accuracy"
    files = {
        out / f"{name}.md": f"# {caption}\n\nGenerated by `python -m kvcompress.tables`; do not edit by hand.\n"
        "Deployment ratios: the row's kept fractions projected onto its deployment target (default Yi-34B-200K, "
        "50K tokens, A100-80GB); concurrency × > 1 and decode/switch × < 1 are better.\n\n" + markdown(header, body),
        out / f"{name}.tex": latex(header, body, caption),
    }
    axis_header, axis_body = axis_table(rows)
    files[out / f"{name}_axes.md"] = "# Best accuracy per compression axis and kept-fraction bucket\n\n" + markdown(
        axis_header, axis_body
    )
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    pareto = out / f"{name}_pareto.png"
    pareto_plot(rows, pareto)
    figures = [pareto]
    if heatmaps(rows, out / f"{name}_needle.png"):
        figures.append(out / f"{name}_needle.png")
    return [*files, *figures]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate paper tables and figures from results files.")
    parser.add_argument("results", nargs="*", default=["results/results.jsonl"])
    parser.add_argument("--out", default="paper_tables")
    parser.add_argument("--name", default="methods")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"error: results file {missing[0]!r} does not exist; valid: existing JSONL results files")
    for path in generate(paths, Path(args.out), args.name):
        print(path)


if __name__ == "__main__":
    main()
