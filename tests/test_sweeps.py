"""Sweeps resume after a real kill without losing or duplicating rows; rows survive a torn last line; tables pivot
one line per configuration and regenerate deterministically; ``model.device_map`` loads through accelerate."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM

from kvcompress.errors import KVCompressError
from kvcompress.models import BUILTIN, load_model
from kvcompress.results import append_row, read_rows
from kvcompress.run import run_config
from kvcompress.tables import ACCURACY_COLUMNS, LINESTYLES, MARKERS, generate

FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=96", "eval.new_tokens=3", "print_summary=false"]
SWEEP = [("streaming", "0.25"), ("streaming", "0.5"), ("random", "0.25"), ("random", "0.5")]
#: The configurations of SWEEP as one Hydra multirun (methods × ratios).
CLI_SWEEP = [*FAST, "method=streaming,random", "ratio=0.25,0.5"]


def kvcompress_cli(*args: str, tmp_path: Path) -> list[str]:
    """``python -m kvcompress.run ARGS`` with Hydra's sweep folder under ``tmp_path``."""
    return [sys.executable, "-m", "kvcompress.run", *args, f"hydra.sweep.dir={tmp_path / 'sweeps'}"]


#: The environment of a CLI run in tests: offline hub and datasets, one thread.
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _run(results: Path, method: str, ratio: str, *extra: str) -> dict[str, Any] | None:
    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        cfg = compose(config_name="config", overrides=[*FAST, f"method={method}", f"ratio={ratio}", f"results={results}", *extra])
    return run_config(cfg)


def _deterministic(path: Path) -> list[tuple[str, dict, dict]]:
    """(config_key, memory, accuracy) of every row, by config_key: what a rerun must reproduce exactly."""
    return sorted((r["config_key"], r["memory"], r["accuracy"]) for r in read_rows(path))


