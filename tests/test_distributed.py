"""``accelerate launch`` with 2 CPU processes splits the samples and writes the same row as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompress.distributed import gather, shard, world

ARGS = ["method=streaming", "ratio=0.25", "model=tiny-random", "eval=fidelity", "eval.samples=3",
        "eval.context=96", "eval.new_tokens=4", "print_summary=false"]


def test_single_process_shard_and_gather_are_the_identity() -> None:
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3]
    assert gather(["a", "b"], 2) == ["a", "b"]


def _row(path: Path) -> dict:
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    row.pop("provenance")
    row.pop("timing")  # wall seconds: the only other part of a row that is not a function of its configuration
    row["config"].pop("results")
    return row


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="accelerate CLI missing")
def test_two_processes_write_the_single_process_row(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    subprocess.run([sys.executable, "-m", "kvcompress.run", *ARGS, f"results={single}"], check=True, env=env,
                   capture_output=True, timeout=300)
    launcher = str(Path(sys.executable).parent / "accelerate")
    proc = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvcompress.run", *ARGS,
                           f"results={double}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _row(double) == _row(single)
