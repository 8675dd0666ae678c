"""Smoke test of the benchmark suite (``python -m kvcompress.bench --config quick`` with tiny sizes): every part
runs and writes perf.md + perf.json with the expected blocks. Figures are not checked (a shared CPU)."""

from __future__ import annotations

import json

from kvcompress.bench.__main__ import main
from kvcompress.bench.report import targets


def test_quick_config_tiny(tmp_path) -> None:
    md, js = tmp_path / "perf.md", tmp_path / "perf.json"
    results = main([
        "--config", "quick", f"out_md={md}", f"out_json={js}",
        "bandwidth.size_mib=8", "bandwidth.repeats=2",
        "prefill.contexts=[256]", "prefill.methods=[full,snapkv,knorm]", "prefill.repeats=1",
        "prefill.methods_by_model={kv-heavy:[full,snapkv]}", "prefill.repeats_by_model={kv-heavy: 2}",
        "decode.contexts=[256]", "decode.variants=[dynamic,full,snapkv@0.5]", "decode.steps=2", "decode.repeats=1",
        "decode.attention_iters=2", "decode.attention_repeats=1",
        "ops.rows=[64,40]", "ops.variants=[dynamic,full,adaptive_heads@0.3]", "ops.distinct=[1,4]",
        "memory.context=256", "memory.steps=2", "memory.methods=[full,snapkv]",
        "throughput.lengths=[128]", "throughput.depths=[0.5]", "throughput.methods=[full]", "throughput.repeats=1",
    ])
    data = json.loads(js.read_text())
    assert {"bandwidth", "prefill", "decode", "ops", "memory", "throughput", "machine"} <= set(data)
    assert data["machine"]["torch_threads"] >= 1
    pre = data["prefill"]["kv-heavy"]["contexts"]["256"]
    assert set(pre["methods"]) == {"full", "snapkv"} and pre["repeats"] == 2  # per-model method list and repeats
    assert "% of the prefill FLOPs at 4K" in data["models"]["kv-heavy"]
    dec = data["decode"]["kv-heavy"]["contexts"]["256"]
    assert set(dec["rows"]) == {"dynamic", "full", "snapkv@0.5"} and dec["full_vs_dynamic"]["n"] == 1
    assert dec["rows"]["snapkv@0.5"]["kept_fraction"] < 0.6
    ops = data["ops"]["kv-heavy"]
    assert ops["variants"]["full"]["kernels_per_layer"] == ops["variants"]["dynamic"]["kernels_per_layer"]
    assert ops["variants"]["adaptive_heads@0.3"]["ragged_layers"] == 2
    assert ops["ragged_distinct"]["1"] == ops["ragged_distinct"]["4"]
    mem = data["memory"]["kv-heavy"]["rows"]
    assert mem["full"]["storage_bytes"] >= mem["full"]["kept_bytes"] > mem["snapkv"]["kept_bytes"]
    assert data["throughput"]["testbed"]["methods"]["full"]["samples_per_min"]["median"] > 0
    text = md.read_text()
    assert "## Targets" in text and "## Decode — kv-heavy" in text and "torch thread" in text
    assert "## Kernels per decode step — kv-heavy" in text
    assert targets(results)  # at least one target evaluated
