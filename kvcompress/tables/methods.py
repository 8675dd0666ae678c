"""The method table: one line per (model, method, parameters) of the paper sweep, its axis summary and figures.

    python -m kvcompress.tables methods [rows=paper_tables/rows/methods.jsonl] [out=paper_tables] [name=methods]

Writes, deterministically (same rows → byte-identical files):

* ``<name>.md`` / ``<name>.tex`` (booktabs): one line per (model, method, parameters) — kept fraction, kept bytes,
  the modelled deployment metrics relative to the uncompressed cache (concurrency, decode time, context switch;
  Fu 2024's model on the rows' deployment target), then one accuracy column per evaluation: needle, RULER and the
  LongBench average always (``–`` where that evaluation was not run), then any other task found (e.g. fidelity).
  The memory and deployment columns come from the configuration's needle row, else its RULER, LongBench, then other
  rows; notes under the table give each column's metric and evaluation settings, derived from the rows;
* ``<name>_axes.md``: the best accuracy per axis at each kept-fraction bucket;
* ``<name>_pareto.png`` / ``.pdf``: accuracy vs kept fraction at single-column width, one panel per task, one colour
  per method family (its axes) and a marker per method, bootstrap 95% intervals over samples, the Pareto front;
* ``<name>_needle.png`` / ``.pdf``: one needle heatmap, a row per configuration and a column per (length, depth).

Figures are PNG at 300 dpi plus vector PDF, without timestamps (same rows → byte-identical files).

When a configuration appears in several rows, the last row wins; so does the last row of a (model, method,
parameters, task) whose other settings (eval lengths, seed, ...) differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..results import read_rows
from .render import latex, markdown

#: The headline metric of each task's accuracy block, in order of preference.
HEADLINE = ("score", "average", "exact_match", "top1_agreement")
#: Tasks that report on a 0–100 scale (as their papers do); tables show every headline on 0–1.
PERCENT_TASKS = ("ruler", "longbench")
#: The accuracy columns every per-method table has, in order: (task, column header). Other tasks follow, by name.
ACCURACY_COLUMNS = (("needle", "needle"), ("ruler", "RULER"), ("longbench", "LongBench avg."))
#: The eval settings the notes under the table report for each task (from the rows' resolved ``config.eval``).
SETTINGS = {
    "needle": ("lengths", "depths", "template", "samples", "query_aware"),
    "ruler": ("tasks", "lengths", "samples", "answer_prefix", "query_aware"),
    "longbench": ("tasks", "max_len", "samples", "data_dir", "query_aware"),
}
#: Why a fixed accuracy column can be empty (shown when no row has that task).
NOT_RUN = {
    "longbench": "LongBench (v1) data are not available offline; run eval=longbench eval.data_dir=DIR on the "
    "official data.zip files to fill it (the made-up fixture in tests/data/longbench only tests the pipeline)",
}
def headline_key(accuracy: dict[str, Any]) -> str | None:
    """The accuracy-block key a table reports for a row (the first of :data:`HEADLINE` with a number)."""
    for key in HEADLINE:
        value = accuracy.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key
    return None


def headline(accuracy: dict[str, Any]) -> float | None:
    key = headline_key(accuracy)
    if key is None:
        return None
    return float(accuracy[key]) / (100.0 if accuracy.get("task") in PERCENT_TASKS else 1.0)


def row_key(row: dict[str, Any]) -> str:
    """What identifies a configuration: the run's ``config_key`` (hash of the resolved config), else its model,
    method, parameters and task."""
    if row.get("config_key"):
        return str(row["config_key"])
    cfg = row.get("config", {})
    return json.dumps(
        {
            "model": _model(row),
            "method": cfg.get("method", row.get("method")),
            "ratio": row.get("ratio"),
            "budget": row.get("budget"),
            "task": row.get("task"),
            "eval": cfg.get("eval"),
        },
        sort_keys=True,
    )


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (the last one), in the order of those last rows (so later rows win again when
    :func:`configurations` merges rows that differ only in settings it does not show)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values())


def _sort_key(row: dict[str, Any]) -> tuple[str, str, str, float, str]:
    return (_model(row), row.get("task", ""), row["method"], row["memory"]["kept_fraction"], _params(row))


def _model(row: dict[str, Any]) -> str:
    return str(row.get("model", {}).get("name", "?"))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _method_params(row: dict[str, Any]) -> list[str]:
    """``name=value`` for every method parameter of the row that differs from its dataclass default."""
    from ..registry import REGISTRY, available_methods

    available_methods()
    method_cfg = row.get("config", {}).get("method")
    parts: list[str] = []
    if isinstance(method_cfg, dict):
        for name, params in method_cfg.items():
            if name not in REGISTRY or not isinstance(params, dict):
                continue
            defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY[name])}
            parts += [f"{k}={v}" for k, v in sorted(params.items()) if k in defaults and defaults[k] != v]
    return parts


def _params(row: dict[str, Any]) -> str:
    """``ratio=0.25`` / ``budget=128`` plus every method parameter that differs from its default."""
    parts = [f"budget={row['budget']}"] if row.get("budget") is not None else []
    if not parts and row.get("ratio") is not None:
        parts.append(f"ratio={row['ratio']}")
    return " ".join(parts + _method_params(row)) or "default"


def _tasks(rows: list[dict[str, Any]]) -> list[str]:
    """Fixed accuracy columns first, then every other task in the rows, by name."""
    fixed = [task for task, _ in ACCURACY_COLUMNS]
    return fixed + sorted({str(r.get("task", "?")) for r in rows} - set(fixed))


def configurations(rows: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """Rows grouped by (model, method, parameters): ``{task: row}`` per configuration, sorted by model, method,
    kept fraction and parameters. A later row replaces an earlier one of the same task."""
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((_model(row), row["method"], _params(row)), {})[str(row.get("task", "?"))] = row
    order = _tasks(rows)

    def memory_row(by_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return by_task[next(t for t in order if t in by_task)]

    return [
        by_task
        for _, by_task in sorted(groups.items(), key=lambda kv: (*kv[0][:2], memory_row(kv[1])["memory"]["kept_fraction"], kv[0][2]))
    ]


def method_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    tasks = _tasks(rows)
    names = dict(ACCURACY_COLUMNS)
    header = ["model", "method", "params", "kept frac.", "kept MiB", "concurrency ×", "decode ×", "switch ×"]
    header += [names.get(t, t) for t in tasks]
    body = []
    for by_task in configurations(rows):
        first = by_task[next(t for t in tasks if t in by_task)]
        mem = first["memory"]
        dep = first.get("latency", {}).get("deployment", {}).get("ratio", {})
        body.append([
            _model(first),
            first["method"],
            _params(first),
            _fmt(mem["kept_fraction"]),
            _fmt(mem["kept_bytes"] / 2**20),
            _fmt(dep.get("concurrency"), 2),
            _fmt(dep.get("decode_s"), 3),
            _fmt(dep.get("context_switch_s"), 3),
            *[_fmt(headline(by_task[t].get("accuracy", {}))) if t in by_task else "–" for t in tasks],
        ])
    return header, body


def table_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the per-method table's columns mean, derived from the rows: the deployment target, each accuracy
    column's metric and evaluation settings, and why a fixed column is empty."""
    notes = []
    targets = sorted({
        (str(d.get("model")), d.get("context"), str(d.get("hardware")), d.get("tp"))
        for d in (r.get("latency", {}).get("deployment", {}) for r in rows)
        if d
    }, key=str)
    if len(targets) == 1:
        model, context, hardware, tp = targets[0]
        where = f"{model} at {context} tokens on {hardware} (tp={tp})"
    else:
        where = f"each row's deployment target ({len(targets)} in these results)"
    notes.append(
        f"Deployment ratios (Fu 2024's model): the configuration's kept fractions projected onto {where}, relative to "
        "the full cache; concurrency × > 1 and decode/switch × < 1 are better. Kept fraction, kept MiB and the ratios "
        "come from the configuration's needle row, else its RULER, LongBench or other row. The projection keeps each "
        "layer's measured mix of storage per element, so a fixed-size full-precision part (quant's residual window) "
        "keeps its share of a short evaluated context: over-charged at the target's longer context."
    )
    names = dict(ACCURACY_COLUMNS)
    for task in _tasks(rows):
        task_rows = [r for r in rows if r.get("task") == task]
        label = names.get(task, task)
        if not task_rows:
            notes.append(f"{label}: not run in these results" + (f"; {NOT_RUN[task]}" if task in NOT_RUN else "") + ".")
            continue
        metrics = sorted({str(headline_key(r.get("accuracy", {}))) for r in task_rows})
        scale = " / 100" if task in PERCENT_TASKS else ""
        text = f"{label}: {', '.join(metrics)}{scale}"
        keys = SETTINGS.get(task, ())
        settings = {
            json.dumps({k: r.get("config", {}).get("eval", {}).get(k) for k in keys}, sort_keys=True) for r in task_rows
        }
        if keys and len(settings) == 1:
            values = json.loads(settings.pop())
            text += " (" + ", ".join(f"{k}={_setting(values[k])}" for k in keys) + ")"
        elif keys:
            text += f" (settings differ across its {len(task_rows)} rows)"
        notes.append(text + ".")
    return notes


