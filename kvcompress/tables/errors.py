"""``errors.md``: error analysis from a results file's per-sample predictions sidecar (``<results>.predictions.jsonl``,
written by ``python -m kvcompress.run`` beside every results file).

    python -m kvcompress.tables errors rows=results/runs.jsonl out=results/   # or rows=<...>.predictions.jsonl

Per configuration (method, ratio / budget, model, task; its latest run): samples, mean per-sample score, failed
samples (score below 1 for 0–1 metrics, below the configuration's best otherwise), and the kept fraction right after
the prefill. Then the worst samples overall (lowest score first, ties in configuration and sample order): the sample's
metadata, prediction and reference, each cut to :data:`WIDTH` characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .render import markdown

#: worst samples listed
WORST = 20
#: characters of a prediction / reference shown
WIDTH = 60


def _config(record: dict[str, Any]) -> tuple[str, str, str, str]:
    size = f"ratio={record['ratio']}" if record.get("ratio") is not None else (
        f"budget={record['budget']}" if record.get("budget") is not None else "—")
    return str(record.get("method")), size, str(record.get("model")), str(record.get("task"))


def _cut(value: Any) -> str:
    text = value if isinstance(value, str) else ("—" if value is None else str(value))
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= WIDTH else text[: WIDTH - 1] + "…"


def _meta(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(meta.items()) if isinstance(v, (str, int, float)))


def latest_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of each configuration's latest run (a rerun appends a new set under the same ``config_key``)."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for record in records:
        sets = runs.setdefault(str(record.get("config_key")), [])
        if not sets or any(r["id"] == record["id"] for r in sets[-1]):
            sets.append([])
        sets[-1].append(record)
    return [r for sets in runs.values() for r in sets[-1]]


def render(records: list[dict[str, Any]]) -> str:
    records = [r for r in latest_runs(records) if isinstance(r.get("score"), (int, float))]
    by_config: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        by_config.setdefault(_config(record), []).append(record)
    summary = []
    for config, group in by_config.items():
        scores = [float(r["score"]) for r in group]
        unit = all(0.0 <= s <= 1.0 for s in scores)
        failed = sum(s < (1.0 if unit else max(scores)) for s in scores)
        prefill = [r["kept_fraction_prefill"] for r in group if r.get("kept_fraction_prefill") is not None]
        summary.append([*config, group[0]["metric"], str(len(group)), f"{sum(scores) / len(scores):.3f}", str(failed),
                        f"{sum(prefill) / len(prefill):.3f}" if prefill else "—"])
    worst = sorted(records, key=lambda r: float(r["score"]))[:WORST]
    body = [[*_config(r)[:2], _config(r)[3], str(r["id"]), _meta(r.get("meta") or {}), f"{float(r['score']):.3f}",
             _cut(r.get("prediction")), _cut(r.get("reference"))] for r in worst]
    return "\n".join([
        "# Error analysis: per-sample predictions\n",
        markdown(["method", "size", "model", "task", "metric", "samples", "mean score", "failed", "kept after prefill"],
                 summary),
        f"## The {len(body)} worst samples\n",
        markdown(["method", "size", "task", "id", "sample", "score", "prediction", "reference"], body,
                 [f"Predictions and references cut to {WIDTH} characters; whitespace collapsed."]),
    ])


def write(records: list[dict[str, Any]], out: Path) -> list[Path]:
    path = out / "errors.md"
    path.write_text(render(records), encoding="utf-8")
    return [path]
