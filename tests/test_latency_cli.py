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
