"""Per-sample predictions: every run writes ``<results>.predictions.jsonl`` beside its results file (prompt id,
prediction, reference, score, kept fractions), rows report the kept fraction right after the prefill, and
``python -m kvcompress.tables errors`` reads the sidecar back into an error-analysis table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from kvcompress.results import predictions_path, read_predictions
from kvcompress.run import run_config
from kvcompress.tables import write_table

NEEDLE = ["model=testbed", "eval=needle", "eval.lengths=[512,1024]", "eval.depths=[0.0,0.5,1.0]",
          "print_summary=false"]


def _cfg(*overrides: str):
    with initialize_config_module(config_module="kvcompress.configs", version_base=None):
        return compose(config_name="config", overrides=[*NEEDLE, *overrides])


@pytest.fixture(scope="module")
def snapkv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    results = tmp_path_factory.mktemp("pred") / "runs.jsonl"
    return run_config(_cfg("method=snapkv", "ratio=0.25", f"results={results}")), results


def test_kept_fraction_right_after_prefill_is_the_ratio(snapkv_run: tuple[dict, Path]) -> None:
    row, _ = snapkv_run
    # after the prefill snapkv holds round(0.25 · S) of S tokens per KV head (+ a few index bytes); decoding then
    # appends the generated tokens to every head, so the fraction after generation is higher
    assert row["memory"]["kept_fraction_prefill"] == pytest.approx(0.25, abs=0.01)
    assert row["memory"]["kept_fraction"] > row["memory"]["kept_fraction_prefill"] + 0.01
    for sample in row["samples"]:
        assert sample["kept_fraction_prefill"] == pytest.approx(0.25, abs=0.01)


def test_the_sidecar_holds_one_record_per_sample(snapkv_run: tuple[dict, Path]) -> None:
    row, results = snapkv_run
    sidecar = predictions_path(results)
    assert sidecar == results.with_name("runs.predictions.jsonl")
    records = read_predictions(sidecar)
    assert [r["id"] for r in records] == list(range(len(row["samples"]))) == [s["id"] for s in row["samples"]]
    for record, sample in zip(records, row["samples"]):
        assert record["config_key"] == row["config_key"] and record["method"] == "snapkv" and record["ratio"] == 0.25
        assert record["metric"] == "exact_match" and record["score"] == sample["exact_match"]
        assert record["prediction"] == sample["prediction"] and record["reference"] == sample["meta"]["answer"]
        assert record["meta"]["length"] in (512, 1024)


def test_errors_table_reads_the_sidecar_worst_first(snapkv_run: tuple[dict, Path], tmp_path: Path) -> None:
    _, results = snapkv_run
    sidecar = tmp_path / "copy.predictions.jsonl"
    records = read_predictions(predictions_path(results))
    records[3] = {**records[3], "score": 0.0, "prediction": "the wrong | answer"}  # one failure
    sidecar.write_text("".join(json.dumps(r) + "\n" for r in records) + "null\n", encoding="utf-8")
    (path,) = write_table("errors", sidecar, tmp_path)  # the `null` line is skipped with a warning
    text = path.read_text()
    summary, worst = text.split("## The ")
    assert "| snapkv | ratio=0.25 | testbed | needle | exact_match | 6 | 0.833 | 1 | 0.25" in summary
    first = worst.splitlines()[4]
    assert f"| {records[3]['id']} |" in first and "the wrong \\| answer" in first and "| 0.000 |" in first
    # the results file itself names its sidecar
    (again,) = write_table("errors", results, tmp_path / "from_results")
    assert "| 6 | 1.000 | 0 |" in again.read_text()

