"""Sweeps resume without losing or duplicating rows; tables regenerate deterministically from rows."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_module

from kvcompress.run import run_config
from kvcompress.tables import generate

FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=96", "eval.new_tokens=3", "print_summary=false"]
SWEEP = [("streaming", "0.25"), ("random", "0.25"), ("random", "0.5")]


def _run(results: Path, method: str, ratio: str, *extra: str):
    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        cfg = compose(config_name="config", overrides=[*FAST, f"method={method}", f"ratio={ratio}", f"results={results}", *extra])
    return run_config(cfg)


def _comparable(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.pop("provenance")
        row["config"].pop("results")
    return sorted(rows, key=lambda r: r["config_key"])


def test_interrupted_sweep_resumes_to_the_same_rows(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    for method, ratio in SWEEP:
        _run(whole, method, ratio)
    _run(resumed, *SWEEP[0])  # "killed" after the first configuration
    skipped = [_run(resumed, method, ratio) is None for method, ratio in SWEEP]
    assert skipped == [True, False, False]
    assert _comparable(resumed) == _comparable(whole)
    assert len(resumed.read_text().splitlines()) == len(SWEEP)
    assert _run(resumed, *SWEEP[0], "rerun=true") is not None
    assert len(resumed.read_text().splitlines()) == len(SWEEP) + 1


def test_tables_are_deterministic(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    for method, ratio in SWEEP[:2]:
        _run(results, method, ratio)
    first = {p.name: p.read_bytes() for p in generate([results], tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in generate([results], tmp_path / "b")}
    assert first == second
    table = (tmp_path / "a" / "methods.md").read_text()
    assert "| tiny-random | fidelity | streaming | ratio=0.25 |" in table
    assert {"methods.md", "methods.tex", "methods_axes.md", "methods_pareto.png"} <= set(first)
    assert "\\toprule" in (tmp_path / "a" / "methods.tex").read_text()
