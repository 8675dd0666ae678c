"""kvcompress.latency CLI, the paper-table generator and the results-row block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcompress.latency import latency_block
from kvcompress.latency.__main__ import main
from kvcompress.latency.fu2024 import CONTEXTS, TP_DEGREES, comparison_table, render_latex, render_markdown, tp_table

PAPER_TABLES = Path(__file__).resolve().parents[1] / "paper_tables"


def test_cli_prints_table(capsys) -> None:
    assert main(["model=yi-34b-200k", "context=50000", "hardware=a100-80gb", "convention=paper"]) == 0
    out = capsys.readouterr().out
    assert "11.444" in out and "9.844" in out and "14.344" in out


def test_cli_tp_sweep_rows(capsys) -> None:
    assert main(["sweep=tp", "context=50K"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines[2:6]] == ["1", "2", "4", "8"]
    # Yi-34B-200K at 50K on one A100 with 0.9 of HBM and the reserve: 0.65 users, "does not fit" instead of tok/s
    assert lines[2].split()[-1] == "fit" and "does not fit" in lines[2]
    assert lines[6].startswith("50,000 tokens, tp=1: does not fit: 1 user needs 12.3 GB of KV, 8.1 GB left")


def test_cli_does_not_fit_instead_of_throughput(capsys) -> None:
    assert main(["model=llama-3.1-70b", "context=4K"]) == 0
    out = capsys.readouterr().out
    assert "throughput (tok/s)  does not fit" in out
    assert "fits  baseline: does not fit: weights 141.1 GB" in out


def test_cli_json_format(capsys) -> None:
    assert main(["model=llama-3.1-8b", "context=[4K,32K]", "token_fraction=0.1", "kv_dtype=fp8", "format=json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in rows] == [4000, 32000]
    r = rows[1]
    assert r["ratio"]["concurrency"] == pytest.approx(10.0) and r["serving"]["kv_dtype"] == "fp8"
    assert r["fits"] is True and r["baseline"]["kv_bytes"] == 32_000 * 65_536
    assert {"prefill_flops", "weight_bytes", "kv_budget_bytes", "tp_comm_s", "fit"} <= set(r)


def test_cli_serving_options(capsys) -> None:
    assert main(["model=llama-3.1-8b", "context=32K", "memory_utilization=1", "activation_reserve=0",
                 "format=json"]) == 0
    assert round(json.loads(capsys.readouterr().out)[0]["users_fit"], 2) == 16.52
    assert main(["model=llama-3.1-70b", "hardware=h100-sxm", "tp=8", "weight_dtype=fp8", "prefix_tokens=2000",
                 "tp_communication=false", "format=json"]) == 0
    r = json.loads(capsys.readouterr().out)[0]
    assert r["serving"]["flops_format"] == "fp8" and r["serving"]["prefix_tokens"] == 2000 and r["tp_comm_s"] == 0


@pytest.mark.parametrize("argv, message", [
    (["hardware=tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["context=0"], "context=0"),
    (["tp=3"], "tp=3"),
    (["bogus=1"], "unknown option 'bogus'"),
    (["context=300K"], "exceeds yi-34b-200k's limit of 200,000 positions"),
    (["model=llama-9"], "unknown model (preset name, or a directory with config.json) 'llama-9'; valid choices:"),
    (["memory_utilization=0"], "memory_utilization=0 is invalid; valid: a number in (0, 1]"),
    (["weight_dtype=int3"], "unknown dtype 'int3'"),
    (["format=yaml"], "unknown format 'yaml'; valid choices: json, table"),
    (["key_bits=0"], "key_bits=0 is invalid; valid: null or a number in (0, 64]"),
    (["token_fraction=0"], "token_fraction=0 is invalid; valid: null or a number in (0, 1]"),
    (["prefix_tokens=60000"], "prefix_tokens=60000 exceeds the context of 50000 tokens"),
])
def test_cli_bad_inputs(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_latency_check_table_is_regenerated_byte_identically(tmp_path: Path) -> None:
    from kvcompress.tables import write_table

    assert write_table("latency_check", out=tmp_path) == [tmp_path / "latency_check.md"]
    assert (tmp_path / "latency_check.md").read_bytes() == (PAPER_TABLES / "latency_check.md").read_bytes(), (
        "paper_tables/latency_check.md is stale: run `python -m kvcompress.tables latency_check`")
    text = (tmp_path / "latency_check.md").read_text()
    assert "Largest |Δ|" in text and "## Where published analysers disagree, and why" in text


def test_committed_paper_tables_are_regenerated_byte_identically(tmp_path: Path, capsys) -> None:
    assert main(["table", f"out={tmp_path}"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "fu2024.md"), str(tmp_path / "fu2024.tex")]
    for name in ("fu2024.md", "fu2024.tex"):
        assert (tmp_path / name).read_bytes() == (PAPER_TABLES / name).read_bytes(), (
            f"paper_tables/{name} is stale: run `python -m kvcompress.latency table`")


def test_tp_table_covers_every_context_and_gpu_count() -> None:
    t = tp_table()
    assert [(row[0], row[1]) for row in t.rows] == [(f"{n:,}", str(g)) for n in CONTEXTS for g in TP_DEGREES]
    assert {"4,000", "50,000"} <= {row[0] for row in t.rows}
    # ~100 users at 4K on 2 GPUs (Fu 2024 via the digest), and time divides by N
    row = {(r[0], r[1]): r for r in t.rows}
    assert row[("4,000", "2")][3] == "100"
    assert float(row[("50,000", "1")][4]) / float(row[("50,000", "4")][4]) == pytest.approx(4, rel=0.01)


def test_comparison_table_statuses() -> None:
    t = comparison_table()
    status = {row[0]: row[4] for row in t.rows}
    assert status["decode 250 tokens, 50K (s)"] == "reproduced"
    assert status["prefill, 50K (s)"].startswith("within")
    assert "not reproduced" in status["concurrency, 4K, 1 GPU"]
    assert t.notes  # every non-reproduced row says why
    assert "| reproduced |" in render_markdown([t]) and r"\begin{tabular}" in render_latex([t])


def test_latency_block_evaluated_and_deployment() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100)
    report = {"kept_tokens": [[50.0, 50.0], [50.0, 50.0]], "context_tokens": 100, "dtype_bytes": 4}
    block = json.loads(json.dumps(latency_block(cfg, report)))
    ev, dep = block["evaluated"], block["deployment"]
    assert ev["label"] == "evaluated" and dep["label"] == "deployment"
    assert ev["ratio"]["kv_bytes"] == pytest.approx(0.5) and dep["ratio"]["kv_bytes"] == pytest.approx(0.5)
    assert dep["model"] == "yi-34b-200k" and dep["context"] == 50_000
    assert dep["ratio"]["concurrency"] == pytest.approx(2.0, rel=1e-3)
    # the run's fp32 weights and cache for the evaluated model; the target's bf16 for the deployment
    assert ev["serving"]["weight_dtype"] == ev["serving"]["kv_dtype"] == "float32"
    assert dep["serving"]["weight_dtype"] == dep["serving"]["kv_dtype"] == "bfloat16"
    assert dep["fixed_size"] == {"windows": [], "budget": None, "residual": None}


def test_latency_block_options_and_fixed_parts() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100)
    report = {"kept_tokens": [[1000.0, 36.0], [1000.0, 36.0]], "context_tokens": 1000, "dtype_bytes": 2,
              "fixed_size": {"windows": [{"method": "heads", "sink": 4, "recent": 32}], "budget": None,
                             "residual": None}}
    block = latency_block(cfg, report, target={"model": "llama-3.1-8b", "context": 32_000, "kv_dtype": "fp8",
                                               "prefix_tokens": 1000, "tp": 2},
                          serving={"memory_utilization": 0.8, "activation_reserve": 1e9, "tp_communication": False})
    dep = block["deployment"]
    assert dep["kept_fractions"]["bytes"] == pytest.approx(0.5 + 0.5 * 36 / 32_000)  # the windows stay 36 tokens
    assert dep["serving"]["kv_dtype"] == "fp8" and dep["serving"]["prefix_tokens"] == 1000
    assert dep["serving"]["memory_utilization"] == 0.8 and dep["serving"]["activation_reserve_bytes"] == 1e9
    assert dep["tp"] == 2 and dep["tp_comm_s"] == 0 and dep["fixed_size"]["windows"][0]["recent"] == 32
    with pytest.raises(ValueError, match="unknown latency deployment option 'ctx'"):
        latency_block(cfg, report, target={"ctx": 1})
    with pytest.raises(ValueError, match="unknown latency serving option 'utilization'"):
        latency_block(cfg, report, serving={"utilization": 1})


@pytest.mark.parametrize("latency, message", [
    ({"convention": "fu"}, "unknown latency.convention 'fu'"),
    ({"serving": {"memory_utilization": 2}}, "latency.serving: memory_utilization=2 is invalid"),
    ({"deployment": {"context": 300_000}}, "latency.deployment: context of 300,250 tokens (prompt + output) exceeds"),
    ({"deployment": {"tp": 3}}, "latency.deployment: tp=3 does not fit yi-34b-200k"),
    ({"deployment": {"kv_dtype": "int3"}}, "latency.deployment: unknown dtype 'int3'"),
    ({"deployment": {"model": "llama-9"}}, "latency.deployment: unknown model"),
])
def test_run_latency_config_is_checked_before_the_run(latency, message) -> None:
    from kvcompress.latency import check_latency_config

    check_latency_config({})  # the defaults are valid
    with pytest.raises(ValueError) as err:
        check_latency_config(latency)
    assert message in str(err.value) and "\n" not in str(err.value)
