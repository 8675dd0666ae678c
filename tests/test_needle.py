"""Needle / passkey generator and haystack: sizing, placement, distractors, determinism, scoring."""

from __future__ import annotations

import re

import pytest

from kvcompress.eval import haystack
from kvcompress.eval.needle import KEY_WORDS, make_needle_samples, score_contains, score_exact_match
from kvcompress.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_pydoc_haystack_is_prose():
    sents = haystack.pydoc_sentences()
    assert len(sents) > 1000
    assert all(s[-1] in ".!?" and "::=" not in s for s in sents)


def test_noise_and_directory_sources(tmp_path):
    assert haystack.load_sentences("noise")[0] == "The grass is green."
    (tmp_path / "a.txt").write_text("First sentence of the file is here. Second sentence follows right after it.\n")
    assert haystack.load_sentences(tmp_path) == (
        "First sentence of the file is here.",
        "Second sentence follows right after it.",
    )


def test_sizes_and_placement(tok):
    samples = make_needle_samples(tok, [256, 1024, 2048], [0.0, 0.25, 0.5, 0.75, 1.0], seed=0)
    assert len(samples) == 15
    for s in samples:
        assert s.context_length - 120 <= s.num_tokens <= s.context_length
        assert s.num_tokens == len(tok(s.prompt)["input_ids"])
        a, b = s.needle_char_span
        assert s.prompt[a:b] == s.needle == f"The special magic number for {s.key} is {s.answer}."
        assert s.prompt.count(s.needle) == 1
        # the needle starts a sentence (sentence boundary) and its token span decodes to it
        assert a == 0 or s.prompt[a - 1] == " "
        ids = tok(s.prompt)["input_ids"]
        assert tok.decode(ids[slice(*s.needle_token_span)]).strip() == s.needle
        assert tok.decode(ids[slice(*s.value_token_span)]).strip() == s.answer
        assert s.prompt.rstrip().endswith(f"The special magic number for {s.key} is")
        assert len(s.distractor_keys) == 3 and s.key not in s.distractor_keys
        assert len(set(s.distractor_values + [s.answer])) == 4
        groups = [{g for g in re.findall(r"\d{1,3}", v) if len(g) == 3} for v in [s.answer, *s.distractor_values]]
        assert all(not (groups[i] & groups[j]) for i in range(4) for j in range(i + 1, 4))
        body = s.prompt
        for k in [s.key, *s.distractor_keys]:  # keys appear only in their needle (and the question)
            assert len(re.findall(rf"\b{k}\b", body, flags=re.I)) == (3 if k == s.key else 1)
        assert s.key in KEY_WORDS
    for length in (1024, 2048):
        d = [s.actual_depth for s in samples if s.context_length == length]
        assert d == sorted(d) and d[0] < 0.1 and d[-1] > 0.9


def test_deterministic_given_seed(tok):
    a = make_needle_samples(tok, [512], [0.3, 0.6], seed=11)
    b = make_needle_samples(tok, [512], [0.3, 0.6], seed=11)
    c = make_needle_samples(tok, [512], [0.3, 0.6], seed=12)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]


def test_templates(tok):
    (p,) = make_needle_samples(tok, [400], [0.5], template="passkey")
    assert "The grass is green." in p.prompt and p.prompt.endswith("The pass key is")
    assert 1 <= int(p.answer) <= 50000 and p.distractor_keys == []
    (k,) = make_needle_samples(tok, [400], [0.5], template="kamradt")
    assert k.answer.startswith("eat a sandwich")
    with pytest.raises(ValueError):
        make_needle_samples(tok, [400], [0.5], template="passkey", num_distractors=2)
    with pytest.raises(ValueError):
        make_needle_samples(tok, [400], [1.5])
    with pytest.raises(ValueError):
        make_needle_samples(tok, [400], [0.5], template="nope")


def test_num_samples_and_value_digits(tok):
    samples = make_needle_samples(tok, [300], [0.5], num_samples=4, value_digits=3, num_distractors=1)
    assert len(samples) == 4 and len({s.answer for s in samples}) == 4
    assert all(len(s.answer) == 3 and len(s.distractor_values) == 1 for s in samples)


def test_scoring():
    """Exact match as common harnesses check it: the (normalised) value occurs in the answer."""
    from kvcompress.eval.needle import score_prefix_match

    for pred in (" 4827193.", "4827193 is the number", ": 4827193", "**4827193**", "the number is 4827193",
                 "The special magic number for apple is 4827193.", "It is\n4827193"):
        assert score_exact_match(pred, "4827193") == 1.0, pred
    assert score_exact_match("482 7193", "4827193") == 0.0 and score_exact_match("", "4827193") == 0.0
    assert score_exact_match("Eat a  sandwich", "eat a sandwich") == 1.0
    assert score_exact_match("anything", "") == 0.0
    assert score_contains("the number is 4827193", "4827193") == 1.0
    # the stricter prefix rule (head detection's probes)
    assert score_prefix_match(" 4827193.", "4827193") == 1.0 and score_prefix_match("48271935", "4827193") == 0.0
    assert score_prefix_match("the number is 4827193", "4827193") == 0.0


