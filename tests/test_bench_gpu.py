"""``python -m kvcompress.bench gpu``: skips cleanly without CUDA, rejects bad options in one line, and its code path
runs end to end on the CPU (``smoke=true``). The GPU figures themselves are never produced in CI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kvcompress
from kvcompress.bench import gpu, gpu_parts

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "paper_tables" / "gpu.md"
MUST_PASS = ("full", "snapkv", "quant")
DEFAULTS = OmegaConf.load(ROOT / "configs" / "bench" / "gpu.yaml")


def _fingerprint(path: Path) -> tuple[str, int] | None:
    return (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) if path.exists() else None


def test_skips_without_cuda_and_leaves_the_table_alone() -> None:
    before = _fingerprint(STUB)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    proc = subprocess.run([sys.executable, "-m", "kvcompress.bench", "gpu"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcompress.bench gpu: skipped — CUDA is not available")
    assert "nothing was measured" in lines[0] and "paper_tables/gpu.md was not changed" in lines[0]
    assert _fingerprint(STUB) == before


def test_skip_in_process(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    assert gpu.main([f"out={out}"]) == 0
    assert "skipped — CUDA is not available" in capsys.readouterr().out
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["context=0"], "error: context=0 is invalid; valid: an integer >= 1"),
    (["layers=two"], "error: layers=two is invalid; valid: an integer >= 1"),
    (["methods=[full,nope]"], "error: methods: unknown method 'nope'; valid choices: "),
    (["parts=[decode,x]"], "error: parts: unknown part 'x'; valid choices: "),
    (["ratio=0"], "error: ratio=0 is invalid; valid: a kept fraction in (0, 1]"),
    (["frobnicate=1"], "error: unknown option 'frobnicate'; valid choices: "),
    (["--frobnicate"], "error: unknown flag '--frobnicate'; valid choices: "),
    (["smoke=yes"], "error: smoke=yes is invalid; valid: true or false"),
    (["smoke=true", "out=paper_tables/gpu.md"], "error: out=paper_tables/gpu.md with smoke=true is invalid"),
])
def test_bad_option_is_one_error_line(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert gpu.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_bench_main_dispatches_gpu(capsys) -> None:
    from kvcompress.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main(["gpu", "steps=0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: steps=0 is invalid; valid: an integer >= 1"


def test_smoke_run_names_every_method(tmp_path, capsys) -> None:
    before = _fingerprint(STUB)
    out = tmp_path / "gpu.md"
    start = time.perf_counter()
    status = gpu.main(["smoke=true", f"out={out}"])
    wall = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert status in (0, 1)  # 1: some method FAILED (recorded in the table, the run went on)
    assert wall < 120, f"smoke run took {wall:.0f} s (target: well under 60 s on 2 cores)"
    assert gpu.SMOKE_BANNER in printed
    text = out.read_text()
    assert "CPU SMOKE RUN" in text and "NOT GPU figures" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["complete"] and data["header"]["smoke"] and data["header"]["gpu"] is None
    assert [r["architecture"] for r in data["equivalence"]] == ["llama", "qwen2"]
    rows = {r["method"]: r for r in data["methods"]}
    registered = kvcompress.available_methods()
    assert set(rows) == {"dynamic", *registered}
    section_b = text.split("## b.")[1].split("## c.")[0]
    for name in registered:
        row = next(line for line in section_b.splitlines() if line.startswith(f"| {name} |"))
        if rows[name]["status"] == "FAILED":
            assert "FAILED" in row
        else:
            assert rows[name]["kept_bytes"] > 0 and rows[name]["decode_ms_mean"] > 0 and "FAILED" not in row
    failed = {n: r.get("error") for n, r in rows.items() if r["status"] == "FAILED"}
    assert not failed.keys() & {"dynamic", *MUST_PASS}, failed
    assert all(r["passed"] for r in data["equivalence"]), data["equivalence"]
    assert rows["full"]["kept_bytes"] == rows["full"]["dense_bytes"]
    assert rows["snapkv"]["kept_bytes"] < 0.25 * rows["snapkv"]["dense_bytes"]
    for context in data["settings"]["decode_contexts"]:
        block = data["decode"][str(context)]["rows"]
        assert list(block) == ["dynamic", *DEFAULTS.decode_methods] == ["dynamic", *data["settings"]["decode_methods"]]
        assert all(block[m]["status"] == "ok" for m in ("dynamic", *MUST_PASS))
    prefill = data["prefill"]["rows"]
    assert set(prefill) == {"dynamic", *registered}
    assert all(prefill[m]["status"] == "ok" and prefill[m]["vs_dynamic"]["n"] == 1 for m in MUST_PASS)
    assert _fingerprint(STUB) == before


def test_a_raising_method_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    real = gpu.make_cache

    def make_cache(model, variant, ratio):
        if variant == "knorm":
            raise RuntimeError("boom\nsecond line")
        return real(model, variant, ratio)

    for module in (gpu, gpu_parts):  # gpu: the warm-up before part b; gpu_parts: parts b-d
        monkeypatch.setattr(module, "make_cache", make_cache)
    out = tmp_path / "gpu.md"
    assert gpu.main(["smoke=true", f"out={out}", "methods=[knorm,full]", "parts=[methods,prefill]"]) == 1
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert rows["knorm"]["status"] == "FAILED" and rows["knorm"]["failed_in"] == "cache"
    assert rows["knorm"]["error"].startswith("RuntimeError: boom (") and "second line" not in rows["knorm"]["error"]
    assert rows["full"]["status"] == "ok"  # the run went on after the failure
    assert data["prefill"]["rows"]["knorm"]["error"].startswith("see b (cache)")
    assert "| knorm | FAILED: `cache: RuntimeError: boom" in out.read_text()


def test_an_abort_keeps_what_was_measured(tmp_path, monkeypatch) -> None:
    def build_model(config, device, seed, sharpen=1.0):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "build_model", build_model)
    out = tmp_path / "gpu.md"
    assert gpu.main(["smoke=true", f"out={out}", "parts=[methods]"]) == 1
    data = json.loads(out.with_suffix(".json").read_text())
    assert not data["complete"] and data["aborted"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "**INCOMPLETE**" in out.read_text()
