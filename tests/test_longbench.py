"""LongBench v1: metrics against expected scores derived by reading the official code (tests/data/longbench/
official_scores.json, blank- and comment-line code_sim cases included) and, for ``protocol="lm-eval"``, equal to
lm-eval's port on a table of pairs; prompts, truncation (BOS counted), max_len from the position limit, stop ids
added to the model's own, both averages, chat template, errors; the made-up fixture in tests/data/longbench runs end
to end through a compressed cache on the testbed."""

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
        ("code_sim", M.code_sim_lm_eval, lm.code_sim_score, CODE_PAIRS, {}),
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


OFFICIAL = json.loads((FIXTURE / "official_scores.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("protocol,key", [("official", "official"), ("lm-eval", "lm_eval")])
def test_sample_scores_equal_the_official_code_expectations(protocol, key):
    """Every case of the fixture (worked out by reading THUDM's eval.py / metrics.py and lm-eval's port): the
    sample score of each protocol. The rouge package's F has a 1e-8 epsilon in its denominator (1 - 5e-9)."""
    assert any(c["metric"] == "code_sim" and c["official"] != c["lm_eval"] for c in OFFICIAL)
    for c in OFFICIAL:
        got = M.score_sample(c["metric"], c["prediction"], c["answers"], c.get("all_classes"),
                             first_line_only=c["task"] in M.FIRST_LINE_TASKS, protocol=protocol)
        assert got == pytest.approx(c[key], abs=1e-8), (protocol, c)


def test_code_sim_blank_and_comment_lines():
    # official: the first line (after leading newlines) without ` # //, blank or not
    assert M.code_sim("# comment\n\nx = 1", "x = 1") == 0.0
    assert M.code_sim("\n\n# comment\nx = 1", "x = 1") == 1.0
    assert M.code_sim_lm_eval("# comment\n\nx = 1", "x = 1") == 1.0
    assert M.score_sample("code_sim", "# c\n\nx = 1", ["x = 1"]) == 0.0
    assert M.score_sample("code_sim", "# c\n\nx = 1", ["x = 1"], protocol="lm-eval") == 1.0
    with pytest.raises(KVCompressError, match="unknown LongBench protocol 'lm_eval'; valid choices: lm-eval, official"):
        M.score_sample("qa_f1", "x", ["x"], protocol="lm_eval")


def test_lm_eval_protocol_equals_the_port_on_fixture_cases(lm):
    """The fixture's lm-eval expectations are what the installed port computes (after its until=["\\n"] cut)."""
    wrappers = {"qa_f1": lm.get_qa_f1_score, "rouge": lm.get_rouge_score, "count": lm.get_count_score,
                "retrieval": lm.get_retrieval_score, "retrieval_zh": lm.get_retrieval_zh_score,
                "code_sim": lm.get_code_sim_score, "classification": lm.get_classification_score}
    for c in OFFICIAL:
        generated = c["prediction"].split("\n")[0] if c["task"] in LB.LM_EVAL_NEWLINE_TASKS else c["prediction"]
        doc = {"answers": c["answers"], "all_classes": c.get("all_classes")}
        theirs = next(iter(wrappers[c["metric"]](doc, [generated]).values()))
        assert theirs == pytest.approx(c["lm_eval"], abs=1e-8), c


def test_lm_eval_prompts_equal_the_ports_yaml(lm):
    import yaml

    root = Path(lm.__file__).parent

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    differ = []
    for task in LB.TASKS:
        spec = yaml.load((root / f"{task}.yaml").read_text(encoding="utf-8"), Loader=Loader)
        text = spec["doc_to_text"].replace("{{context}}", "{context}").replace("{{question}}", "{input}")
        assert LB.lm_eval_prompt(task) == text, task
        assert spec["generation_kwargs"]["max_gen_toks"] == LB.MAX_NEW_TOKENS[task]
        assert (spec["generation_kwargs"]["until"] == ["\n"]) == (task in LB.LM_EVAL_NEWLINE_TASKS), task
        differ += [task] if text != LB.PROMPTS[task] else []
    assert sorted(differ) == ["lcc", "passage_count", "passage_retrieval_en", "repobench-p", "samsum", "triviaqa"]


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
    docs += [("code_sim", "\n# c\n\n  y = 2", ["y = 2"]), ("qa_f1", "\n Paris \n", ["Paris"])]
    for metric, pred, answers in docs:
        doc = {"answers": answers, "all_classes": CLASSES}
        theirs = next(iter(wrappers[metric](doc, [pred]).values()))
        ours = M.score_sample(metric, pred, answers, CLASSES, protocol="lm-eval")
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
    assert set(LB.CATEGORY) == set(LB.TASKS) and set(LB.CATEGORY.values()) == set(LB.CATEGORIES)
    assert [t for t in LB.ENGLISH_TASKS if LB.CATEGORY[t] == "code"] == ["lcc", "repobench-p"]


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
    assert n == len(full.input_ids)  # counted as pred.py counts: the tokenizer's BOS included
    assert not LB.build_prompt("hotpotqa", row, tok, max_len=n).truncated
    cut = LB.build_prompt("hotpotqa", row, tok, max_len=n - 10)
    body = full.input_ids[1:]
    half = (n - 10) // 2
    # pred.py keeps tokenized[:half] + tokenized[-half:]; the first half holds the BOS
    assert cut.truncated and cut.input_ids == full.input_ids[:half] + full.input_ids[-half:]
    assert cut.input_ids == full.input_ids[:1] + body[: half - 1] + body[-half:] and len(cut.input_ids) == 2 * half
    assert cut.boundary == full.boundary - (n - 2 * half)  # the question part survives whole in the kept tail
    tiny = LB.build_prompt("hotpotqa", row, tok, max_len=8)
    assert tiny.boundary is None and len(tiny.input_ids) == 8 and tiny.input_ids[0] == tok.bos_token_id
    # lm-eval's harness truncates on the left: the last max_len tokens, the BOS gone
    left = LB.build_prompt("hotpotqa", row, tok, max_len=n - 10, protocol="lm-eval")
    assert left.truncated and left.input_ids == full.input_ids[10:] and left.boundary == full.boundary - 10


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
        assert 0.0 <= out[t] <= 100.0 and out[t] == round(out[t], 2)  # eval.py: round(100 * mean, 2)
    assert out["average_by_task"] == pytest.approx(sum(out[t] for t in cfg["tasks"]) / 3)
    # multi-doc QA (hotpotqa), few-shot (trec), synthetic (passage_count): one task each
    assert {k: v for k, v in out.items() if k.startswith("category.")} == {
        "category.multi_doc_qa": out["hotpotqa"], "category.few_shot": out["trec"],
        "category.synthetic": out["passage_count"]}
    assert out["average_by_category"] == pytest.approx(out["average_by_task"]) and "average" not in out
    assert out["protocol"] == "official" and out["max_len"] == 3500
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
    assert cut.truncated and len(cut.input_ids) == 2 * ((full.num_tokens_before - 10) // 2)  # BOS counted
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
    keys = [*tasks, "average_by_task", "average_by_category"]
    assert {t: acc[t] for t in keys} == {t: direct[t] for t in keys}
    # max_len: null (the default) = the testbed's 32768 positions minus each task's generation length
    assert row["config"]["eval"]["max_len"] is None and acc["max_len"] == 32768 - 6


def test_averages_per_task_and_per_category():
    task = LB.LongBenchTask({"tasks": ["hotpotqa", "hotpotqa_e", "trec"], "data_dir": str(FIXTURE)},
                            tokenizer=object.__new__(type("T", (), {})))
    records = [{"meta": {"task": t, "bucket": "0-4k", "truncated": False}, "score": s}
               for t, s in (("hotpotqa", 1.0), ("hotpotqa", 0.0), ("hotpotqa_e", 1.0), ("trec", 0.2))]
    out = task.summarise([], records)
    assert (out["hotpotqa"], out["hotpotqa_e"], out["trec"]) == (50.0, 100.0, 20.0)
    assert out["category.multi_doc_qa"] == 75.0 and out["category.few_shot"] == 20.0
    assert out["average_by_task"] == pytest.approx(170 / 3) and out["average_by_category"] == pytest.approx(47.5)


def test_max_len_from_the_position_limit(testbed):
    import copy

    model, base = testbed
    task = LB.LongBenchTask({"tasks": ["hotpotqa"], "data_dir": str(FIXTURE)}, tokenizer=base, model=model)
    assert task.task_max_len("hotpotqa", 32) == 32768 - 32 and task.task_max_len("gov_report", 512) == 32768 - 512
    tok = copy.deepcopy(base)
    tok.chat_template = "{% for m in messages %}<s> USER : {{ m['content'] }}{% endfor %} ASSISTANT :"
    overhead = LB.chat_overhead("hotpotqa", tok)
    assert overhead == len(tok("<s> USER :  ASSISTANT :", add_special_tokens=False)["input_ids"]) > 0
    chat = LB.LongBenchTask({"tasks": ["hotpotqa"], "data_dir": str(FIXTURE)}, tokenizer=tok, model=model)
    assert chat.task_max_len("hotpotqa", 32) == 32768 - 32 - overhead
    assert chat.task_max_len("trec", 64) == 32768 - 64  # no template on trec
    fixed = LB.LongBenchTask({"tasks": ["hotpotqa"], "data_dir": str(FIXTURE), "max_len": 3500}, tokenizer=base, model=model)
    assert fixed.task_max_len("hotpotqa", 32) == 3500
    assert LB.LongBenchTask({"tasks": ["hotpotqa"], "data_dir": str(FIXTURE)}, tokenizer=base).task_max_len("hotpotqa", 32) \
        == LB.DEFAULT_MAX_LEN  # no model, no limit: the official 4K value


def test_stop_ids_are_added_to_the_models_own(testbed):
    """A generation config with two stop ids (an instruct model's EOS + end-of-turn): both stay in force, the
    tokenizer's EOS and (samsum) the newline are added; generation really ends at the model's second stop id."""
    import copy

    import kvcompress
    from kvcompress.eval.loop import evaluate

    base_model, tok = testbed
    model = copy.deepcopy(base_model)
    cfg = {"tasks": ["passage_count"], "data_dir": str(FIXTURE), "samples": 1, "max_new_tokens": 8}
    full = lambda: kvcompress.compress(model, "full")  # noqa: E731
    free = evaluate(model, LB.task(cfg, tokenizer=tok, model=model), full, tokenizer=tok).samples[0]["prediction"]
    ids = tok(free, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3
    stop = ids[1]  # the second generated token becomes the model's own second stop id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    assert LB.stop_token_ids("passage_count", tok, model) == [tok.eos_token_id, stop]
    assert LB.stop_token_ids("samsum", tok, model) == [tok.eos_token_id, stop, newline]
    assert LB.stop_token_ids("trec", tok, model) == [tok.eos_token_id, stop]
    assert LB.stop_token_ids("trec", tok, model, protocol="lm-eval") == [tok.eos_token_id, stop, newline]
    (sample,) = LB.task(cfg, tokenizer=tok, model=model).samples()
    assert sample.stop == [tok.eos_token_id, stop]
    stopped = evaluate(model, LB.task(cfg, tokenizer=tok, model=model), full, tokenizer=tok).samples[0]["prediction"]
    assert tok(stopped, add_special_tokens=False)["input_ids"] == ids[:2]  # ended at the model's own stop id
