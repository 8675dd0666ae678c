"""LongBench v1: metrics equal lm-eval's port on a table of pairs; prompts, truncation, chat template, errors;
the made-up fixture in tests/data/longbench runs end to end through a compressed cache on the testbed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.eval import longbench as LB
from kvcompress.eval import longbench_metrics as M

FIXTURE = Path(__file__).parent / "data" / "longbench"

# (prediction, gold answer) pairs: punctuation, articles, case, empty strings, partial overlap, repeats, unicode.
EN_PAIRS = [
    ("Port Alder", "Port Alder"),
    ("  The city of Port Alder.", "port alder"),
    ("an apple, a pear and the plum!", "Apple pear plum"),
    ("", "Port Alder"),
    ("Port Alder", ""),
    ("", ""),
    ("1874 1874 bridge", "1874"),
    ("It was finished in 1874, I think.", "in 1874"),
    ("no overlap here", "something else"),
    ("The Blue Lantern Museum opened in 1931 in Port Alder", "Blue Lantern Museum"),
    ("yes", "no"),
    ("unanswerable", "unanswerable"),
    ("café naïve résumé", "cafe naive resume"),
    ("The cat sat on the mat.\nThe dog ran.", "the cat sat on the mat"),
    ("a a a the the", "a"),
    ("Summary: the meeting decided to ship the release on Monday after testing.",
     "The team agreed to release on Monday once testing is done."),
    ("!!!", "..."),
    ("one two three four five", "five four three two one"),
]  # fmt: skip
ZH_PAIRS = [
    ("北京是中国的首都。", "北京"),
    ("答案是：上海", "上海"),
    ("", "上海"),
    ("会议决定下周一发布新版本。", "团队同意在下周一发布新版本"),
    ("我不知道", "北京"),
    ("北京，北京！", "北京"),
]
COUNT_PAIRS = [("2", "2"), ("There are 3 unique paragraphs, not 2.", "3"), ("none", "2"), ("22 2 2", "2"), ("", "1")]
RETRIEVAL_PAIRS = [
    ("Paragraph 12", "Paragraph 12"),
    ("The answer is Paragraph 3 or 30", "Paragraph 3"),
    ("Paragraph 1, Paragraph 1", "Paragraph 1"),
    ("no number", "Paragraph 5"),
    ("7", "Paragraph 7"),
]
RETRIEVAL_ZH_PAIRS = [("段落12", "段落12"), ("答案是段落3和段落30", "段落3"), ("无", "段落5"), ("5", "段落5")]
CODE_PAIRS = [
    ("    return x + 1\n", "    return x + 1"),
    ("```python\n# comment\nreturn y\n", "return y"),
    ("\n\n// js comment\nlet a = 1;", "let a = 1;"),
    ("", "x = 1"),
    ("#only comments\n# here", "x = 1"),
    ("foo(bar)\nbaz()", "foo(bar, qux)"),
]
CLASSES = ["Date", "City", "Individual", "Number of something", "Distance, linear measure", "Speed", "Other number"]
CLASS_PAIRS = [
    ("Date", "Date"),
    ("City", "Date"),
    ("Date or City", "Date"),
    ("Number of something", "Number of something"),
    ("Other number", "Other number"),
    ("Distance, linear measure and Speed", "Distance, linear measure"),
    ("nothing", "City"),
    ("Individual Individual", "Individual"),
]
# a class list where remove-while-iterating matters (consecutive substrings of the gold)
QUIRK_CLASSES = ["A", "AB", "ABC", "ABCD", "B"]
QUIRK_PAIRS = [("ABCD", "ABCD"), ("ABC", "ABC"), ("A B", "B"), ("ABCD B", "ABCD")]


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("lm_eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lm_eval.tasks.longbench.metrics as lm_metrics
    return lm_metrics


def _table(lm):
    """(our name, our fn, lm-eval fn, pairs, extra kwargs) for every metric."""
    return [
        ("qa_f1", M.qa_f1, lm.qa_f1_score, EN_PAIRS, {}),
        ("qa_f1_zh", M.qa_f1_zh, lm.qa_f1_zh_score, ZH_PAIRS + EN_PAIRS[:4], {}),
        ("rouge", M.rouge, lm.rouge_score, EN_PAIRS, {}),
        ("rouge_zh", M.rouge_zh, lm.rouge_zh_score, ZH_PAIRS, {}),
        ("count", M.count, lm.count_score, COUNT_PAIRS, {}),
        ("retrieval", M.retrieval, lm.retrieval_score, RETRIEVAL_PAIRS, {}),
        ("retrieval_zh", M.retrieval_zh, lm.retrieval_zh_score, RETRIEVAL_ZH_PAIRS, {}),
        ("code_sim", M.code_sim, lm.code_sim_score, CODE_PAIRS, {}),
        ("classification", M.classification, lm.classification_score, CLASS_PAIRS, {"all_classes": CLASSES}),
        ("classification", M.classification, lm.classification_score, QUIRK_PAIRS, {"all_classes": QUIRK_CLASSES}),
    ]


def test_metrics_equal_lm_eval_on_table(lm):
    checked = 0
    for name, ours, theirs, pairs, kw in _table(lm):
        for pred, gold in pairs:
            a, b = ours(pred, gold, **kw), theirs(pred, gold, **kw)
            assert a == pytest.approx(b, abs=1e-12), (name, pred, gold, a, b)
            checked += 1
    assert checked > 70
    assert set(M.METRICS) == {name for name, *_ in _table(lm)}


def test_classification_keeps_the_official_iteration_quirk():
    # a plain filter would drop A, AB, ABC and B and score 1.0; the official loop skips AB and B: 1/2
    assert M.classification("ABCD", "ABCD", all_classes=QUIRK_CLASSES) == 0.5


def test_sample_scores_equal_lm_eval_wrappers(lm):
    """Max over gold answers (and the stripped prediction lm-eval passes) agree with lm-eval's per-doc wrappers."""
    wrappers = {
        "qa_f1": lm.get_qa_f1_score, "qa_f1_zh": lm.get_qa_f1_zh_score, "rouge": lm.get_rouge_score,
        "rouge_zh": lm.get_rouge_zh_score, "count": lm.get_count_score, "retrieval": lm.get_retrieval_score,
        "retrieval_zh": lm.get_retrieval_zh_score, "code_sim": lm.get_code_sim_score,
        "classification": lm.get_classification_score,
    }  # fmt: skip
    docs = [
        ("qa_f1", " The city of Port Alder ", ["Alder", "Port Alder"]),
        ("qa_f1_zh", "答案是上海", ["北京", "上海"]),
        ("rouge", "ship on Monday", ["release Monday", "ship it on Monday"]),
        ("rouge_zh", "下周一发布", ["周一发布", "下周一发布新版本"]),
        ("count", "2 or 3", ["3"]),
        ("retrieval", "Paragraph 4", ["Paragraph 4"]),
        ("retrieval_zh", "段落4", ["段落4"]),
        ("code_sim", "x = 1\ny = 2", ["x = 1", "y = 2"]),
        ("classification", "Date", ["Date"]),
    ]
    for metric, pred, answers in docs:
        doc = {"answers": answers, "all_classes": CLASSES}
        theirs = next(iter(wrappers[metric](doc, [pred]).values()))
        ours = M.score_sample(metric, pred if metric == "code_sim" else pred.strip(), answers, CLASSES)
        assert ours == pytest.approx(theirs, abs=1e-12), (metric, pred)


