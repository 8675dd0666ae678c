"""RULER-style suite: deterministic generation, token-count sizing, metrics, an end-to-end run on the testbed."""

from __future__ import annotations

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.eval import ruler
from kvcompress.eval.ruler import TASKS, make_ruler_samples, string_match_all, string_match_part
from kvcompress.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_every_task_is_sized_by_token_count(tok):
    samples = make_ruler_samples(tok, list(TASKS), [512, 1024], seed=3)
    assert [s.task for s in samples] == [t for t in TASKS for _ in (512, 1024)]
    for s in samples:
        total = s.num_tokens + s.max_new_tokens
        assert s.num_tokens == len(tok(s.prompt)["input_ids"])
        # fits the target and falls short by less than a few haystack units (a sentence is < 60 tokens)
        assert s.context_length - 80 <= total <= s.context_length, (s.task, total)
        assert s.max_new_tokens == TASKS[s.task].max_new_tokens and s.units > 0
        assert s.outputs and all(o for o in s.outputs)
        assert s.prompt[s.question_start :].startswith(("What are all", "Question:"))
    by = {(s.task, s.context_length): s for s in samples}
    assert by[("niah_single_2", 1024)].units > by[("niah_single_2", 512)].units


def test_niah_structure(tok):
    (s,) = make_ruler_samples(tok, ["niah_multikey_1"], [1024])
    keys, (key,) = s.meta["keys"], s.meta["queries"]
    assert len(keys) == 4 and key == keys[0] and len(s.outputs) == 1
    assert f"One of the special magic numbers for {key} is: {s.outputs[0]}." in s.prompt
    assert s.prompt.endswith(f"The special magic numbers for {key} mentioned in the provided text are")
    for k in keys:  # each key: its needle, plus the question for the asked one
        assert s.prompt.count(k) == (3 if k == key else 1)
    (v,) = make_ruler_samples(tok, ["niah_multivalue"], [1024])
    assert len(v.outputs) == 4 and all(f"is: {x}." in v.prompt for x in v.outputs)
    (q,) = make_ruler_samples(tok, ["niah_multiquery"], [1024])
    assert len(q.outputs) == 4 and ", and " in q.prompt.splitlines()[-1]
    (u,) = make_ruler_samples(tok, ["niah_multikey_3"], [512])
    assert len(u.outputs[0]) == 36 and u.prompt.count("One of the special magic uuids") == u.units + 1
    (n,) = make_ruler_samples(tok, ["niah_single_1"], [512], answer_prefix="lead_in")
    assert n.prompt.endswith(f"One of the special magic numbers for {n.meta['keys'][0]} is")
    assert f"is {n.outputs[0]}." in n.prompt
    # keys are built from words the tokenizer knows (no <unk> in a words-and-numbers niah prompt)
    assert tok.unk_token_id not in tok(n.prompt)["input_ids"]


def test_vt_cwe_fwe_references(tok):
    vt, cwe, fwe = make_ruler_samples(tok, ["vt", "cwe", "fwe"], [1024], seed=1)
    assert len(vt.outputs) == 5 and f"VAR {vt.outputs[0]} = {vt.meta['value']}." in vt.prompt
    assert all(f"VAR {b} = VAR {a}." in vt.prompt for a, b in zip(vt.outputs, vt.outputs[1:]))
    assert vt.prompt.index(vt.outputs[0] + " =") < vt.prompt.index(vt.outputs[-1] + " =")
    words = cwe.prompt.splitlines()[1].split()[1::2]  # "1. w 2. w ..." -> the words
    counts = {w: words.count(w) for w in set(words)}
    assert len(cwe.outputs) == 10 and cwe.meta["freq_cw"] == 15
    assert min(counts[w] for w in cwe.outputs) > max(c for w, c in counts.items() if w not in cwe.outputs)
    fw = fwe.prompt.splitlines()[1].split()
    ranked = sorted({w for w in fw if w != "..."}, key=lambda w: -fw.count(w))
    assert ranked[:3] == fwe.outputs and fw.count(fwe.outputs[2]) > fw.count(ranked[3])


def test_deterministic_given_seed(tok):
    a = make_ruler_samples(tok, ["niah_single_2", "cwe"], [512], seed=7, num_samples=2)
    b = make_ruler_samples(tok, ["niah_single_2", "cwe"], [512], seed=7, num_samples=2)
    c = make_ruler_samples(tok, ["niah_single_2", "cwe"], [512], seed=8, num_samples=2)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt  # sample index matters


def test_metrics():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC, def"]
    refs = [["123", "456"], ["789"], ["abc", "xyz"]]
    assert string_match_all(preds, refs) == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert string_match_all([], []) == 0.0


def test_bad_input_is_one_line(tok):
    with pytest.raises(KVCompressError, match="unknown ruler task .niah_nope.; valid choices: cwe, fwe, niah_multi"):
        make_ruler_samples(tok, ["niah_nope"], [512])
    with pytest.raises(KVCompressError, match="answer_prefix"):
        make_ruler_samples(tok, ["vt"], [512], answer_prefix="nope")
    with pytest.raises(KVCompressError, match="unknown ruler task 'x'"):
        ruler.validate({"tasks": "niah_single_1,x"})
    with pytest.raises(KVCompressError, match="no tasks"):
        ruler.validate({"tasks": []})
    assert ruler.validate({}) == list(TASKS) and ruler.validate({"tasks": "vt, cwe"}) == ["vt", "cwe"]
    with pytest.raises(ValueError, match="too small"):
        make_ruler_samples(tok, ["niah_single_2"], [150])


def test_run_on_testbed():
    """The constructed testbed copies what followed a repeated phrase: with the needle's lead-in as the answer
    prefix it retrieves niah_single_1; with RULER's own prefix ("... are") it cannot; vt needs reasoning it lacks."""
    import kvcompress
    from kvcompress.zoo import testbed_path
    from kvcompress.zoo.testbed import load

    model, tokenizer = load(testbed_path())
    full = lambda: kvcompress.compress(model, "full")  # noqa: E731
    cfg = {"tasks": ["niah_single_1", "vt"], "lengths": [384], "samples": 1, "answer_prefix": "lead_in"}
    res = ruler.run(model, full, cfg, seed=0, tokenizer=tokenizer)
    assert res["niah_single_1"] == 100.0 and res["niah_single_1@384"] == 100.0 and res["vt"] == 0.0
    assert res["average"] == 50.0 and res["average@384"] == 50.0 and res["samples"] == 2
    assert "_cache" not in res
    cfg = {"tasks": "niah_single_1", "lengths": [384], "new_tokens": 8, "query_aware": False}
    res = ruler.run(model, full, cfg, seed=0, tokenizer=tokenizer)
    assert res["niah_single_1"] == 0.0 and res["query_aware"] is False and res["answer_prefix"] == "ruler"


def test_byte_level_bpe_tokenizer():
    """Any HF tokenizer works: with a byte-level BPE (no <unk>), fwe uses RULER's random coded words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvcompress.eval import haystack

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eos|>"]
    )
    bpe.train_from_iterator([haystack.corpus_text("pydoc")[:100_000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>")
    samples = make_ruler_samples(tok, ["niah_single_3", "vt", "cwe", "fwe"], [1024])
    for s in samples:
        assert 1024 - 80 <= s.num_tokens + s.max_new_tokens <= 1024
    fwe = samples[-1]
    assert fwe.meta["words"] == "coded" and all(len(w) == 6 and w.isalpha() for w in fwe.outputs)
