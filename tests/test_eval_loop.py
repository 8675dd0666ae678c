"""The one evaluation loop (kvcompress.eval.loop): exact generation length, the question-agnostic split through the
library's append_uncompressed, the memory report instead of a smuggled cache, per-sample records."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress.eval import loop, needle
from kvcompress.eval.loop import Sample, _state_diff, evaluate, run_sample
from kvcompress.tables.common import sample_state


@pytest.fixture(scope="module")
def testbed():
    from kvcompress.zoo import testbed_path
    from kvcompress.zoo.testbed import load

    return load(testbed_path())


def test_needle_samples_generate_the_answer_sentence_plus_slack(testbed) -> None:
    model, tok = testbed
    (s,) = needle.make_needle_samples(tok, [256], [0.5], seed=0)
    lead_in = s.prompt.rsplit("? ", 1)[-1].strip()  # the question's last sentence, which the answer completes
    sentence = len(tok(f" {lead_in} {s.answer}.", add_special_tokens=False)["input_ids"])
    assert s.new_tokens == sentence + needle.ANSWER_SLACK > len(tok(" " + s.answer, add_special_tokens=False)["input_ids"])
    sample = needle.NeedleTask({"lengths": [256], "depths": [0.5]}, 0, tok).samples()[0]
    assert sample.new_tokens == s.new_tokens and sample.prompt == s.prompt
    outcome, _ = run_sample(model, sample, lambda: kvcompress.compress(model, "full"), tokenizer=tok)
    assert len(outcome.tokens) == sample.new_tokens  # exactly new_tokens: no "- 1" anywhere
    assert needle.score_exact_match(outcome.text, s.answer) == 1.0
    fixed = needle.NeedleTask({"lengths": [256], "depths": [0.5], "new_tokens": 5}, 0, tok).samples()[0]
    assert len(run_sample(model, fixed, lambda: None, tokenizer=tok)[0].tokens) == 5


def test_question_agnostic_split_uses_append_uncompressed(testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcompress.methods.token import scoring

    model, tok = testbed
    seen = []
    real = scoring.append_uncompressed

    def spy(model, cache, input_ids, **kwargs):
        seen.append((cache.get_seq_length(), input_ids[0].tolist()))
        return real(model, cache, input_ids, **kwargs)

    monkeypatch.setattr(scoring, "append_uncompressed", spy)
    task = needle.NeedleTask({"lengths": [256], "depths": [0.0], "query_aware": False}, 0, tok)
    (sample,) = task.samples()
    ids = tok(sample.prompt)["input_ids"]
    offsets = tok(sample.prompt, return_offsets_mapping=True)["offset_mapping"]
    split = next(i for i, (a, b) in enumerate(offsets) if b > a and a >= sample.question_start)
    result = evaluate(model, task, lambda: kvcompress.compress(model, "streaming", ratio=0.25), tokenizer=tok)
    assert seen == [(split, ids[split:-1])]  # context prefilled (compressed) first, then the question but its last token
    assert result.accuracy["query_aware"] is False and result.samples[0]["fell_back"] is False
    # the question is not compressed: the cache holds the compressed context plus every question and answer token
    kept = result.memory["kept_tokens"][1][0]
    compressed = kvcompress.compress(model, "streaming", ratio=0.25)
    with torch.no_grad():
        model(torch.tensor([ids[:split]]), **kvcompress.compat.cache_arg(compressed))
    assert kept == compressed.kept_tokens()[1][0] + (len(ids) - split) + sample.new_tokens - 1
    # no split point: the sample falls back to query-aware and says so
    no_split = Sample(prompt=sample.prompt, new_tokens=2)
    outcome, _ = run_sample(model, no_split, lambda: kvcompress.compress(model, "full"), tokenizer=tok, query_aware=False)
    assert outcome.fell_back and len(seen) == 1


def test_evaluate_returns_the_memory_report_not_the_cache(testbed) -> None:
    model, tok = testbed
    task = needle.NeedleTask({"lengths": [256], "depths": [0.0, 1.0]}, 0, tok)
    result = evaluate(model, task, lambda: kvcompress.compress(model, "layers", ratio=0.5, diagnostics=True),
                      tokenizer=tok)
    assert "_cache" not in result.accuracy and result.accuracy["samples"] == 2
    assert 0 < result.memory["kept_bytes"] < result.memory["dense_bytes"]
    assert result.memory["pipeline"] and result.memory["prefill_saving"] == "memory-only"
    assert "layers" in result.method_state and len(result.samples) == len(result.seconds) == 2
    for i, record in enumerate(result.samples):
        assert {"meta", "prediction", "exact_match", "rouge1_recall", "kept_fraction", "kept_bytes"} <= set(record)
        assert record["meta"]["length"] == 256 and "kept_layers" in sample_state({"method_state": result.method_state,
                                                                                  "samples": result.samples}, i)["layers"]
    assert "method_state" not in result.samples[0]  # the first sample's state is the row's


def test_state_diff_and_merge() -> None:
    base = {"layers": {"kept_layers": [[1]], "prefill_saving": "memory-only"}, "other": [1]}
    state = {"layers": {"kept_layers": [[0]], "prefill_saving": "memory-only"}, "other": [1]}
    diff = _state_diff(state, base)
    assert diff == {"layers": {"kept_layers": [[0]]}}
    assert sample_state({"method_state": base, "samples": [{}, {"method_state": diff}]}, 1) == state


def test_loop_is_the_only_generation_loop_of_the_evaluations() -> None:
    """needle, RULER, LongBench and fidelity are tasks on the loop, the testbed check and ``answer`` go through it,
    and the per-axis needle benchmarks are sweeps over ``python -m kvcompress.run`` (configs/sweeps/)."""
    import inspect
    from pathlib import Path

    from kvcompress.eval import fidelity, longbench, ruler
    from kvcompress.zoo import testbed

    for module in (needle, ruler, longbench, fidelity, testbed):
        source = inspect.getsource(module)
        assert ".generate(" not in source and "cache_arg" not in source and "shard(" not in source, module.__name__
    for module in (needle, ruler, longbench, fidelity):
        assert issubclass(next(v for k, v in vars(module).items() if k.endswith("Task") and k != "Task"), loop.Task)
    root = Path(__file__).resolve().parents[1]
    assert not list((root / "scripts").glob("*_needle.py"))  # the per-axis needle scripts are gone
    assert {p.stem for p in (root / "configs" / "sweeps").glob("*.yaml")} >= {"testbed", "heads", "layers", "hidden"}
