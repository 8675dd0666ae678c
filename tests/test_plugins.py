"""A method defined in the user's own module runs from the CLI: ``method=mymod:MyMethod``, or modules named in
``$KVCOMPRESS_PLUGINS`` (the entry-point group ``kvcompress.methods`` is read the same way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = '''
from dataclasses import dataclass

import torch

from kvcompress import Axis, Compressor, register


@register
@dataclass
class KeepNewest(Compressor):
    """Keeps the newest ``ratio`` of the tokens (a user's method, outside the package)."""

    name = "keep_newest_plugin"
    axis = Axis.TOKEN
    ratio: float = 0.5

    def select(self, view, ctx):
        n = view.valid.shape[-1]
        positions = torch.arange(n, device=view.valid.device)
        return (positions >= n - max(1, round(self.ratio * n))).expand_as(view.valid) & view.valid
'''


def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(tmp_path), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvcompress.run", "model=tiny-random", "eval=fidelity",
                           "eval.samples=1", "eval.context=48", "eval.new_tokens=2", "print_summary=false",
                           f"results={tmp_path / 'rows.jsonl'}", *args],
                          capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=600, check=False)


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    return tmp_path


def test_a_module_class_reference_runs_from_the_cli(plugin: Path) -> None:
    proc = _cli(plugin, "method=my_methods:KeepNewest", "ratio=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (plugin / "rows.jsonl").read_text().splitlines()]
    assert row["method"] == "keep_newest_plugin" and row["methods"][0]["ratio"] == 0.5
    assert 0.4 < row["memory"]["kept_fraction_prefill"] < 0.6


def test_plugins_named_in_the_environment_are_methods(plugin: Path) -> None:
    proc = _cli(plugin, "method=keep_newest_plugin", "ratio=0.25", env={"KVCOMPRESS_PLUGINS": "my_methods"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_bad_reference_is_one_line(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "method=no_such_module:Mine")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no_such_module" in proc.stderr and "valid" in proc.stderr
