"""What the table specs read from results rows (:class:`kvcompress.results.Row` as dicts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def latest(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``config_key`` (the last one), in the order of those last rows."""
    from .methods import latest_rows

    return latest_rows(rows)


def param(row: dict[str, Any], method: str, key: str, default: Any = None) -> Any:
    """A method parameter of the row's resolved config (``config.method.<method>.<key>``)."""
    params = row.get("config", {}).get("method", {})
    if not isinstance(params, dict):
        return default
    return (params.get(method) or {}).get(key, default)


def eval_option(row: dict[str, Any], key: str, default: Any = None) -> Any:
    value = row.get("config", {}).get("eval", {}).get(key)
    return default if value is None else value


def distractors(row: dict[str, Any]) -> str:
    """``3 distractors`` (a needle row's distractor keys, the template's default when not set)."""
    template = eval_option(row, "template", "magic_number")
    n = eval_option(row, "num_distractors", 3 if template == "magic_number" else 0)
    return f"{n} distractors"


def sample_state(row: dict[str, Any], index: int) -> dict[str, Any]:
    """What the methods decided for sample ``index``: the row's ``method_state`` (the first sample's) updated with the
    entries that sample's record lists as different."""
    merged = {name: dict(state) if isinstance(state, dict) else state for name, state in row.get("method_state", {}).items()}
    samples = row.get("samples") or []
    diff = samples[index].get("method_state", {}) if samples else {}
    for name, state in diff.items():
        if isinstance(state, dict) and isinstance(merged.get(name), dict):
            merged[name].update(state)
        else:
            merged[name] = state
    return merged


def mean_kept(row: dict[str, Any]) -> float:
    """Mean over samples of the kept fraction at the end of each sample's generation (the row's when it has no
    per-sample records)."""
    kept = [s["kept_fraction"] for s in row.get("samples") or [] if "kept_fraction" in s]
    return sum(kept) / len(kept) if kept else float(row["memory"]["kept_fraction"])


def measured_seconds(rows: Iterable[dict[str, Any]]) -> float:
    """Load + evaluation wall time summed over rows."""
    return sum(float(r.get("timing", {}).get("load_s", 0.0)) + float(r.get("timing", {}).get("eval_s", 0.0))
               for r in rows)


def footer(table: str, rows: list[dict[str, Any]], sweep: str) -> str:
    """The closing line of a per-axis table: how its rows were measured (command, time, threads) and rendered."""
    threads = sorted({r.get("provenance", {}).get("threads") for r in rows} - {None})
    devices = sorted({str(r.get("provenance", {}).get("device", "cpu")) for r in rows})
    return (f"Rows: `paper_tables/rows/{table}.jsonl`, measured by `{sweep}` in {measured_seconds(rows):.1f} s "
            f"(model loads + evaluations; {', '.join(devices).upper()}, {', '.join(map(str, threads))} thread(s)); "
            f"table by `python -m kvcompress.tables {table}`.")