def test_generation_is_long_enough_for_the_templates_answer(tok):
    """new_tokens covers the template's whole answer sentence restated, plus 2: a model that repeats the lead-in
    still reaches the value."""
    from kvcompress.eval.needle import ANSWER_SLACK

    for template in ("magic_number", "passkey", "kamradt"):
        (s,) = make_needle_samples(tok, [400], [0.5], template=template)
        lead_in = s.prompt.rsplit("? ", 1)[-1]
        restated = f" {lead_in} {s.answer}."
        assert s.new_tokens == len(tok(restated, add_special_tokens=False)["input_ids"]) + ANSWER_SLACK
        assert s.new_tokens > len(tok(" " + s.answer, add_special_tokens=False)["input_ids"]) + 1
    (m,) = make_needle_samples(tok, [400], [0.5])
    assert m.prompt.endswith(f"The special magic number for {m.key} is") and m.max_new_tokens < m.new_tokens


def test_too_short_context_is_an_error(tok):
    with pytest.raises(ValueError, match="too small"):
        make_needle_samples(tok, [40], [0.5])


def test_rouge1_recall():
    from kvcompress.eval.needle import score_rouge1_recall

    assert score_rouge1_recall(" 4827193.", "4827193") == 1.0
    assert score_rouge1_recall("the number is 4827193", "4827193") == 1.0
    assert score_rouge1_recall("48271935", "4827193") == 0.0
    # 4 of the reference's 12 unigrams ("eat", "a", "sandwich", "park"), case and punctuation ignored
    ref = "eat a sandwich and sit in Dolores Park on a sunny day"
    assert score_rouge1_recall("Eat a SANDWICH, then park.", ref) == pytest.approx(4 / 12)
    assert score_rouge1_recall("a a a", "a a b") == pytest.approx(2 / 3)  # clipped counts
    assert score_rouge1_recall("anything", "") == 0.0 and score_rouge1_recall("", ref) == 0.0
    # the stemmer (Retrieval-Head's use_stemmer=True): eating, sandwiches, sitting, days meet eat, sandwich, sit, day
    para = "Eating sandwiches and sitting in Dolores Park on sunny days"
    assert score_rouge1_recall(para, ref, stemmer=False) == pytest.approx(6 / 12)
    assert score_rouge1_recall(para, ref) == pytest.approx(10 / 12)


def test_rouge1_recall_equals_the_retrieval_head_reference():
    """Our ROUGE-1 recall equals rouge_score's RougeScorer(["rouge1"], use_stemmer=True).score(needle, response)
    (the Retrieval-Head reference's call), and use_stemmer=False with stemmer=False."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from kvcompress.eval.needle import KAMRADT_ANSWER, score_rouge1_recall

    responses = [
        "Eating sandwiches and sitting in Dolores Park on sunny days.", "eat a sandwich", "", "The best thing...",
        "It's eating a sandwich & sitting (in) DOLORES park -- on a sunny, sunny day!!", "café naïve 4827193 días",
        "generalization generalizations running runs ran happily happiness", "a a a b",
    ]
    references = [KAMRADT_ANSWER, "4827193", "a b c", "Generalizations run happily", "ß and ǅ letters"]
    for stem in (True, False):
        scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)
        for ref in references:
            for resp in responses:
                expected = scorer.score(ref, resp)["rouge1"].recall
                assert score_rouge1_recall(resp, ref, stemmer=stem) == pytest.approx(expected, abs=1e-12), (ref, resp)


def test_write_heatmap(tmp_path):
    from kvcompress.eval.needle import write_heatmap

    grid = {"256": {"0": 1.0, "0.5": 0.5, "1": 0.0}, "1024": {"0": 0.0, "0.5": 1.0, "1": 1.0}}
    path = write_heatmap(grid, tmp_path / "sub" / "h.png")
    data = (tmp_path / "sub" / "h.png").read_bytes()
    assert path.endswith("h.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_run_reports_rouge_grid_and_heatmap(tmp_path):
    """End to end on the constructed testbed (full cache): exact match and ROUGE-1, the grid in the row, the PNG."""
    import kvcompress
    from kvcompress.eval import needle
    from kvcompress.zoo import testbed_path
    from kvcompress.zoo.testbed import load

    model, tokenizer = load(testbed_path())
    cfg = {"lengths": [160, 256], "depths": [0.0, 1.0], "heatmap": str(tmp_path / "needle.png")}
    res = needle.run(model, lambda: kvcompress.compress(model, "full"), cfg, seed=0, tokenizer=tokenizer)
    assert res["samples"] == 4 and res["exact_match"] == 1.0 and res["rouge1_recall"] == 1.0
    assert "occurs in the prediction" in res["scoring"]["exact_match"]
    assert res["scoring"]["rouge1_recall"].endswith("with the Porter stemmer")
    assert res["rouge1_recall@256"] == 1.0 and res["rouge1_recall@d0"] == 1.0
    assert res["grid"] == {"160": {"0": 1.0, "1": 1.0}, "256": {"0": 1.0, "1": 1.0}}
    assert res["grid_rouge1_recall"]["256"]["1"] == 1.0
    assert res["heatmap"] == str(tmp_path / "needle.png") and (tmp_path / "needle.png").stat().st_size > 1000
    assert "_cache" not in res  # the cache's memory report comes from the loop (kvcompress.eval.loop.evaluate)