def test_interrupted_sweep_resumes_to_the_same_rows(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    for method, ratio in SWEEP:  # the uninterrupted run (in this process: same configurations, same config keys)
        _run(whole, method, ratio)
    total = len(SWEEP)

    proc = subprocess.Popen(kvcompress_cli("-m", *CLI_SWEEP, f"results={resumed}", tmp_path=tmp_path), env=CLI_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not (resumed.exists() and b"\n" in resumed.read_bytes()):  # poll until the first row is appended
            assert proc.poll() is None, f"the sweep exited with {proc.returncode} before appending a row"
            assert time.monotonic() < deadline, "no row appended within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    survived = read_rows(resumed)
    assert 1 <= len(survived) < total, "the kill must land mid-sweep"

    rerun = subprocess.run(kvcompress_cli("-m", *CLI_SWEEP, f"results={resumed}", tmp_path=tmp_path), env=CLI_ENV,
                           capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("skipped:") == len(survived)  # finished work is not redone ...
    rows = read_rows(resumed)
    assert len(rows) == total == len({r["config_key"] for r in rows})  # ... nor duplicated
    assert _deterministic(resumed) == _deterministic(whole)


def test_rerun_true_recomputes_a_configuration_already_present(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    assert _run(results, *SWEEP[0]) is not None
    assert _run(results, *SWEEP[0]) is None
    assert _run(results, *SWEEP[0], "rerun=true") is not None
    assert len(read_rows(results)) == 2


def test_append_row_starts_a_fresh_line_after_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, {"config_key": "a", "n": 1})
    with open(path, "ab") as f:  # a writer killed mid-write: half a row, no newline
        f.write(b'{"config_key": "b", "n": ')
    append_row(path, {"config_key": "c", "n": 3})
    append_row(path, {"config_key": "d", "n": 4})
    lines = path.read_bytes().split(b"\n")
    assert lines == [b'{"config_key": "a", "n": 1}', b'{"config_key": "b", "n": ', b'{"config_key": "c", "n": 3}',
                     b'{"config_key": "d", "n": 4}', b""]
    assert [r["config_key"] for r in read_rows(path)] == ["a", "c", "d"]
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    append_row(empty, {"n": 1})
    assert empty.read_bytes() == b'{"n": 1}\n'  # no leading blank line in an empty file


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_tables_are_deterministic(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    for method, ratio in (SWEEP[0], SWEEP[2]):
        _run(results, method, ratio)
    first = {p.name: p.read_bytes() for p in generate([results], tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in generate([results], tmp_path / "b")}
    assert first == second
    assert {"methods.md", "methods.tex", "methods_axes.md", "methods_pareto.png"} <= set(first)
    reversed_rows = tmp_path / "reversed.jsonl"  # distinct configurations: the order of the rows does not matter
    reversed_rows.write_text("\n".join(reversed(results.read_text().splitlines())) + "\n")
    assert {p.name: p.read_bytes() for p in generate([reversed_rows], tmp_path / "c")} == first
    header, body = _table(tmp_path / "a" / "methods.md")
    assert header[-4:] == ["needle", "RULER", "LongBench avg.", "fidelity"]
    streaming = next(line for line in body if line[1] == "streaming")
    assert streaming[:3] == ["tiny-random", "streaming", "ratio=0.25"]
    assert streaming[-4:-1] == ["–", "–", "–"]  # evaluations not run
    assert "\\toprule" in (tmp_path / "a" / "methods.tex").read_text()


def test_method_table_has_one_line_per_configuration_with_a_column_per_eval(tmp_path: Path) -> None:
    fidelity = [_run(tmp_path / "fidelity.jsonl", method, ratio) for method, ratio in (SWEEP[0], SWEEP[2])]
    streaming, random = fidelity

    def as_task(row: dict[str, Any], task: str, key: str, value: float, kept: float | None = None) -> dict[str, Any]:
        out = copy.deepcopy(row)
        out["task"], out["config_key"] = task, f"{row['config_key']}-{task}-{value}"
        out["accuracy"] = {"task": task, key: value}
        if kept is not None:
            out["memory"]["kept_fraction"] = kept
        return out

    rows = [
        streaming,
        as_task(streaming, "needle", "exact_match", 0.5, kept=0.3),  # the needle row supplies the memory columns
        as_task(streaming, "ruler", "average", 40.0),
        as_task(streaming, "ruler", "average", 60.0),  # a later row of the same configuration and task wins
        random,
        as_task(random, "ruler", "average", 12.5),
    ]
    results = tmp_path / "rows.jsonl"
    for row in rows:
        append_row(results, row)
    paths = generate([results], tmp_path / "out")
    header, body = _table(tmp_path / "out" / "methods.md")
    assert header == ["model", "method", "params", "kept frac.", "kept MiB", "concurrency ×", "decode ×", "switch ×",
                      *[label for _, label in ACCURACY_COLUMNS], "fidelity"]
    assert len(body) == 2  # one line per (model, method, params), not per task
    by_method = {line[1]: dict(zip(header, line)) for line in body}
    assert by_method["streaming"]["kept frac."] == "0.300"
    assert by_method["random"]["kept frac."] == f"{random['memory']['kept_fraction']:.3f}"  # no needle row: the next
    assert [by_method["streaming"][c] for c in ("needle", "RULER", "LongBench avg.")] == ["0.500", "0.600", "–"]
    assert [by_method["random"][c] for c in ("needle", "RULER", "LongBench avg.")] == ["–", "0.125", "–"]
    assert by_method["streaming"]["fidelity"] == f"{streaming['accuracy']['top1_agreement']:.3f}"
    text = (tmp_path / "out" / "methods.md").read_text()
    assert "LongBench avg.: not run in these results; LongBench (v1) data are not available offline" in text
    assert "RULER: average / 100" in text and "needle: exact_match" in text
    tex = (tmp_path / "out" / "methods.tex").read_text()
    assert "\\begin{tabular}{lll" + "r" * (len(header) - 3) + "}" in tex
    assert tex.count(" \\\\\n") == 1 + len(body)  # header + body lines
    assert (tmp_path / "out" / "methods_pareto.png").stat().st_size > 0 and tmp_path / "out" / "methods_pareto.png" in paths


def test_figure_styles_front_and_intervals() -> None:
    from kvcompress.tables.figures import AXIS_COLORS, pareto_front, sample_interval

    # within a family (one colour) markers × line styles tell 28 methods apart; families have their own colours
    assert len({(MARKERS[i % len(MARKERS)], LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)]) for i in range(28)}) == 28
    assert len(set(AXIS_COLORS.values())) == len(AXIS_COLORS)
    points = [(0.1, 0.2), (0.2, 0.1), (0.25, 0.6), (0.5, 0.6), (0.5, 0.9), (1.0, 0.9)]
    assert pareto_front(points) == [(0.1, 0.2), (0.25, 0.6), (0.5, 0.9)]
    row = {"accuracy": {"sample_metric": "exact_match"}, "samples": [{"exact_match": x} for x in (1, 0, 1, 1)]}
    low, high = sample_interval(row, 0.75)
    assert 0.0 <= low < 0.75 < high <= 1.0 and sample_interval(row, 0.5) is None  # another scale: no bars


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    BUILTIN["tiny-random"](torch.float32).model.save_pretrained(path)
    return path


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loads_through_accelerate(tiny_dir: Path, device_map: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    whole = load_model({"path": str(tiny_dir)}).model
    placed = load_model({"path": str(tiny_dir), "device_map": device_map}).model
    assert seen == [None, device_map]  # the config's device_map reaches from_pretrained (accelerate's placement)
    gpu = device_map == "auto" and torch.cuda.is_available()  # auto: the GPUs first, then the CPU
    assert {p.device.type for p in placed.parameters()} == {"cuda" if gpu else "cpu"}
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = placed(ids.to(next(placed.parameters()).device)).logits.cpu()
        torch.testing.assert_close(got, whole(ids).logits, **({} if gpu else {"rtol": 0, "atol": 0}))


def test_device_map_from_the_run_config(tiny_dir: Path, tmp_path: Path) -> None:
    row = _run(tmp_path / "rows.jsonl", "streaming", "0.25", f"model.path={tiny_dir}", "model.device_map=auto")
    assert row is not None and row["config"]["model"]["device_map"] == "auto"
    assert row["memory"]["kept_fraction"] < 1


def test_device_map_errors_are_one_line() -> None:
    with pytest.raises(KVCompressError, match=r"unknown device_map 'gpu0'; valid: null, auto \| balanced") as err:
        load_model({"path": "/nonexistent", "device_map": "gpu0"})
    assert "\n" not in str(err.value)
    with pytest.raises(KVCompressError, match=r"built-in model 'tiny-random' .*valid: model.device_map=null"):
        load_model({"builtin": "tiny-random", "device_map": "auto"})