def test_first_line_scoring():
    assert M.score_sample("qa_f1", "\n\nParis\nand more text", ["Paris"], first_line_only=True) == 1.0
    assert M.score_sample("qa_f1", "\n\nParis\nand more text", ["Paris"]) < 1.0
    assert set(M.FIRST_LINE_TASKS) == {"trec", "triviaqa", "samsum", "lsht"}


def test_protocol_tables():
    assert len(LB.TASKS) == 21 and len(LB.ENGLISH_TASKS) == 16
    assert set(LB.PROMPTS) == set(LB.MAX_NEW_TOKENS) == set(LB.METRIC)
    assert all(m in M.METRICS for m in LB.METRIC.values())
    assert all("{context}" in p for p in LB.PROMPTS.values())
    assert LB.PROMPTS["narrativeqa"].count("asconcisely") == 2  # the official typo, kept for comparability
    assert LB.MAX_NEW_TOKENS["gov_report"] == 512 and LB.MAX_NEW_TOKENS["hotpotqa"] == 32
    assert set(LB.NO_CHAT_TEMPLATE) == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}


def test_fixture_is_official_layout():
    fields = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    for path in FIXTURE.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert set(row) == fields and row["dataset"] == path.stem and isinstance(row["answers"], list)


# -- prompts ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    import os

    os.environ.setdefault("KVCOMPRESS_CACHE", str(tmp_path_factory.mktemp("kvc_cache")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcompress.zoo import testbed_path

    path = testbed_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_prompt_boundary_and_middle_truncation(testbed):
    _, tok = testbed
    row = LB.load_task("hotpotqa", FIXTURE)[0]
    full = LB.build_prompt("hotpotqa", row, tok, max_len=3500)
    assert not full.truncated and full.boundary is not None
    text = LB.PROMPTS["hotpotqa"].format(**row)
    assert full.input_ids == tok(text)["input_ids"]  # no template: the tokenizer's own BOS, nothing else
    context_part = LB.PROMPTS["hotpotqa"].split("{context}")[0] + row["context"]
    assert full.input_ids[: full.boundary] == tok(context_part)["input_ids"]  # the split is where {context} ends
    n = full.num_tokens_before
    cut = LB.build_prompt("hotpotqa", row, tok, max_len=n - 10)
    body = full.input_ids[1:]
    half = (n - 10) // 2
    assert cut.truncated and cut.input_ids == full.input_ids[:1] + body[:half] + body[-half:]
    assert cut.boundary == full.boundary - (n - 2 * half)  # the question part survives whole in the kept tail
    tiny = LB.build_prompt("hotpotqa", row, tok, max_len=8)
    assert tiny.boundary is None and len(tiny.input_ids) == 1 + 8


def test_chat_template_rule(testbed):
    _, base = testbed
    import copy

    tok = copy.deepcopy(base)
    tok.chat_template = "{% for m in messages %}<s> USER : {{ m['content'] }}{% endfor %} ASSISTANT :"
    row = LB.load_task("hotpotqa", FIXTURE)[0]
    with_tpl = LB.build_prompt("hotpotqa", row, tok)
    rendered = "<s> USER : " + LB.PROMPTS["hotpotqa"].format(**row) + " ASSISTANT :"
    assert with_tpl.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert with_tpl.input_ids.count(tok.bos_token_id) == 1  # the template's BOS only, not a second one
    trec = LB.load_task("trec", FIXTURE)[0]
    assert LB.build_prompt("trec", trec, tok).input_ids == LB.build_prompt("trec", trec, base).input_ids  # no-template task
    assert LB.build_prompt("hotpotqa", row, tok, chat_template=False).input_ids == LB.build_prompt("hotpotqa", row, base).input_ids
    assert LB.use_chat_template("hotpotqa", base, "auto") is False  # the testbed tokenizer has no template
    with pytest.raises(KVCompressError, match="no chat template"):
        LB.use_chat_template("hotpotqa", base, True)
    with pytest.raises(KVCompressError, match="valid choices: auto, false, true"):
        LB.use_chat_template("hotpotqa", base, "maybe")
    # boundary still found under the template: the question-agnostic prefill stops where the context ends
    context_part = "<s> USER : " + LB.PROMPTS["hotpotqa"].split("{context}")[0] + row["context"]
    assert with_tpl.input_ids[: with_tpl.boundary] == tok(context_part, add_special_tokens=False)["input_ids"]


# -- errors -------------------------------------------------------------------------------------------------------
def test_errors_are_one_line_and_list_choices(tmp_path, monkeypatch):
    with pytest.raises(KVCompressError, match=r"unknown LongBench task 'hotpot'; valid choices: 2wikimqa, .*hotpotqa"):
        LB.check_tasks(["hotpot"])
    missing = tmp_path / "nowhere"
    with pytest.raises(KVCompressError, match="is not a directory") as err:
        LB.load_task("hotpotqa", missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KVCompressError, match=r"qasper.jsonl' not found; tasks found in .*: hotpotqa, hotpotqa_e, passage_count, trec$"):
        LB.load_task("qasper", FIXTURE)
    with pytest.raises(KVCompressError, match=r"tasks found in .*: \(none\)"):
        LB.load_task("qasper", tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(KVCompressError, match="hub is offline"):
        LB.load_task("hotpotqa", None)
    assert LB.check_tasks("en") == list(LB.ENGLISH_TASKS) and LB.check_tasks("trec,samsum") == ["trec", "samsum"]
    assert LB.check_tasks(["e", "trec"]) == [*LB.E_TASKS, "trec"] and len(LB.E_TASKS) == 13
    with pytest.raises(KVCompressError, match="unknown LongBench task 'lsht_e'"):  # not a LongBench-E task
        LB.check_tasks(["lsht_e"])
    # validate() catches config errors before a model is loaded
    LB.validate({"tasks": ["hotpotqa", "trec"], "data_dir": str(FIXTURE)})
    with pytest.raises(KVCompressError, match="trec_e.jsonl' not found"):
        LB.validate({"tasks": ["hotpotqa", "trec_e"], "data_dir": str(FIXTURE)})
    with pytest.raises(KVCompressError, match="chat_template"):
        LB.validate({"tasks": ["trec"], "data_dir": str(FIXTURE), "chat_template": "sometimes"})
    with pytest.raises(KVCompressError, match="max_len=1"):
        LB.validate({"tasks": ["trec"], "data_dir": str(FIXTURE), "max_len": 1})
    with pytest.raises(KVCompressError, match="hub is offline"):
        LB.validate({"tasks": ["trec"]})


# -- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query_aware", [True, False])
def test_fixture_end_to_end(testbed, query_aware):
    import kvcompress

    model, tok = testbed
    cfg = {
        "tasks": ["hotpotqa", "trec", "passage_count"], "data_dir": str(FIXTURE), "max_len": 3500,
        "samples": 2, "chat_template": "auto", "query_aware": query_aware, "max_new_tokens": 6,
    }  # fmt: skip
    from kvcompress.eval.loop import evaluate

    result = evaluate(model, LB.task(cfg, tokenizer=tok, model=model), lambda: kvcompress.compress(model, "snapkv", ratio=0.5),
                      tokenizer=tok)
    out = result.accuracy
    assert "_cache" not in out and 0 < result.memory["kept_bytes"] < result.memory["dense_bytes"]
    assert len(result.samples) == 6 and all("score" in s and "prediction" in s for s in result.samples)
    assert out["samples"] == 6 and out["truncated"] == 0 and out["query_aware"] is query_aware
    for t in cfg["tasks"]:
        assert 0.0 <= out[t] <= 100.0
    assert out["average"] == pytest.approx(sum(out[t] for t in cfg["tasks"]) / 3)
    if not query_aware:
        assert out["query_aware_fallbacks"] == 0


def test_full_cache_scores_are_deterministic_and_truncation_counted(testbed):
    import kvcompress

    model, tok = testbed
    cfg = {"tasks": ["passage_count"], "data_dir": str(FIXTURE), "max_len": 16, "max_new_tokens": 4}
    a = LB.run(model, lambda: kvcompress.compress(model, "full"), cfg, tokenizer=tok)
    b = LB.run(model, lambda: kvcompress.compress(model, "full"), cfg, tokenizer=tok)
    assert a["passage_count"] == b["passage_count"] and a["truncated"] == 2


def test_longbench_e_length_buckets(testbed):
    import kvcompress

    model, tok = testbed
    cfg = {"tasks": ["hotpotqa_e"], "data_dir": str(FIXTURE), "max_new_tokens": 4}
    out = LB.run(model, lambda: kvcompress.compress(model, "streaming", ratio=0.5), cfg, tokenizer=tok)
    assert out["samples"] == 3
    assert {k for k in out if "@" in k} == {"hotpotqa_e@0-4k", "hotpotqa_e@4-8k", "hotpotqa_e@8k+"}
    assert out["hotpotqa_e"] == pytest.approx(sum(out[k] for k in out if "@" in k) / 3)  # one row per bucket
    assert [LB.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"]


def test_prompt_boundary_with_byte_level_bpe():
    """Offsets-based split and truncation also hold for a byte-level BPE tokenizer (spaces/newlines inside tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["context"] for f in FIXTURE.glob("*.jsonl") for line in f.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts + list(LB.PROMPTS.values()),
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    row = LB.load_task("hotpotqa", FIXTURE)[0]
    full = LB.build_prompt("hotpotqa", row, tok)
    assert full.input_ids == tok(LB.PROMPTS["hotpotqa"].format(**row))["input_ids"]
    assert tok.decode(full.input_ids[full.boundary :]).startswith("\n\nAnswer the question")
    assert tok.decode(full.input_ids[1 : full.boundary]).endswith("fishing.")
    cut = LB.build_prompt("hotpotqa", row, tok, max_len=full.num_tokens_before - 10)
    assert cut.truncated and len(cut.input_ids) == 1 + 2 * ((full.num_tokens_before - 10) // 2)
    assert cut.input_ids[cut.boundary :] == full.input_ids[full.boundary :]


def test_longbench_through_the_run_entry_point(testbed, tmp_path):
    """``python -m kvcompress.run eval=longbench eval.data_dir=FIXTURE`` appends one row with the memory, latency and
    LongBench accuracy blocks, and its scores are those of the evaluation called directly."""
    import subprocess

    from test_sweeps import CLI_ENV, kvcompress_cli

    import kvcompress
    from kvcompress.results import read_rows

    tasks = ["hotpotqa", "trec", "passage_count"]
    results = tmp_path / "rows.jsonl"
    args = ["model=testbed", "method=snapkv", "ratio=0.5", "eval=longbench", f"eval.data_dir={FIXTURE}",
            f"eval.tasks=[{','.join(tasks)}]", "eval.max_new_tokens=6", "print_summary=false", f"results={results}"]
    proc = subprocess.run(kvcompress_cli(*args, tmp_path=tmp_path), env=CLI_ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = read_rows(results)
    assert row["task"] == "longbench" and row["method"] == "snapkv" and row["config"]["eval"]["data_dir"] == str(FIXTURE)
    assert row["memory"]["kept_fraction"] < 1 and row["latency"]["deployment"]["ratio"]["concurrency"] > 1
    model, tok = testbed
    cfg = {"tasks": tasks, "data_dir": str(FIXTURE), "max_new_tokens": 6}
    direct = LB.run(model, lambda: kvcompress.compress(model, "snapkv", ratio=0.5), cfg, tokenizer=tok)
    fixture_rows = sum(len(LB.load_task(t, FIXTURE)) for t in tasks)
    acc = row["accuracy"]
    assert acc["task"] == "longbench" and acc["samples"] == direct["samples"] == fixture_rows
    assert {t: acc[t] for t in [*tasks, "average"]} == {t: direct[t] for t in [*tasks, "average"]}
