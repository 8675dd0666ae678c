"""LongBench (v1) metrics, written for kvcompress to the protocol of THUDM/LongBench ``LongBench/metrics.py``.

Every function takes one prediction and one gold answer and returns a value in [0, 1]; :func:`score_sample` takes
the max over a sample's gold answers (and scores only the first line for the few-shot tasks), as the official
``eval.py`` does. ``tests/test_longbench.py`` checks every function against expected scores derived by reading the
official code (``tests/data/longbench/official_scores.json``: prediction, answers → score, including blank-line and
comment-line ``code_sim`` cases), and the ``protocol="lm-eval"`` variant against lm-eval's port
(``lm_eval.tasks.longbench.metrics``).

Two protocols (:data:`PROTOCOLS`, ``score_sample(..., protocol=)``):

* ``"official"`` (default) — THUDM/LongBench ``eval.py`` + ``metrics.py``: the raw prediction (not stripped); for
  trec, triviaqa, samsum and lsht only its first line after leading newlines (``lstrip("\n").split("\n")[0]``);
  ``code_sim`` scores the first line, after leading newlines, that has no backtick, ``#`` or ``//`` — **even a blank
  one** (then the score is 0).
* ``"lm-eval"`` — lm-eval's port (``lm_eval/tasks/longbench``, task versions 5–6): generation stops at the first
  ``"\n"`` for trec, triviaqa, samsum and lsht (``until``), so the prediction is cut there (no leading-newline
  skip: an answer that starts with a newline is empty); every metric but ``code_sim`` scores ``prediction.strip()``;
  ``code_sim`` scores the unstripped prediction and **skips blank lines** (v6). Same metric functions otherwise.
  Where the two differ, e.g. ``code_sim("\n\n# c\n\nx = 1", "x = 1")``: official 0.0 (the blank line after the
  comment is taken), lm-eval 1.0.

* ``qa_f1``: SQuAD answer normalisation (lower-case; drop punctuation, the articles a/an/the and extra spaces), then
  the F1 of the two bags of words. ``qa_f1_zh``: jieba words, each stripped of (ASCII + CJK) punctuation and spaces.
* ``rouge``: ROUGE-L F of the ``rouge`` package (0 when it raises, e.g. on an empty string). ``rouge_zh``: the same
  on jieba-segmented text.
* ``classification``: class names found in the prediction, then the ones that are substrings of the gold (but not
  the gold itself) are dropped, 1/|found| if the gold is among them. The official code drops them while iterating
  over the same list, which skips the element right after each one dropped; we reproduce that so scores match.
* ``retrieval`` / ``retrieval_zh`` / ``count``: the fraction of the integers in the prediction that equal the gold
  paragraph number ("Paragraph N" / "段落N") or the gold count.
* ``code_sim``: the first prediction line (after leading newlines) without a backtick, ``#`` or ``//``, blank lines
  included, fuzzywuzzy ``ratio`` / 100 (fuzzywuzzy scores an empty string 0); :func:`code_sim_lm_eval` skips blank
  lines first.

The official ``classification`` has an unreachable fallback (``if em_match_list != 0`` compares a list with 0, so the
``difflib`` branch never runs); it is not reproduced because it cannot change a score. The official ``eval.py`` scores
every row of a task with the ``all_classes`` of the task file's last row (identical on every row of the released
trec / lsht files); :func:`score_sample` takes each row's own.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
) | _ASCII_PUNCT
_INT = re.compile(r"\d+")

#: Tasks whose prediction is cut to its first line before scoring (the official few-shot rule).
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, then the articles, then collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and CJK punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def _bag_f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    import jieba

    return list(jieba.cut(text, cut_all=False))


def qa_f1(prediction: str, answer: str, **_: object) -> float:
    return _bag_f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str, **_: object) -> float:
    pred = [w for w in (normalize_zh_answer(t) for t in _jieba_words(prediction)) if w]
    gold = [w for w in (normalize_zh_answer(t) for t in _jieba_words(answer)) if w]
    return _bag_f1(pred, gold)


_ROUGE = None


def rouge(prediction: str, answer: str, **_: object) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge import Rouge

        _ROUGE = Rouge()
    try:
        return float(_ROUGE.get_scores([prediction], [answer], avg=True)["rouge-l"]["f"])
    except Exception:  # the package raises on empty hypotheses/references (and a few other inputs): score 0
        return 0.0


def rouge_zh(prediction: str, answer: str, **_: object) -> float:
    return rouge(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(answer)))


def classification(prediction: str, answer: str, *, all_classes: Sequence[str] = (), **_: object) -> float:
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):  # official semantics: remove-while-iterating skips the entry after each removal
        name = found[i]
        if name in answer and name != answer:
            found.remove(name)
        i += 1
    return 1.0 / len(found) if answer in found else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _INT.findall(prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == str(target)) / len(numbers)


def retrieval(prediction: str, answer: str, **_: object) -> float:
    return _fraction_equal(prediction, re.findall(r"Paragraph (\d+)", answer)[0])


def retrieval_zh(prediction: str, answer: str, **_: object) -> float:
    return _fraction_equal(prediction, re.findall(r"段落(\d+)", answer)[0])


def count(prediction: str, answer: str, **_: object) -> float:
    return _fraction_equal(prediction, answer)


_CODE_MARKERS = ("`", "#", "//")


def code_sim(prediction: str, answer: str, **_: object) -> float:
    """Official: the first line after leading newlines with no backtick / ``#`` / ``//``, even a blank one."""
    from fuzzywuzzy import fuzz

    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if not any(m in ln for m in _CODE_MARKERS)), "")
    return fuzz.ratio(line, answer) / 100


def code_sim_lm_eval(prediction: str, answer: str, **_: object) -> float:
    """lm-eval's port (v6): the first non-blank line with no backtick / ``#`` / ``//``."""
    from fuzzywuzzy import fuzz

    lines = prediction.split("\n")
    line = next((ln for ln in lines if ln.strip() and not any(m in ln for m in _CODE_MARKERS)), "")
    return fuzz.ratio(line, answer) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


#: The scoring protocols of :func:`score_sample` (see the module docstring).
PROTOCOLS = ("official", "lm-eval")


def first_line(prediction: str) -> str:
    """The official few-shot rule: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score_sample(
    metric: str | Callable[..., float],
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    *,
    first_line_only: bool = False,
    protocol: str = "official",
) -> float:
    """One sample's score in [0, 1]: the best over its gold answers (official ``eval.py`` ``scorer``, or lm-eval's
    ``process_results`` with ``protocol="lm-eval"``). ``first_line_only``: the task is one of
    :data:`FIRST_LINE_TASKS` (official: first line after leading newlines; lm-eval: text before the first newline,
    its ``until``)."""
    if protocol not in PROTOCOLS:
        from ..errors import unknown_choice

        raise unknown_choice("LongBench protocol", protocol, PROTOCOLS)
    name = metric if isinstance(metric, str) else None
    fn = METRICS[metric] if isinstance(metric, str) else metric
    if protocol == "official":
        if first_line_only:
            prediction = first_line(prediction)
    else:
        if first_line_only:
            prediction = prediction.split("\n")[0]
        if name == "code_sim":
            fn = code_sim_lm_eval  # "do not strip the prediction!" (lm-eval's comment)
        else:
            prediction = prediction.strip()
    score = 0.0
    for answer in answers:
        score = max(score, fn(prediction, answer, all_classes=list(all_classes or [])))
    return float(score)
