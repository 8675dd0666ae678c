"""LongBench (v1) through a compressed cache: official prompts, generation lengths, truncation and metrics.

Protocol data below follow THUDM/LongBench (``LongBench/config/dataset2prompt.json``, ``dataset2maxlen.json``,
``LongBench/pred.py``, ``LongBench/eval.py``; Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for Long
Context Understanding"). The prompt wording is benchmark protocol data and is kept verbatim, including the
narrativeqa typo "asconcisely", so scores stay comparable with published ones.

Pipeline per sample (:class:`LongBenchTask` on :mod:`kvcompress.eval.loop`):

1. **Data**: ``<data_dir>/<task>.jsonl`` in the official layout (one JSON object per line with ``input``,
   ``context``, ``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``; the files of the
   official ``data.zip``), read with ``datasets.load_dataset("json", ...)``. With ``data_dir: null`` the hub dataset
   ``hub_id`` (default ``THUDM/LongBench``, one config per task) is used, which needs the network: with
   ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` that is a one-line error instead of a long timeout. (Recent
   ``datasets`` releases no longer run loading scripts; if the THUDM copy needs one, ``hub_id:
   Xnhyacinth/LongBench`` is the parquet re-host lm-eval uses; its ``question`` field is mapped to ``input``.)
   LongBench-E tasks are named ``<task>_e`` (files ``<task>_e.jsonl``); ``tasks: e`` selects all 13.
2. **Prompt**: ``PROMPTS[task].format(context=..., input=...)``.
3. **Middle truncation**: when the prompt, counted as ``pred.py`` counts it — the tokenizer's encoding of the
   prompt text **with its special tokens** (the BOS token counts; the chat template's tokens do not, the official
   script applies the template after truncating) — has more than ``max_len`` tokens, the first and the last
   ``max_len // 2`` of those tokens are kept (so the head keeps ``max_len // 2 − 1`` prompt tokens after a BOS).
   ``max_len`` defaults to the model's position limit (``max_position_embeddings``) minus the task's generation
   length (minus the chat template's own tokens where the template is applied), so prompt + answer always fit; the
   official ``model2maxlen.json`` sets it per model (3500 for 4K chat models, 31500 for 32K ones); set ``max_len``
   to reproduce a published number. Truncation is done on token ids; the official script decodes both halves and
   re-tokenizes the text, which can differ by a token at the seam.
4. **Chat template** (``chat_template``: ``auto`` | ``true`` | ``false``): ``auto`` applies the tokenizer's template
   (one user turn, generation prompt added) unless the task is in :data:`NO_CHAT_TEMPLATE` (trec, triviaqa,
   samsum, lsht, lcc, repobench-p, as in ``pred.py``) or the tokenizer has none; ``true`` requires one;
   ``false`` never applies it. Without a template the tokenizer's own special tokens (BOS) are added.
5. **Greedy generation** of ``MAX_NEW_TOKENS[task]`` tokens (``max_new_tokens`` in the config overrides all
   tasks, for quick checks). Generation stops at the model's own stop ids (``generation_config.eos_token_id``, one
   id or a list: an instruct model's end-of-turn ids stay in force) plus the tokenizer's EOS; samsum also stops at
   the newline token and generates at least one token (``pred.py`` passes ``eos_token_id=[eos, newline]`` and
   ``min_length``; its list *replaces* the model's own, which ends an instruct model's answers only at the
   tokenizer's EOS — kvcompress adds to them instead).
6. **Scoring** (:mod:`kvcompress.eval.longbench_metrics`, ``official`` protocol): the first line only for
   :data:`~kvcompress.eval.longbench_metrics.FIRST_LINE_TASKS`, max over the gold answers, task score =
   ``round(100 × mean, 2)`` as ``eval.py``. Two averages, named: ``average_by_task`` (unweighted mean over the
   tasks run) and ``average_by_category`` (LongBench's README: the mean of the per-category means,
   ``category.<name>``: single-doc QA, multi-doc QA, summarization, few-shot, synthetic, code — over the tasks run;
   the README reports English and Chinese tasks separately, so run ``tasks: en`` for its English average).

``protocol: lm-eval`` reproduces lm-eval's port (``lm_eval/tasks/longbench``) instead: its prompts (triviaqa and
samsum put one newline before ``{input}``, passage_count / passage_retrieval_en end without the trailing space,
lcc / repobench-p without the trailing newline), generation stopped at the first newline for trec, triviaqa,
samsum and lsht (``until: ["\\n"]``; no minimum length), no chat template unless ``chat_template: true``, the
HF harness's **left** truncation (the last ``max_len`` tokens, special tokens included), its scoring (stripped
predictions, the text before the first newline for those four tasks, ``code_sim`` skipping blank lines) and
task scores ``100 × mean`` without rounding.

``query_aware`` (default true): the whole prompt, question included, is prefilled and compressed at once (as the
SnapKV/PyramidKV papers evaluate). With ``false``, the part of the prompt up to the end of ``{context}`` is
prefilled and compressed first; the rest of the template (repeated instruction, question, answer cue, and the chat
template's closing tokens) is then appended uncompressed (the loop's question-agnostic split), so the compressor
cannot see what will be asked. For
tasks without ``{input}`` (summaries, passage_count, lcc) the suffix is only the repeated instruction. If
truncation cut into that suffix (a suffix longer than ``max_len // 2`` tokens), the sample falls back to
query-aware and is counted in ``query_aware_fallbacks``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KVCompressError, unknown_choice
from . import longbench_metrics as M
from .loop import Outcome, Sample, Task, evaluate, option

# -- protocol data (THUDM/LongBench config/dataset2prompt.json) -------------------------------------------------
_PASSAGES_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)
_ANSWER_RULES = (
    'If the question cannot be answered based on the information in the article, write "unanswerable". '
    'If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)

PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. " + _ANSWER_RULES + "\n\nArticle: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a single phrase or sentence "
        "if possible. " + _ANSWER_RULES + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\n"
        "Now, answer the following question based on the above text, only give me the answer and do not output any "
        "other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："
    ),
    "hotpotqa": _PASSAGES_QA,
    "2wikimqa": _PASSAGES_QA,
    "musique": _PASSAGES_QA,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should only "
        "contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
        'Please enter the number of the paragraph that the abstract is from. The answer format must be like '
        '"Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
        '下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: Official maximum generation lengths (``dataset2maxlen.json``).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}  # fmt: skip

#: Metric per task (``eval.py`` ``dataset2metric``); functions in :mod:`kvcompress.eval.longbench_metrics`.
METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge",
    "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1",
    "samsum": "rouge", "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_sim", "repobench-p": "code_sim",
}  # fmt: skip

TASKS: tuple[str, ...] = tuple(PROMPTS)
#: LongBench-E: 13 tasks re-sampled evenly over lengths (``<task>_e.jsonl`` / hub config ``<task>_e``); same
#: prompts and metrics, scores also reported per length bucket (``length`` in words: 0-4k, 4-8k, 8k+).
E_TASKS: tuple[str, ...] = tuple(
    f"{t}_e"
    for t in ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
              "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
)  # fmt: skip
#: The 16 English + code tasks compression papers report.
ENGLISH_TASKS: tuple[str, ...] = tuple(
    t for t in TASKS if t not in ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
)
#: Tasks prompted without the chat template (few-shot and code completion, ``pred.py``).
NO_CHAT_TEMPLATE: tuple[str, ...] = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
#: ``max_len`` when neither the config nor the model (no ``max_position_embeddings``) gives one: the official value
#: for 4K chat models.
DEFAULT_MAX_LEN = 3500
DEFAULT_HUB_ID = "THUDM/LongBench"
#: LongBench's six task categories (the README's leaderboard columns), per task; LongBench-E tasks take their base
#: task's. The English average is over the 16 English + code tasks, the Chinese one over the 5 zh tasks + code.
CATEGORY: dict[str, str] = {
    "narrativeqa": "single_doc_qa", "qasper": "single_doc_qa", "multifieldqa_en": "single_doc_qa",
    "multifieldqa_zh": "single_doc_qa", "hotpotqa": "multi_doc_qa", "2wikimqa": "multi_doc_qa",
    "musique": "multi_doc_qa", "dureader": "multi_doc_qa", "gov_report": "summarization", "qmsum": "summarization",
    "multi_news": "summarization", "vcsum": "summarization", "trec": "few_shot", "triviaqa": "few_shot",
    "samsum": "few_shot", "lsht": "few_shot", "passage_count": "synthetic", "passage_retrieval_en": "synthetic",
    "passage_retrieval_zh": "synthetic", "lcc": "code", "repobench-p": "code",
}  # fmt: skip
CATEGORIES: tuple[str, ...] = ("single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code")
#: Scoring / generation protocols: the official THUDM code, or lm-eval's port (module docstring).
PROTOCOLS: tuple[str, ...] = M.PROTOCOLS
#: Tasks lm-eval's port ends at the first newline (``until: ["\\n"]``).
LM_EVAL_NEWLINE_TASKS: tuple[str, ...] = ("trec", "triviaqa", "samsum", "lsht")


def lm_eval_prompt(task: str) -> str:
    """lm-eval's ``doc_to_text`` of a task (``{input}`` for its ``{{question}}``): the official prompt with the port's
    differences (``tests/test_longbench.py`` checks every task against the installed lm-eval's YAML)."""
    prompt = PROMPTS[base_task(task)]
    name = base_task(task)
    if name in ("triviaqa", "samsum"):
        return prompt.replace("{context}\n\n{input}", "{context}\n{input}")
    if name in ("passage_count", "passage_retrieval_en"):
        return prompt.rstrip(" ")
    if name in ("lcc", "repobench-p"):
        return prompt.removesuffix("\n")
    return prompt


def check_protocol(protocol: Any) -> str:
    value = str(protocol if protocol is not None else "official")
    if value not in PROTOCOLS:
        raise unknown_choice("LongBench protocol", value, PROTOCOLS)
    return value


# -- data -------------------------------------------------------------------------------------------------------
GROUPS: dict[str, tuple[str, ...]] = {"all": TASKS, "en": ENGLISH_TASKS, "e": E_TASKS}


def base_task(task: str) -> str:
    """The LongBench task whose prompt, length and metric a task uses (``hotpotqa_e`` -> ``hotpotqa``)."""
    return task[:-2] if task in E_TASKS else task


def check_tasks(tasks: Sequence[str] | str | None) -> list[str]:
    """Validate task names; ``all`` / ``en`` / ``e`` (also inside a list) expand to every task / the 16 English
    and code tasks / the LongBench-E tasks; None means ``en``."""
    if tasks is None:
        tasks = "en"
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in (str(t) for t in tasks):
        names = GROUPS.get(t, (t,))
        for name in names:
            if name not in PROMPTS and name not in E_TASKS:
                raise unknown_choice("LongBench task", name, (*GROUPS, *TASKS, *E_TASKS))
            if name not in out:
                out.append(name)
    if not out:
        raise KVCompressError(f"no LongBench task given; valid choices: {', '.join((*GROUPS, *TASKS, *E_TASKS))}")
    return out


def validate(cfg: Any) -> None:
    """Check an eval config without loading anything heavy (task names, max_len, chat_template value, data
    files present): a caller can run it before loading the model."""

    def get(key, default):
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
        return default if value is None else value

    tasks = check_tasks(get("tasks", "en"))
    max_len = int(get("max_len", DEFAULT_MAX_LEN))
    if max_len < 2:
        raise KVCompressError(f"max_len={max_len} is invalid; valid: an integer >= 2")
    mode = str(get("chat_template", "auto")).lower()
    if mode not in _CHAT_MODES:
        raise unknown_choice("chat_template", mode, ["auto", "true", "false"])
    data_dir = get("data_dir", None)
    for t in tasks:
        _task_file(t, data_dir) if data_dir is not None else None
    if data_dir is None and _offline():
        _offline_error(str(get("hub_id", DEFAULT_HUB_ID)))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def found_tasks(data_dir: str | Path) -> list[str]:
    """LongBench task files present in ``data_dir`` (``<task>.jsonl``)."""
    return sorted(p.stem for p in Path(data_dir).glob("*.jsonl") if p.stem in PROMPTS or p.stem in E_TASKS)


def _task_file(task: str, data_dir: str | Path) -> Path:
    root = Path(os.path.expanduser(str(data_dir)))
    if not root.is_dir():
        raise KVCompressError(
            f"LongBench data_dir {str(root)!r} is not a directory; valid: a directory of <task>.jsonl files "
            "(the official data.zip layout)"
        )
    path = root / f"{task}.jsonl"
    if not path.is_file():
        listed = ", ".join(found_tasks(root)) or "(none)"
        raise KVCompressError(f"LongBench file {str(path)!r} not found; tasks found in {str(root)!r}: {listed}")
    return path


def _offline_error(hub_id: str) -> None:
    raise KVCompressError(
        f"LongBench data_dir is not set and the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); "
        f"valid: eval.data_dir=<directory with <task>.jsonl files>, or go online to load {hub_id!r}"
    )


def load_task(task: str, data_dir: str | Path | None = None, hub_id: str = DEFAULT_HUB_ID) -> list[dict[str, Any]]:
    """Rows of one task: from ``<data_dir>/<task>.jsonl`` or, with ``data_dir=None`` and the network, the hub."""
    check_tasks([task])
    if data_dir is not None:
        path = _task_file(task, data_dir)
        import datasets

        ds = datasets.load_dataset("json", data_files={"test": str(path)}, split="test")
    else:
        if _offline():
            _offline_error(hub_id)
        import datasets

        ds = datasets.load_dataset(hub_id, task, split="test")
    rows = [dict(r) for r in ds]
    for r in rows:  # re-hosted copies (Xnhyacinth/LongBench) call the question "question"
        if "input" not in r and "question" in r:
            r["input"] = r["question"]
        missing = [k for k in ("context", "input", "answers") if k not in r]
        if missing:
            raise KVCompressError(f"LongBench {task} row lacks field(s) {missing}; valid: the official JSONL layout")
    return rows


# -- prompts ----------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    input_ids: list[int]
    boundary: int | None  # tokens [0, boundary) are the context part (question-agnostic prefill); None: unknown
    truncated: bool
    num_tokens_before: int  # prompt tokens as truncation counts them: the prompt text with the tokenizer's special
                            # tokens (BOS), without the chat template's


def special_token_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer adds before and after a text (``add_special_tokens=True``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return i, len(full) - len(plain) - i
    return 0, max(0, len(full) - len(plain))


def chat_overhead(task: str, tokenizer, chat_template: Any = "auto", protocol: str = "official") -> int:
    """Tokens the chat template adds around a prompt of ``task`` (0 where it is not applied)."""
    if not _uses_chat(task, tokenizer, chat_template, protocol):
        return 0
    head, tail = _chat_wrap(tokenizer)
    return len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])


