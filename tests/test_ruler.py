"""RULER suite: NVIDIA/RULER's templates byte for byte (the expected strings below are written from RULER's
scripts/data/synthetic/constants.py and its niah / vt / cwe / fwe / qa generators), the singular rewrite,
newline-joined haystacks, the chat-template option, deterministic generation, token-count sizing, metrics, the default
run on the testbed (lead_in template, recorded in the row) and qa on a made-up fixture."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.eval import ruler
from kvcompress.eval.ruler import NOISE, SYNTHETIC_TASKS, TASKS, make_ruler_samples, string_match_all, string_match_part
from kvcompress.zoo.tokenizer import build_tokenizer

QA_DATA = Path(__file__).parent / "data" / "ruler"
NIAH_SINGULAR_INTRO = ("A special magic number is hidden within the following text. Make sure to memorize it. I will "
                       "quiz you about the number afterwards.\n")
NIAH_PLURAL_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
                     "quiz you about the numbers afterwards.\n")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_every_task_is_sized_by_token_count(tok):
    samples = make_ruler_samples(tok, list(SYNTHETIC_TASKS), [768, 1024], seed=3)
    assert [s.task for s in samples] == [t for t in SYNTHETIC_TASKS for _ in (768, 1024)]
    for s in samples:
        total = s.num_tokens + s.max_new_tokens
        assert s.num_tokens == len(tok(s.prompt)["input_ids"])
        # fits the target and falls short by less than a few haystack units (a sentence is < 60 tokens)
        assert s.context_length - 80 <= total <= s.context_length, (s.task, total)
        assert s.max_new_tokens == TASKS[s.task].max_new_tokens and s.units > 0
        assert s.outputs and all(o for o in s.outputs)
        assert s.prompt[s.question_start :].startswith(("What are all", "What is the", "Question:"))
    by = {(s.task, s.context_length): s for s in samples}
    assert by[("niah_single_2", 1024)].num_tokens > by[("niah_single_2", 768)].num_tokens + 200
    with pytest.raises(ValueError, match="too small"):  # a worked example + 10 words x 6 do not fit in 512 tokens
        make_ruler_samples(tok, ["cwe"], [512])


def test_niah_prompts_are_rulers_templates(tok):
    """Template text, the singular rewrite (one value asked), plural otherwise, needles with a colon, newline-joined
    noise / needle haystacks, space-joined essay sentences."""
    (s,) = make_ruler_samples(tok, ["niah_multikey_1"], [1024])
    keys, (key,) = s.meta["keys"], s.meta["queries"]
    assert len(keys) == 4 and key in keys and len(s.outputs) == 1
    assert s.prompt.startswith(NIAH_SINGULAR_INTRO)
    assert s.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? The special "
                             f"magic number for {key} mentioned in the provided text is")
    assert f"One of the special magic numbers for {key} is: {s.outputs[0]}." in s.prompt  # needles keep the plural
    for k in keys:  # each key: its needle, plus the question and the answer prefix for the asked one
        assert s.prompt.count(k) == (3 if k == key else 1)
    context = s.prompt[len(NIAH_SINGULAR_INTRO) : s.question_start - 1]
    assert "\n" not in context and context.count("One of the special magic numbers for ") == 4  # essay: one line
    (v,) = make_ruler_samples(tok, ["niah_multivalue"], [1024])
    (k,) = v.meta["queries"]
    assert len(v.outputs) == 4 and all(f"for {k} is: {x}." in v.prompt for x in v.outputs)
    assert v.prompt.startswith(NIAH_PLURAL_INTRO)
    assert v.prompt.endswith(f"\nWhat are all the special magic numbers for {k} mentioned in the provided text? The "
                             f"special magic numbers for {k} mentioned in the provided text are")
    (q,) = make_ruler_samples(tok, ["niah_multiquery"], [1024])
    a, b, c, d = q.meta["queries"]
    assert len(q.outputs) == 4 and q.prompt.startswith(NIAH_PLURAL_INTRO)
    assert q.prompt.endswith(f"for {a}, {b}, {c}, and {d} mentioned in the provided text are")
    (u,) = make_ruler_samples(tok, ["niah_multikey_3"], [512])
    assert len(u.outputs[0]) == 36 and u.prompt.count("One of the special magic uuids") == u.units + 1
    assert u.prompt.startswith("A special magic uuid is hidden within the following text. Make sure to memorize it. "
                               "I will quiz you about the uuid afterwards.\n")
    lines = u.prompt[: u.question_start - 1].split("\n")[1:]  # needle haystack: one needle per line
    assert len(lines) == u.units + 1 and all(re.fullmatch(r"One of the special magic uuids for [0-9a-f-]{36} is: "
                                                          r"[0-9a-f-]{36}\.", ln) for ln in lines)
    (n,) = make_ruler_samples(tok, ["niah_single_1"], [512])
    lines = n.prompt[: n.question_start - 1].split("\n")[1:]  # noise haystack: RULER's whole 5-sentence line
    assert NOISE == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert lines.count(NOISE) == n.units == len(lines) - 1
    assert f"One of the special magic numbers for {n.meta['keys'][0]} is: {n.outputs[0]}." in lines
    # keys are built from words the tokenizer knows (no <unk> in a words-and-numbers niah prompt)
    assert tok.unk_token_id not in tok(n.prompt)["input_ids"]


def test_singular_rewrite():
    task, prefix = ruler.TEMPLATES["niah"]
    assert ruler.singular(task).format(type_needle_v="number", context="C", query="K") == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
        "the number afterwards.\nC\nWhat is the special magic number for K mentioned in the provided text?")
    assert ruler.singular(prefix).format(type_needle_v="number", query="K") == (
        " The special magic number for K mentioned in the provided text is")
    singular = {t for t, spec in TASKS.items() if spec.kind == "niah" and spec.num_queries * spec.num_values == 1}
    assert singular == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                        "niah_multikey_3"}


def test_lead_in_template(tok):
    """``template=lead_in``: RULER's prompt, needles without the colon, the prompt ending with the needle's lead-in."""
    (n,) = make_ruler_samples(tok, ["niah_single_1"], [512], template="lead_in")
    key = n.meta["keys"][0]
    assert n.prompt.startswith(NIAH_SINGULAR_INTRO) and n.template == "lead_in"
    assert n.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? One of the "
                             f"special magic numbers for {key} is")
    assert f"One of the special magic numbers for {key} is {n.outputs[0]}." in n.prompt and "is: " not in n.prompt
    (old,) = make_ruler_samples(tok, ["niah_single_1"], [512], answer_prefix="lead_in")  # the option's older name
    assert old.prompt == n.prompt


def test_vt_cwe_fwe_prompts_and_references(tok):
    vt, cwe, fwe = make_ruler_samples(tok, ["vt", "cwe", "fwe"], [1024], seed=1)
    value = vt.meta["value"]
    assert len(vt.outputs) == 5 and f"\nVAR {vt.outputs[0]} = {value}\n" in vt.prompt
    assert all(f"\nVAR {b} = VAR {a} \n" in vt.prompt for a, b in zip(vt.outputs, vt.outputs[1:]))  # trailing space
    assert vt.prompt.index(vt.outputs[0] + " =") < vt.prompt.index(vt.outputs[-1] + " =")
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    shot, task = vt.prompt.split("\n\n" + intro)  # one worked example, then the task
    assert shot.startswith(intro) and re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", shot)  # RULER's two spaces
    assert vt.prompt.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                              "Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                              f"are assigned the value {value}, they are: ")
    assert set(task.split("\n")[:-1]) <= {NOISE, *(ln for ln in task.split("\n") if ln.startswith("VAR "))}
    cwe_intro = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                 "ones that appear most often.\n")
    cwe_question = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
                    "appear most often in the list are:")
    assert cwe.prompt.startswith(cwe_intro) and cwe.prompt.endswith(cwe_question) and cwe.prompt.count(cwe_intro) == 2
    shot, listing = cwe.prompt.split(cwe_question + " ")[0], cwe.prompt.split("\n" + cwe_intro)[1]
    assert shot.startswith(cwe_intro) and len(shot.split("\n")) == 2
    words = listing.split("\n")[0].split()[1::2]  # "1. w 2. w ..." -> the words
    counts = {w: words.count(w) for w in set(words)}
    assert len(cwe.outputs) == 10 and (cwe.meta["freq_cw"], cwe.meta["freq_ucw"]) == (6, 1)  # RULER below 4096
    assert {counts[w] for w in cwe.outputs} == {6} and {c for w, c in counts.items() if w not in cwe.outputs} == {1}
    assert fwe.prompt.startswith("Read the following coded text and track the frequency of each coded word. Find the "
                                 "three most frequently appeared coded words. ")
    assert fwe.prompt.endswith("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
                               "three most frequently appeared words in the above coded text? Answer: According to the "
                               "coded text above, the three most frequently appeared words are:")
    fw = fwe.prompt.split("coded words. ", 1)[1].split("\n")[0].split()
    ranked = sorted({w for w in fw if w != "..."}, key=lambda w: -fw.count(w))
    assert ranked[:3] == fwe.outputs and fw.count(fwe.outputs[2]) > fw.count(ranked[3])
    assert fwe.meta["vocab_size"] == (1024 - 50) // 50  # RULER: (length - tokens to generate) // 50
    (big,) = make_ruler_samples(tok, ["cwe"], [4096])
    assert (big.meta["freq_cw"], big.meta["freq_ucw"]) == (30, 3)


def test_deterministic_given_seed(tok):
    a = make_ruler_samples(tok, ["niah_single_2", "cwe"], [768], seed=7, num_samples=2)
    b = make_ruler_samples(tok, ["niah_single_2", "cwe"], [768], seed=7, num_samples=2)
    c = make_ruler_samples(tok, ["niah_single_2", "cwe"], [768], seed=8, num_samples=2)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt  # sample index matters


def test_metrics():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC, def"]
    refs = [["123", "456"], ["789"], ["abc", "xyz"]]
    assert string_match_all(preds, refs) == 50.0
    assert string_match_part(preds, refs) == 66.67  # RULER rounds to 2 decimals
    assert string_match_all([], []) == 0.0
    assert string_match_all(["STRASSE"], [["straße"]]) == 0.0  # lower(), not casefold(), as RULER
    assert string_match_all(["a\tb"], [["a\nb"]]) == 100.0  # control characters become newlines (postprocess_pred)


def test_bad_input_is_one_line(tok):
    with pytest.raises(KVCompressError, match="unknown ruler task .niah_nope.; valid choices: cwe, fwe, niah_multi"):
        make_ruler_samples(tok, ["niah_nope"], [512])
    with pytest.raises(KVCompressError, match="unknown ruler template 'nope'; valid choices: lead_in, ruler"):
        make_ruler_samples(tok, ["vt"], [512], template="nope")
    with pytest.raises(KVCompressError, match="qa_data"):
        ruler.RulerTask({"tasks": ["qa_1"]}, tokenizer=tok)
    with pytest.raises(KVCompressError, match="unknown ruler task 'x'"):
        ruler.validate({"tasks": "niah_single_1,x"})
    with pytest.raises(KVCompressError, match="no tasks"):
        ruler.validate({"tasks": []})
    assert ruler.validate({"tasks": "vt, cwe"}) == ["vt", "cwe"]
    assert ruler.RulerTask({}, tokenizer=tok).tasks == list(SYNTHETIC_TASKS)  # qa only with its data
    assert ruler.RulerTask({"qa_data": str(QA_DATA)}, tokenizer=tok).tasks == list(TASKS)
    with pytest.raises(ValueError, match="too small"):
        make_ruler_samples(tok, ["niah_single_2"], [150])


def test_run_on_testbed():
    """The constructed testbed copies what followed a repeated bigram: with the needle's lead-in as the answer
    prefix it retrieves niah_single_1; with RULER's own prefix ("... is") it cannot; vt needs reasoning it lacks."""
    import kvcompress
    from kvcompress.zoo import testbed_path
    from kvcompress.zoo.testbed import load

    model, tokenizer = load(testbed_path())
    full = lambda: kvcompress.compress(model, "full")  # noqa: E731
    cfg = {"tasks": ["niah_single_1", "vt"], "lengths": [384], "samples": 1, "template": "lead_in"}
    res = ruler.run(model, full, cfg, seed=0, tokenizer=tokenizer)
    assert res["niah_single_1"] == 100.0 and res["niah_single_1@384"] == 100.0 and res["vt"] == 0.0
    assert res["average"] == 50.0 and res["average@384"] == 50.0 and res["samples"] == 2
    assert "_cache" not in res and res["template"] == "lead_in"
    cfg = {"tasks": "niah_single_1", "lengths": [384], "new_tokens": 8, "query_aware": False}
    res = ruler.run(model, full, cfg, seed=0, tokenizer=tokenizer)
    assert res["niah_single_1"] == 0.0 and res["query_aware"] is False and res["template"] == "ruler"