def _setting(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "default" if value is None else str(value)


def axis_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Best accuracy per axis within kept-fraction buckets (≤0.1, ≤0.25, ≤0.5, ≤1)."""
    from ..registry import REGISTRY, available_methods

    available_methods()
    buckets = (0.1, 0.25, 0.5, 1.0)
    best: dict[tuple[str, str], dict[float, tuple[float, str]]] = defaultdict(dict)
    for row in sorted(rows, key=_sort_key):
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


def generate(results: list[Path], out: Path, name: str = "methods") -> list[Path]:
    """Write the method table and figures of the rows in the ``results`` files into ``out``; returns the paths."""
    return write(latest_rows(row for path in results for row in read_rows(path)), out, name)


def write(rows: list[dict[str, Any]], out: Path, name: str = "methods") -> list[Path]:
    """Write the method table and figures of ``rows`` (the last row of each configuration) into ``out``; returns
    the paths."""
    rows = latest_rows(rows)
    out.mkdir(parents=True, exist_ok=True)
    header, body = method_table(rows)
    notes = table_notes([row for by_task in configurations(rows) for row in by_task.values()])  # the rows shown
    caption = "KV-cache compression: kept memory, modelled deployment cost (Fu 2024, relative to full) and accuracy"
    files = {
        out / f"{name}.md": f"# {caption}\n\nGenerated by `python -m kvcompress.tables`; do not edit by hand.\n\n"
        + markdown(header, body, notes),
        out / f"{name}.tex": latex(header, body, caption, notes=notes),
    }
    axis_header, axis_body = axis_table(rows)
    files[out / f"{name}_axes.md"] = "# Best accuracy per compression axis and kept-fraction bucket\n\n" + markdown(
        axis_header, axis_body
    )
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    from .figures import heatmaps, pareto_plot

    figures = pareto_plot(rows, out / f"{name}_pareto.png") + heatmaps(rows, out / f"{name}_needle.png")
    return [*files, *figures]