def _uses_chat(task: str, tokenizer, chat_template: Any, protocol: str) -> bool:
    if protocol == "lm-eval" and str(chat_template).lower() == "auto":
        return False  # lm-eval applies a chat template only when asked (--apply_chat_template)
    return use_chat_template(task, tokenizer, chat_template)


_SENTINEL = "\u2063KVCOMPRESS_PROMPT\u2063"


def _chat_wrap(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user message (generation prompt added)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or rendered.count(_SENTINEL) != 1:
        raise KVCompressError("the tokenizer's chat template does not render a user message verbatim; set chat_template: false")
    head, tail = rendered.split(_SENTINEL)
    return head, tail


_CHAT_MODES = ("auto", "true", "false", "1", "0", "yes", "no", "on", "off", "none")


def use_chat_template(task: str, tokenizer, mode: Any = "auto") -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    mode = str(mode).lower() if mode is not None else "auto"
    task = base_task(task)
    if mode in ("false", "0", "no", "off", "none"):
        return False
    if mode in ("true", "1", "yes", "on"):
        if not has:
            raise KVCompressError("chat_template=true but the tokenizer has no chat template; valid: auto or false")
        return task not in NO_CHAT_TEMPLATE
    if mode != "auto":
        raise unknown_choice("chat_template", mode, ["auto", "true", "false"])
    return has and task not in NO_CHAT_TEMPLATE


def build_prompt(task: str, row: dict[str, Any], tokenizer, max_len: int = DEFAULT_MAX_LEN, chat_template: Any = "auto",
                 protocol: str = "official") -> Prompt:
    """Token ids of one sample's prompt after truncation and the chat template, with the context boundary.

    ``protocol="official"``: middle truncation counting the tokenizer's special tokens (``pred.py``);
    ``"lm-eval"``: lm-eval's prompt, no chat template under ``auto``, left truncation of the whole sequence."""
    protocol = check_protocol(protocol)
    template = PROMPTS[base_task(task)] if protocol == "official" else lm_eval_prompt(task)
    text = template.format(context=row["context"], input=row.get("input") or "")
    # Character where the part after {context} starts (the question-agnostic split).
    prefix = template.split("{context}")[0].format(input=row.get("input") or "")
    split_char = len(prefix) + len(row["context"])
    head, tail = _chat_wrap(tokenizer) if _uses_chat(task, tokenizer, chat_template, protocol) else ("", "")
    full = head + text + tail
    if not getattr(tokenizer, "is_fast", False):
        raise KVCompressError("LongBench prompts need a fast tokenizer (offset mapping); valid: a PreTrainedTokenizerFast")
    enc = tokenizer(full, add_special_tokens=not head and not tail, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lo, hi = len(head), len(head) + len(text)
    lead: list[int] = []
    body: list[int] = []
    trail: list[int] = []
    body_start: list[int] = []  # char start of each body token
    for tok, (a, b) in zip(ids, offsets):
        if (a, b) == (0, 0) and tok in special:  # special tokens the tokenizer adds (BOS before, EOS after)
            (trail if body else lead).append(tok)
        elif a < lo and not body:  # the chat template's opening text
            lead.append(tok)
        elif a >= hi:  # the chat template's closing text
            trail.append(tok)
        else:
            body.append(tok)
            body_start.append(a - lo)
    n_body = len(body)
    boundary_body: int | None = next((i for i, a in enumerate(body_start) if a >= split_char), len(body))
    sp_lead, sp_trail = special_token_counts(tokenizer)
    counted = sp_lead + n_body + sp_trail  # what pred.py counts: tokenizer(prompt) with special tokens
    if protocol == "lm-eval":
        ids = lead + body + trail
        truncated = len(ids) > max_len
        boundary = None if boundary_body is None else len(lead) + boundary_body
        if truncated:  # the HF harness keeps the last max_len tokens (left truncation)
            cut = len(ids) - max_len
            ids = ids[cut:]
            boundary = boundary - cut if boundary is not None and boundary - cut > 0 else None
        return Prompt(ids, boundary, truncated, counted)
    truncated = counted > max_len
    if truncated:
        half = max_len // 2
        keep_head = max(0, half - sp_lead)  # the first half holds the BOS, the last half a trailing EOS (if any)
        keep_tail = max(0, half - sp_trail)
        if boundary_body < n_body - keep_tail:  # the suffix is longer than the kept tail: no clean split
            boundary_body = None
        else:
            boundary_body = keep_head + (boundary_body - (n_body - keep_tail))
        body = body[:keep_head] + (body[n_body - keep_tail :] if keep_tail else [])
    boundary = None if boundary_body is None else len(lead) + boundary_body
    return Prompt(lead + body + trail, boundary, truncated, counted)


def stop_token_ids(task: str, tokenizer, model: Any = None, protocol: str = "official") -> list[int]:
    """Stop ids of a task's generation: the model's own (``generation_config.eos_token_id``, an id or a list), then
    the tokenizer's EOS, then the newline token where the protocol stops at a newline (official: samsum; lm-eval:
    trec, triviaqa, samsum, lsht). Added to the model's own, never replacing them."""
    out: list[int] = []
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for ids in (own, tokenizer.eos_token_id):
        for t in [ids] if isinstance(ids, int) else list(ids or []):
            if int(t) not in out:
                out.append(int(t))
    newline_tasks = ("samsum",) if protocol == "official" else LM_EVAL_NEWLINE_TASKS
    if base_task(task) in newline_tasks:
        nl = tokenizer.encode("\n", add_special_tokens=False)
        if nl and nl[-1] not in out:
            out.append(nl[-1])
    return out


def length_bucket(length: Any) -> str:
    """LongBench-E length bucket of a row (official ``eval.py``: ``length`` in words, < 4000 / < 8000 / more)."""
    n = int(length or 0)
    return "0-4k" if n < 4000 else ("4-8k" if n < 8000 else "8k+")


# -- entry point ------------------------------------------------------------------------------------------------
class LongBenchTask(Task):
    """``eval=longbench`` on the evaluation loop: LongBench task scores (× 100) and both averages.

    ``cfg`` keys: ``tasks`` (list; ``all``, ``en`` or ``e`` for LongBench-E), ``data_dir`` (required offline),
    ``hub_id``, ``max_len`` (null: the model's position limit minus the task's generation length and the chat
    template's tokens; :data:`DEFAULT_MAX_LEN` for a model without a limit), ``samples`` (per task; null = all),
    ``chat_template`` (auto), ``query_aware`` (true), ``max_new_tokens`` (null = official per task), ``protocol``
    (``official`` | ``lm-eval``). Data and prompts are built (and a prompt over the model's position limit rejected)
    before any generation. Sample metadata: ``task``, ``category``, ``bucket`` (length bucket), ``truncated``.

    Accuracy block: ``<task>`` scores, ``category.<name>`` (mean of its tasks), ``average_by_task``,
    ``average_by_category``, ``protocol``, ``max_len`` (the value used; ``{task: value}`` when it differs per task),
    ``samples``, ``truncated`` and, question-agnostic, ``query_aware_fallbacks``; LongBench-E tasks add
    ``<task>@0-4k`` / ``@4-8k`` / ``@8k+`` (buckets with no rows are left out).
    """

    name = "longbench"

    def __init__(self, cfg, tokenizer=None, model=None):
        if tokenizer is None:
            raise KVCompressError("the LongBench evaluation needs the model's tokenizer (this model has none)")
        validate(cfg)
        self.tokenizer, self.model = tokenizer, model
        self.tasks = check_tasks(option(cfg, "tasks", "en"))
        self.data_dir = option(cfg, "data_dir", None)
        self.hub_id = str(option(cfg, "hub_id", DEFAULT_HUB_ID))
        self.max_len_cfg = option(cfg, "max_len", None)
        self.limit = option(cfg, "samples", None)
        self.chat = option(cfg, "chat_template", "auto")
        self.query_aware = bool(option(cfg, "query_aware", True))
        self.fixed_new = option(cfg, "max_new_tokens", None)
        self.protocol = check_protocol(option(cfg, "protocol", "official"))
        config = getattr(model, "config", None)
        self.pos_limit = getattr(config.get_text_config(), "max_position_embeddings", None) if config else None
        self.max_lens: dict[str, int] = {}

    def task_max_len(self, task: str, new_tokens: int) -> int:
        """``max_len`` of a task: the config's, else the position limit minus generation and chat-template tokens."""
        if self.max_len_cfg is not None:
            return int(self.max_len_cfg)
        if self.pos_limit is None:
            return DEFAULT_MAX_LEN
        value = int(self.pos_limit) - new_tokens - chat_overhead(task, self.tokenizer, self.chat, self.protocol)
        if value < 2:
            raise KVCompressError(
                f"LongBench {task}: the model's limit of {self.pos_limit} positions leaves max_len={value} after "
                f"{new_tokens} new tokens; valid: fewer max_new_tokens"
            )
        return value

    def samples(self) -> list[Sample]:
        data = {t: load_task(t, self.data_dir, self.hub_id) for t in self.tasks}  # missing data fails first
        out = []
        for task in self.tasks:
            base = base_task(task)
            new_tokens = int(self.fixed_new) if self.fixed_new else MAX_NEW_TOKENS[base]
            max_len = self.max_lens[task] = self.task_max_len(task, new_tokens)
            stop = stop_token_ids(task, self.tokenizer, self.model, self.protocol)
            for row in data[task][: int(self.limit)] if self.limit else data[task]:
                p = build_prompt(task, row, self.tokenizer, max_len, self.chat, self.protocol)
                if self.pos_limit is not None and len(p.input_ids) + new_tokens > self.pos_limit:
                    raise KVCompressError(
                        f"LongBench {task} prompt of {len(p.input_ids)} tokens (+{new_tokens} new) exceeds the "
                        f"model's limit of {self.pos_limit} positions; valid: a smaller max_len"
                    )
                out.append(Sample(
                    input_ids=p.input_ids, question_start=p.boundary, new_tokens=new_tokens,
                    reference=(list(row["answers"]), row.get("all_classes")), stop=stop or None,
                    min_new_tokens=1 if base == "samsum" and self.protocol == "official" else None,
                    meta={"task": task, "category": CATEGORY[base], "bucket": length_bucket(row.get("length")),
                          "truncated": p.truncated},
                ))
        return out

    def score(self, sample: Sample, outcome: Outcome) -> dict:
        base = base_task(sample.meta["task"])
        answers, classes = sample.reference
        return {"score": M.score_sample(METRIC[base], outcome.text, answers, classes,
                                        first_line_only=base in M.FIRST_LINE_TASKS, protocol=self.protocol)}

    def _aggregate(self, scores: list[float]) -> float:
        """A task's (or bucket's) score: official ``round(100 × mean, 2)``; lm-eval ``100 × mean``."""
        value = 100.0 * sum(scores) / max(1, len(scores))
        return round(value, 2) if self.protocol == "official" else value

    def summarise(self, samples: list[Sample], records: list[dict]) -> dict:
        done = [(r["meta"]["task"], r["score"], r["meta"]["bucket"], r["meta"]["truncated"], r.get("fell_back", False))
                for r in records]
        lens = sorted(set(self.max_lens.values()))
        result: dict[str, Any] = {
            "task": "longbench", "protocol": self.protocol, "query_aware": self.query_aware,
            "max_len": lens[0] if len(lens) == 1 else dict(self.max_lens),
        }
        scores = {t: self._aggregate([s for task, s, *_ in done if task == t]) for t in self.tasks}
        result.update(scores)
        by_category: dict[str, list[float]] = {}
        for t in self.tasks:
            by_category.setdefault(CATEGORY[base_task(t)], []).append(scores[t])
        categories = {c: sum(v) / len(v) for c, v in sorted(by_category.items(), key=lambda kv: CATEGORIES.index(kv[0]))}
        result.update({f"category.{c}": v for c, v in categories.items()})
        result["average_by_task"] = sum(scores.values()) / max(1, len(scores))
        result["average_by_category"] = sum(categories.values()) / max(1, len(categories))
        for t in (t for t in self.tasks if t in E_TASKS):
            for bucket in ("0-4k", "4-8k", "8k+"):
                cell = [s for task, s, b, *_ in done if task == t and b == bucket]
                if cell:
                    result[f"{t}@{bucket}"] = self._aggregate(cell)
        result["samples"] = len(done)
        result["truncated"] = sum(1 for *_, trunc, _ in done if trunc)
        if not self.query_aware:
            result["query_aware_fallbacks"] = sum(1 for *_, fb in done if fb)
        return result


def task(cfg, *, seed: int = 0, tokenizer=None, model=None) -> LongBenchTask:
    """The evaluation of an ``eval=longbench`` config (the ``kvcompress.run`` protocol)."""
    return LongBenchTask(cfg, tokenizer, model)


def run(model, make_cache, cfg, seed: int = 0, tokenizer=None) -> dict:
    """The accuracy block of :class:`LongBenchTask` on ``model``; under ``accelerate launch`` samples are split
    across processes and gathered in order, so the scores equal a single-process run's."""
    return evaluate(model, LongBenchTask(cfg, tokenizer, model), make_cache, tokenizer=tokenizer).accuracy
