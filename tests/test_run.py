"""``python -m kvcompress.run``: end to end, results rows, sweeps, and nothing lost when a run fails."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import kvcompress
from kvcompress import KVCompressError
from kvcompress.registry import get_method
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
    assert bad.stderr.strip().splitlines()[-1] == "error: ratio=0 is invalid; valid: null or a kept fraction in (0, 1]"
    assert len(results.read_text().splitlines()) == 4


@pytest.mark.parametrize("name", kvcompress.available_methods())
def test_method_configs_are_the_dataclass_defaults(name: str) -> None:
    """``method=<name>`` composes the method's own parameters with its dataclass defaults (generated, no YAML)."""
    assert not (CONFIG_DIR / "method").exists()
    params = OmegaConf.to_container(_cfg(f"method={name}").method)[name]
    defaults = {f.name: f.default for f in dataclasses.fields(get_method(name)) if f.name not in ("ratio", "budget")}
    assert params == defaults


def _layer_kept(mem: dict) -> list[float]:
    """Per layer, the kept share of the dense tokens (mean over KV heads)."""
    return [sum(row) / (len(row) * mem["context_tokens"]) for row in mem["kept_tokens"]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latency_projection_carries_the_residual_window_as_tokens(tmp_path: Path, dtype: str) -> None:
    # lowrank 0.5 keeps its newest `residual` tokens in the cache dtype: at the run's 131 tokens that window is a
    # large share (kept fraction ~0.63); at the 50K target it is 32 tokens, so the projected bytes are the
    # coefficients' half width (at 16 bits on the bf16 target, whatever the run's dtype) plus the index bits.
    row = run_config(_cfg("method=lowrank", "ratio=0.5", f"dtype={dtype}", f"results={tmp_path / 'rows.jsonl'}"))
    mem, dep = row["memory"], row["latency"]["deployment"]
    residual = row["config"]["method"]["lowrank"]["residual"]
    assert mem["fixed_size"]["residual"] == dep["fixed_size"]["residual"]
    assert dep["fixed_size"]["residual"]["tokens"] == residual > 0
    assert all(k == 1.0 for k in _layer_kept(mem))  # hidden axis: every token kept
    assert mem["key_bits"] == pytest.approx([f + d * 8 * mem["dtype_bytes"]
                                             for f, d in zip(mem["fixed_bits"], mem["dtype_fraction"])])
    assert mem["kept_fraction"] > 0.6 and dep["ratio"]["kv_bytes"] == pytest.approx(0.5, abs=0.01)
    assert dep["ratio"]["concurrency"] == pytest.approx(1 / dep["ratio"]["kv_bytes"], rel=0.01)


def test_latency_projection_keeps_quantized_bits_absolute(tmp_path: Path) -> None:
    row = run_config(_cfg("method=quant", "method.quant.residual=32", f"results={tmp_path / 'rows.jsonl'}"))
    mem, evaluated, dep = row["memory"], row["latency"]["evaluated"], row["latency"]["deployment"]
    assert evaluated["ratio"]["kv_bytes"] == pytest.approx(mem["kept_fraction"], rel=1e-6)
    bits, group = row["config"]["method"]["quant"]["bits"], row["config"]["method"]["quant"]["group"]
    # an encoded element: `bits` of code + fp16 scale and minimum per group (2·16 bits / group); the residual
    # window is the fp32 share (dtype_fraction). Left over: the int64 (row, head) index of each encoded segment.
    n_layers, n_kv = len(mem["kept_tokens"]), len(mem["kept_tokens"][0])
    head_dim = mem["dense_bytes"] // (mem["context_tokens"] * n_layers * n_kv * 2 * mem["dtype_bytes"])
    index_bits = 2 * 64 / (mem["context_tokens"] * 2 * head_dim)
    for fixed, frac in zip(mem["fixed_bits"], mem["dtype_fraction"]):
        assert 0 < frac < 1
        assert fixed - (bits + 2 * 16 / group) * (1 - frac) == pytest.approx(index_bits, rel=1e-6)
    # charged as absolute bits on the bf16 target (not scaled by 16/32), the 32-token residual carried as 32 tokens
    # of the 50K target: the ratio is the encoded bits over 16, plus a negligible residual and index share
    assert dep["fixed_size"]["residual"]["tokens"] == 32
    encoded = (bits + 2 * 16 / group) / 16
    assert encoded < dep["ratio"]["kv_bytes"] < encoded + 0.005 < mem["kept_fraction"]


def test_layers_row_records_kept_layers_and_memory_only_prefill(tmp_path: Path) -> None:
    row = run_config(_cfg("method=layers", "ratio=0.5", f"results={tmp_path / 'rows.jsonl'}"))
    n_layers = len(row["memory"]["kept_tokens"])
    kept = row["method_state"]["layers"]["kept_layers"]
    assert len(kept) == row["config"]["eval"]["samples"]  # one list per batch row
    for layers in kept:
        assert len(layers) == math.ceil(0.5 * n_layers) and layers == sorted(set(layers))
        assert all(0 <= i < n_layers for i in layers)
    assert row["memory"]["prefill_saving"] == "memory-only" and row["memory"]["prefill_skips_kv_layers"] == []
    lat = row["latency"]
    assert lat["evaluated"]["prefill_saving"] == lat["deployment"]["prefill_saving"] == "memory-only"
    # no K/V skipped: the prefill FLOPs only grow by the declared scoring FLOPs
    extra = row["memory"]["extra_prefill_flops"]
    assert extra > 0
    assert lat["evaluated"]["prefill_flops"] - lat["evaluated"]["baseline"]["prefill_flops"] == pytest.approx(extra)


def test_hidden_method_row_has_per_layer_reconstruction_error(tmp_path: Path) -> None:
    row = run_config(_cfg("method=quant", "method.quant.residual=32", f"results={tmp_path / 'rows.jsonl'}"))
    errors = row["method_state"]["quant"]["recon_error"]
    assert sorted(errors, key=int) == [str(i) for i in range(len(row["memory"]["kept_tokens"]))]
    for err in errors.values():
        assert 0 < err["k"] < 0.5 and 0 < err["v"] < 0.5  # 4-bit KIVI on random-init K/V


def test_row_hides_internal_state(tmp_path: Path) -> None:
    row = run_config(_cfg("method=lowrank", "ratio=0.5", f"results={tmp_path / 'rows.jsonl'}"))
    assert "recon_error" in row["method_state"]["lowrank"]
    assert not [k for k in row["method_state"]["lowrank"] if k.startswith("_")]


def test_latency_block_names_the_run_model(tmp_path: Path) -> None:
    row = run_config(_cfg("method=streaming", "ratio=0.5", f"results={tmp_path / 'rows.jsonl'}"))
    assert row["latency"]["evaluated"]["model"] == row["model"]["name"] == "tiny-random"
    assert row["latency"]["deployment"]["projected_from"]["model"] == "tiny-random"
