"""``python -m kvcompress.sweep TABLE [key=value ...]`` — measure the rows behind a paper table, then render it.

A sweep is a config under ``configs/sweeps/<TABLE>.yaml``: ``python -m kvcompress.run -m`` invocations (``runs``,
each a list of Hydra overrides on top of ``overrides``), optionally a ``derive`` step (a function
``module:function`` that reads the rows measured so far and returns more override lists, e.g. same-memory controls)
and ``commands`` (other programs that append rows, such as ``scripts/rope_check.py``; ``${rows}`` is the rows
file). Every run appends to ``rows`` (default ``paper_tables/rows/<TABLE>.jsonl``, committed beside the tables);
configurations already in that file are skipped, so a killed sweep resumes — delete the file to measure anew. Then
``python -m kvcompress.tables TABLE`` renders the table into ``out`` (``render=false``: not rendered).

    python -m kvcompress.sweep testbed                  # the testbed's full-cache needle grid (~5 min)
    python -m kvcompress.sweep heads rows=/tmp/h.jsonl out=/tmp/tables
    python -m kvcompress.sweep methods                  # bash scripts/paper_sweep.sh (the paper sweep, ~8 min)

Commands run from the repository root (the sweeps live in a source checkout: ``scripts/``, ``scripts/``,
``paper_tables/``); ``rows`` and ``out`` are taken relative to the current directory.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cli import CONFIG_DIR, Command, fail
from .cli import main as cli_main
from .errors import KVCompressError

ROOT = Path(__file__).resolve().parents[1]


def sweeps() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "sweeps").glob("*.yaml"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("OMP_NUM_THREADS", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env


def _call(argv: list[str], dry_run: bool) -> None:
    print("+ " + " ".join(argv), flush=True)
    if dry_run:
        return
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), check=False)
    if proc.returncode != 0:
        raise KVCompressError(f"sweep step failed with exit status {proc.returncode}: {' '.join(argv)}")


def run_sweep(cfg: Any, table: str) -> int:
    """Run the sweep ``cfg`` (a composed ``configs/sweeps/<table>.yaml``), then render ``table``."""
    from omegaconf import OmegaConf

    from .results import read_rows

    cfg.rows = str(Path(str(cfg.rows)).expanduser().resolve())  # ${rows} in commands run from the repository root
    if cfg.get("out"):
        cfg.out = str(Path(str(cfg.out)).expanduser().resolve())
    spec = OmegaConf.to_container(cfg, resolve=True)
    rows = Path(spec["rows"])
    rows.parent.mkdir(parents=True, exist_ok=True)
    dry = bool(spec.get("dry_run", False))
    start = time.perf_counter()
    run = [sys.executable, "-m", "kvcompress.run", "-m", *spec.get("overrides", []), "print_summary=false",
           f"results={rows}"]
    for overrides in spec.get("runs") or []:
        _call(run + list(overrides), dry)
    if spec.get("derive"):
        module, _, function = spec["derive"].partition(":")
        for overrides in getattr(importlib.import_module(module), function)(read_rows(rows)):
            _call(run + list(overrides), dry)
    for command in spec.get("commands") or []:
        argv = [sys.executable if part == "python" else str(part) for part in command]
        _call(argv, dry)
    elapsed = time.perf_counter() - start
    print(f"sweep {table}: wall time {int(elapsed // 60)} min {int(elapsed % 60):02d} s; rows in {rows}", flush=True)
    if spec.get("render", True) and spec.get("out") and not dry:
        from .tables import write_table

        for path in write_table(table, rows, spec["out"]):
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    commands = {
        name: Command(f"sweeps/{name}", lambda cfg, name=name: run_sweep(cfg, name),
                      f"Measure the rows behind paper_tables' {name} table (configs/sweeps/{name}.yaml), then render it.")
        for name in sweeps()
    }
    try:
        return int(cli_main("python -m kvcompress.sweep", commands, sys.argv[1:] if argv is None else argv) or 0)
    except KVCompressError as err:
        return fail(err)


if __name__ == "__main__":
    sys.exit(main())
