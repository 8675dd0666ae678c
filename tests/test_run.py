"""``python -m kvcompress.run``: end to end, results rows, sweeps, and nothing lost when a run fails."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

import kvcompress
from kvcompress import KVCompressError
from kvcompress.compressor import get_method
from kvcompress.run import CONFIG_DIR, run_config

FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=128", "eval.new_tokens=4", "print_summary=false"]


def _cfg(*overrides: str):
    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        return compose(config_name="config", overrides=[*FAST, *overrides])


def test_run_appends_a_complete_row(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    row = run_config(_cfg("method=streaming", "ratio=0.25", f"results={results}"))
    stored = [json.loads(line) for line in results.read_text().splitlines()]
    assert stored == [json.loads(json.dumps(row, sort_keys=True))]
    assert row["method"] == "streaming" and row["config"]["ratio"] == 0.25
    mem = row["memory"]
    assert 0 < mem["kept_bytes"] < mem["dense_bytes"]
    assert mem["kept_fraction"] == pytest.approx(mem["kept_bytes"] / mem["dense_bytes"])
    assert len(mem["kept_tokens"]) == 4 and len(mem["kept_tokens"][0]) == 2  # layers x KV heads
    assert {"token_agreement", "top1_agreement", "kl"} <= set(row["accuracy"])
    assert "meaningless" in row["accuracy"]["note"]
    latency = row["latency"]
    assert latency["evaluated"]["label"] == "evaluated" and latency["deployment"]["label"] == "deployment"
    assert latency["deployment"]["model"] == "yi-34b-200k" and latency["deployment"]["context"] == 50000
    assert latency["deployment"]["ratio"]["kv_bytes"] == pytest.approx(mem["kept_fraction"], rel=1e-6)
    assert latency["deployment"]["concurrency"] > latency["deployment"]["baseline"]["concurrency"]
    prov = row["provenance"]
    assert {"kvcompress", "git_commit", "torch", "transformers", "device", "seed", "timestamp"} <= set(prov)


def test_default_run_is_the_testbed_with_needle_accuracy(tmp_path: Path) -> None:
    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["method=streaming", "ratio=0.1", "eval.lengths=[1024]", "eval.depths=[0.0,1.0]",
                       "print_summary=false", f"results={tmp_path / 'rows.jsonl'}"],
        )
    row = run_config(cfg)
    assert row["model"] == {"name": "testbed", "constructed": True, "random_init": False}
    assert row["accuracy"]["task"] == "needle" and row["accuracy"]["query_aware"] is True
    # Depth 0 needle is evicted by a 10% sink+window cache; depth 1.0 sits in the window.
    assert row["accuracy"]["exact_match@d0"] == 0.0 and row["accuracy"]["exact_match@d1"] == 1.0
    assert "constructed" in row["accuracy"]["note"]


def test_failed_run_keeps_existing_rows(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    run_config(_cfg("method=full", f"results={results}"))
    before = results.read_bytes()
    with pytest.raises(KVCompressError):
        run_config(_cfg("method=streaming", "method.streaming.window=100000", f"results={results}"))
    with pytest.raises(KVCompressError):
        run_config(_cfg("method=streaming", "ratio=2", f"results={results}"))
    with pytest.raises(KVCompressError):
        run_config(_cfg("method=streaming", "eval.context=20000", f"results={results}"))
    assert results.read_bytes() == before


def test_cli_sweep_and_composition(tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kvcompress.run", "-m", "method=streaming,random", "ratio=0.1,0.5", *FAST, f"results={results}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["method"], r["ratio"]) for r in rows) == [
        ("random", 0.1), ("random", 0.5), ("streaming", 0.1), ("streaming", 0.5)
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "kvcompress.run", "method=streaming", "ratio=0", f"results={results}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: ratio=0.0 is out of range; valid: a kept fraction in (0, 1]"
    assert len(results.read_text().splitlines()) == 4


@pytest.mark.parametrize("name", kvcompress.available_methods())
def test_method_config_files_match_dataclass_defaults(name: str) -> None:
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    assert path.exists(), f"configs/method/{name}.yaml is missing"
    params = yaml.safe_load(path.read_text())[name]
    defaults = {f.name: f.default for f in dataclasses.fields(get_method(name)) if f.name not in ("ratio", "budget")}
    assert params == defaults


def test_latency_projection_charges_hidden_axis_bytes(tmp_path: Path) -> None:
    row = run_config(_cfg("method=quant", "method.quant.residual=32", f"results={tmp_path / 'rows.jsonl'}"))
    mem, evaluated = row["memory"], row["latency"]["evaluated"]
    assert evaluated["ratio"]["kv_bytes"] == pytest.approx(mem["kept_fraction"], rel=1e-6)
    # Effective bits (codes + fp16 scales + the fp32 residual window) are charged on the deployment target too.
    assert row["latency"]["deployment"]["ratio"]["kv_bytes"] < 0.8