def test_default_run_config_follows_the_models_ruler_profile():
    """``eval=ruler`` takes template and tasks from the model config's ``ruler:`` block when it has one (the
    testbed: lead_in, its 4 answerable niah tasks), RULER's template and the 11 synthetic tasks otherwise; the
    resolved values are what the row's config records."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import kvcompress.run  # noqa: F401  (registers the generated method configs)

    def eval_cfg(*overrides):
        with initialize_config_module(config_module="kvcompress.configs", version_base=None):
            cfg = compose(config_name="config", overrides=["eval=ruler", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)["eval"]

    testbed = eval_cfg()
    assert testbed["template"] == "lead_in" and testbed["chat_template"] is False
    assert testbed["tasks"] == ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2"]
    other = eval_cfg("model=tiny-random")
    assert other["template"] == "ruler" and other["tasks"] == list(SYNTHETIC_TASKS)
    assert eval_cfg("eval.template=ruler")["template"] == "ruler"


@pytest.mark.slow
def test_default_run_passes_on_the_testbed(tmp_path):
    """``python -m kvcompress.run eval=ruler`` (full cache, default model): every niah task >= 90, template recorded."""
    import subprocess

    from test_sweeps import CLI_ENV, kvcompress_cli

    from kvcompress.results import read_rows

    results = tmp_path / "rows.jsonl"
    proc = subprocess.run(kvcompress_cli("eval=ruler", "eval.samples=1", "print_summary=false", f"results={results}",
                                         tmp_path=tmp_path), env=CLI_ENV, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_rows(results)
    acc = row["accuracy"]
    assert row["method"] == "full" and row["model"]["name"] == "testbed"
    assert row["config"]["eval"]["template"] == acc["template"] == "lead_in"
    niah = [t for t in acc["tasks"] if t.startswith("niah")]
    assert len(niah) == 4 and all(acc[t] >= 90.0 for t in niah), {t: acc[t] for t in niah}


def test_chat_template_wraps_the_task_template(tok):
    """``chat_template=true``: the tokenizer's template around RULER's task template, the answer prefix after it
    (RULER's model templates); the sample carries token ids and the question's token index."""
    chat = copy.deepcopy(tok)
    chat.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (plain,) = make_ruler_samples(tok, ["niah_single_2"], [512], seed=4)
    (wrapped,) = make_ruler_samples(chat, ["niah_single_2"], [512], seed=4, chat_template=True)
    key = wrapped.meta["queries"][0]
    assert wrapped.prompt.startswith("[INST] A special magic number is hidden")
    assert wrapped.prompt.endswith(f"mentioned in the provided text? [/INST] The special magic number for {key} "
                                   "mentioned in the provided text is")
    assert wrapped.input_ids == chat(wrapped.prompt, add_special_tokens=False)["input_ids"]
    assert wrapped.num_tokens == len(wrapped.input_ids) and wrapped.num_tokens + 128 <= 512
    assert chat.decode(wrapped.input_ids[wrapped.question_token :]).lstrip().startswith("What is the special magic")
    assert plain.input_ids is None and plain.question_token is None
    task = ruler.RulerTask({"tasks": ["niah_single_2"], "lengths": [512], "chat_template": True}, seed=4, tokenizer=chat)
    (sample,) = task.samples()
    assert sample.input_ids == wrapped.input_ids and sample.question_start == wrapped.question_token
    with pytest.raises(KVCompressError, match="no chat template"):
        make_ruler_samples(tok, ["vt"], [512], chat_template=True)


def test_qa_tasks_on_a_made_up_fixture(tok):
    squad, hotpot = make_ruler_samples(tok, ["qa_1", "qa_2"], [512], qa_data=str(QA_DATA))
    assert squad.outputs == ["1874", "in 1874"] and squad.metric == "part"
    assert squad.prompt.startswith("Answer the question based on the given documents. Only give me the answer and do "
                                   "not output any other words.\n\nThe following are given documents.\n\nDocument 1:\n")
    assert squad.prompt.endswith("\n\nAnswer the question based on the given documents. Only give me the answer and do "
                                 "not output any other words.\n\nQuestion: When was the lighthouse of Port Alder "
                                 "built? Answer:")
    assert "Its lighthouse was built in 1874." in squad.prompt  # the gold paragraph is always there
    docs = re.findall(r"Document (\d+):\n", squad.prompt)
    assert docs == [str(i + 1) for i in range(len(docs))] and squad.units == len(docs) - 1
    assert hotpot.outputs == ["Port Alder"]
    assert "Document 1:\n" in hotpot.prompt and "Port Alder\nPort Alder is a fishing town on the northern coast. Its " \
        "lighthouse was built in 1874." in hotpot.prompt  # title, newline, the sentences joined
    qas, docs = ruler.load_qa(str(QA_DATA), "squad")
    assert len(qas) == 3 and len(docs) == 4  # the unanswerable question is left out
    assert string_match_part(["It was 1874."], [squad.outputs]) == 100.0


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
    samples = make_ruler_samples(tok, ["niah_single_3", "vt", "cwe", "fwe"], [2048])
    for s in samples:
        assert 2048 - 80 <= s.num_tokens + s.max_new_tokens <= 2048
    fwe = samples[-1]
    assert fwe.meta["words"] == "coded" and all(len(w) == 6 and w.isalpha() for w in fwe.outputs)
