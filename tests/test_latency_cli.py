"""kvcompress.latency CLI, the paper-table generator and the results-row block."""

from __future__ import annotations

import json

import pytest

from kvcompress.latency import latency_block
from kvcompress.latency.__main__ import main
from kvcompress.latency.tables import comparison_table, render_latex, render_markdown


def test_cli_prints_table(capsys) -> None:
    assert main(["model=yi-34b-200k", "context=50000", "hardware=a100-80gb", "convention=paper"]) == 0
    out = capsys.readouterr().out
    assert "11.444" in out and "9.844" in out and "14.344" in out


def test_cli_tp_sweep_rows(capsys) -> None:
    assert main(["sweep=tp", "context=50K"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines[2:]] == ["1", "2", "4", "8"]


@pytest.mark.parametrize("argv, message", [
    (["hardware=tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["context=0"], "context=0"),
    (["tp=3"], "tp=3"),
    (["bogus=1"], "unknown option 'bogus'"),
])
def test_cli_bad_inputs(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


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
