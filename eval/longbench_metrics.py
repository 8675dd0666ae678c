"""LongBench (v1) metrics, written for kvcompress to the protocol of THUDM/LongBench ``LongBench/metrics.py``.

Every function takes one prediction and one gold answer and returns a value in [0, 1]; :func:`score_sample` takes
the max over a sample's gold answers (and scores only the first line for the few-shot tasks), as the official
``eval.py`` does. ``tests/test_longbench.py`` checks each function against lm-eval's port
(``lm_eval.tasks.longbench.metrics``) on a table of prediction/answer pairs.

* ``qa_f1``: SQuAD answer normalisation (lower-case; drop punctuation, the articles a/an/the and extra spaces), then
  the F1 of the two bags of words. ``qa_f1_zh``: jieba words, each stripped of (ASCII + CJK) punctuation and spaces.
* ``rouge``: ROUGE-L F of the ``rouge`` package (0 when it raises, e.g. on an empty string). ``rouge_zh``: the same
  on jieba-segmented text.
* ``classification``: class names found in the prediction, then the ones that are substrings of the gold (but not
  the gold itself) are dropped, 1/|found| if the gold is among them. The official code drops them while iterating
  over the same list, which skips the element right after each one dropped; we reproduce that so scores match.
* ``retrieval`` / ``retrieval_zh`` / ``count``: the fraction of the integers in the prediction that equal the gold
  paragraph number ("Paragraph N" / "段落N") or the gold count.
* ``code_sim``: the first non-empty prediction line without a backtick, ``#`` or ``//``, fuzzywuzzy ``ratio`` / 100.
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


def code_sim(prediction: str, answer: str, **_: object) -> float:
    from fuzzywuzzy import fuzz

    line = next(
        (ln for ln in prediction.split("\n") if ln.strip() and not any(m in ln for m in ("`", "#", "//"))), ""
    )
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


def first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]


def score_sample(
    metric: str | Callable[..., float],
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    *,
    first_line_only: bool = False,
) -> float:
    """One sample's score in [0, 1]: the best over its gold answers (official ``eval.py`` ``scorer``)."""
    fn = METRICS[metric] if isinstance(metric, str) else metric
    if first_line_only:
        prediction = first_line(prediction)
    return max((fn(prediction, a, all_classes=list(all_classes or [])) for a in answers), default=0.0)
