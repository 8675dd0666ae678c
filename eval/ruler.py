"""RULER (Hsieh et al. 2024, NVIDIA/RULER) synthetic long-context suite, generated offline with the model's tokenizer.

Tasks (``TASKS``; RULER's ``scripts/synthetic.yaml``, our own code):

=================  ==========================================================================  =======  ======
task               setup                                                                       max new  metric
=================  ==========================================================================  =======  ======
niah_single_1      noise haystack (RULER's 5-sentence "The grass is green. ..." line × n)          128     all
niah_single_2      essay haystack; word key → 7-digit number                                      128     all
niah_single_3      essay haystack; word key → UUID                                                128     all
niah_multikey_1    essay haystack; 4 keys, one asked                                               128     all
niah_multikey_2    haystack made of needles (word → number); one asked                            128     all
niah_multikey_3    haystack made of needles (UUID → UUID); one asked                              128     all
niah_multivalue    essay haystack; one key with 4 values, all required                            128     all
niah_multiquery    essay haystack; 4 keys asked together, all values required                     128     all
vt                 variable tracking: 1 chain of 4 hops in the noise haystack, one worked example   30     all
cwe                common words: 10 words × 30 vs others × 3 (≥ 4096 tokens; 6 vs 1 below), one     120     all
                   worked example
fwe                frequent words: Zipf (α = 2) counts over coded words; top 3                      50     all
qa_1               SQuAD v2 (answerable) question + distractor paragraphs (``qa_data``)             32     part
qa_2               HotpotQA (dev distractor) question + its paragraphs + others (``qa_data``)       32     part
=================  ==========================================================================  =======  ======

**Prompts are RULER's templates byte for byte** (``scripts/data/synthetic/constants.py``: :data:`TEMPLATES`, task
template + answer prefix) and its assembly rules (``niah.py``, ``variable_tracking.py``,
``common_words_extraction.py``, ``freq_words_extraction.py``, ``qa.py``):

* niah needles ``"One of the special magic {type} for {key} is: {value}."`` (always the plural type); noise and
  needle haystacks are **newline-joined** units (the noise unit is the whole five-sentence line), the needles
  inserted at random unit indices; the essay haystack is space-joined sentences with the needles at RULER's 40 depths
  (``round(linspace(0, 100, 40))`` %, sampled without replacement, ``int(sentences × depth / 100)``); needles are
  shuffled; the asked keys are a random sample of the keys; several keys are joined "a, b, and c".
* the **singular rewrite** where one value is asked (``num_needle_q × num_needle_v == 1``: niah_single_*,
  niah_multikey_*): "Some" → "A", "are all" → "is", "are" → "is", "answers" → "answer" in the template and answer
  prefix, and the type without its "s" ("What is the special magic number for ...").
* vt: the chain lines ``"VAR X = 12345"`` / ``"VAR Y = VAR X "`` (trailing space) inserted in order among the noise
  lines; one worked example (3-letter names, its prompt sized to 500 tokens — at most half the target below
  1000-token targets, which RULER does not generate — its answer appended after the prefix's trailing space, hence
  two spaces) before the task, as RULER's ``add_fewshot``.
* cwe: ``"1. word 2. word ..."``; one worked example (20 words, 3/1 repeats below 4096 tokens; 40 words, 10/3
  above) before the task, joined by a newline.
* fwe: ``vocab_size = (length − 50) // 50`` coded 6-letter words, the top-ranked one replaced by ``"..."``,
  ``int(n·k^−α/ζ(α))`` copies of the k-th, shuffled, space-joined; the answer is ranks 2–4.
* qa: ``"Document {i}:\\n{document}"`` blocks joined by a blank line; the gold paragraph(s), then other paragraphs of
  the same article (SQuAD), then random others, shuffled.
* The full prompt is RULER's ``base`` model template: task template + answer prefix. ``chat_template: true`` wraps
  the task template in the tokenizer's chat template (one user turn, generation prompt) and appends the answer
  prefix after it, as RULER's model templates do (``template.py``); the singular rewrite is applied to the task's
  text only, not to the chat template's.

Sizing: the prompt (special tokens included; RULER counts without them) plus the task's max new tokens fits in the
target length: the number of haystack units (noise lines, sentences, distractor needles, distinct words, coded
words, paragraphs) is the largest that fits, found by exponential + binary search on the **model tokenizer's token
count** of the full prompt. Everything is a pure function of (tokenizer, task, length, seed, sample index).

Differences from NVIDIA/RULER that remain, on purpose:

* The **essay** haystack is the built-in corpus of :mod:`kvcompress.eval.haystack` (prose from the Python docs,
  ``pydoc``) instead of Paul Graham's essays (not available offline); ``haystack=<.txt file or dir>`` swaps it. Its
  unit is a sentence (RULER sizes by words, then splits sentences with NLTK).
* Word keys are ``<adjective>-<noun>`` pairs from ``wonderwords``' lists, as in RULER, but only words the model's
  tokenizer encodes without ``<unk>`` are used (with a byte-level BPE tokenizer that is every word); keys of one
  sample have distinct nouns and differ from every distractor key, and key words never occur in the essay window.
  cwe draws from the same filtered lists. fwe's coded words are random 6-letter strings as in RULER unless the
  tokenizer maps them to ``<unk>``; then filtered dictionary words are used. vt's names are random capital letters
  as in RULER (a word-level tokenizer may map them to ``<unk>``).
* Numbers are 7-digit; values of one sample are distinct and, while possible, share no 3-digit group.
* RULER's ``remove_newline_tab`` option and its Paul Graham / ``english_words.json`` fallbacks are not offered.

**Templates** (``template``): ``"ruler"`` is the above. ``"lead_in"`` is for models that can only continue a phrase
they saw (the constructed testbed's bigram-copy circuit): RULER's prompt with two changes on the niah tasks only —
the needle has no colon (``"... for {key} is {value}."``) and the answer prefix is the needle's own lead-in
(``" One of the special magic numbers for {key} is"``, the first asked key) instead of "... mentioned in the provided
text are". The run records which template it used (``config.eval.template``, ``accuracy.template``); the testbed's
model config sets ``ruler.template: lead_in`` and the niah tasks its circuit can answer (``ruler.tasks``), which
``configs/eval/ruler.yaml`` takes as its defaults.

Metrics (RULER's ``scripts/eval/synthetic/constants.py``), on the prediction stripped and with control characters
turned into newlines (``postprocess_pred``): **string_match_all** = mean over samples of the fraction of references
contained (``lower()``) in the prediction × 100, **string_match_part** = mean of "any reference contained" × 100,
both rounded to 2 decimals. qa uses part, every other task all.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KVCompressError, unknown_choice
from . import haystack as _haystack
from .loop import Outcome, Sample, Task, evaluate, option
from .needle import _digit_groups

NUMBER_DIGITS = 7
#: RULER's needle depths in percent: ``np.round(np.linspace(0, 100, 40)).astype(int)`` (no value is a .5 tie).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
#: RULER's noise haystack unit: one line of five sentences.
NOISE = " ".join(_haystack.NOISE_SENTENCES)


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # niah | vt | cwe | fwe | qa
    max_new_tokens: int
    metric: str = "all"  # all | part
    haystack: str = "essay"  # niah: noise | essay | needle
    key_type: str = "words"  # words | uuids
    value_type: str = "numbers"  # numbers | uuids
    num_keys: int = 1  # needles with distinct keys (the asked ones are a random sample of num_queries)
    num_values: int = 1  # values per key
    num_queries: int = 1
    dataset: str = ""  # qa: squad | hotpotqa


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": TaskSpec("niah", 128, haystack="noise"),
    "niah_single_2": TaskSpec("niah", 128, haystack="essay"),
    "niah_single_3": TaskSpec("niah", 128, haystack="essay", value_type="uuids"),
    "niah_multikey_1": TaskSpec("niah", 128, haystack="essay", num_keys=4),
    "niah_multikey_2": TaskSpec("niah", 128, haystack="needle"),
    "niah_multikey_3": TaskSpec("niah", 128, haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": TaskSpec("niah", 128, haystack="essay", num_values=4),
    "niah_multiquery": TaskSpec("niah", 128, haystack="essay", num_keys=4, num_queries=4),
    "vt": TaskSpec("vt", 30),
    "cwe": TaskSpec("cwe", 120),
    "fwe": TaskSpec("fwe", 50),
    "qa_1": TaskSpec("qa", 32, metric="part", dataset="squad"),
    "qa_2": TaskSpec("qa", 32, metric="part", dataset="hotpotqa"),
}
#: The tasks generated without external data (the default task list); qa_1 / qa_2 need ``qa_data``.
SYNTHETIC_TASKS: tuple[str, ...] = tuple(t for t, spec in TASKS.items() if spec.kind != "qa")
#: The files ``qa_data`` must hold (RULER's ``download_qa_dataset.sh`` names): SQuAD 2.0 dev, HotpotQA dev distractor.
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}

#: RULER's task templates and answer prefixes (``scripts/data/synthetic/constants.py``), verbatim.
TEMPLATES: dict[str, tuple[str, str]] = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: ",
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
    ),
}
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: ``template="lead_in"``: the needle without its colon, and the answer prefix that repeats its lead-in.
LEAD_IN_NEEDLE = "One of the special magic {type_needle_v} for {key} is {value}."
LEAD_IN_PREFIX = " One of the special magic {type_needle_v} for {query} is"
QA_DOCUMENT = "Document {i}:\n{document}"

#: ``template`` values: RULER's prompts, or the lead-in variant (module docstring).
PROMPT_TEMPLATES = ("ruler", "lead_in")
#: Older name of the ``template`` option (``answer_prefix``), still read.
ANSWER_PREFIXES = PROMPT_TEMPLATES


def singular(text: str) -> str:
    """RULER's rewrite of a niah template when one value is asked (``niah.py``), in its order."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


@dataclass
class RulerSample:
    """One prompt; ``outputs`` are the references scored by the task's metric against the continuation."""

    task: str
    prompt: str  # full text (chat template included when used) without the tokenizer's own special tokens
    outputs: list[str]
    context_length: int  # target length in tokens (prompt + max new tokens)
    num_tokens: int  # actual prompt tokens (special tokens included)
    max_new_tokens: int
    question_start: int  # prompt[question_start:] is the question + answer prefix (not compressed if query-unaware)
    units: int  # haystack units chosen by the length search
    seed: int = 0
    index: int = 0
    metric: str = "all"
    meta: dict = field(default_factory=dict)
    template: str = "ruler"
    input_ids: list[int] | None = None  # with the chat template: the prompt's ids, given to the loop as they are
    question_token: int | None = None  # with the chat template: the token where the question starts

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------- metrics
def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of the fraction of references contained (lower-cased) in the output, × 100."""
    scores = [sum(r.lower() in postprocess(p).lower() for r in refs) / len(refs)
              for p, refs in zip(predictions, references)]
    return round(100.0 * sum(scores) / max(1, len(scores)), 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of 1 if any reference is contained (lower-cased) in the output, × 100."""
    scores = [max(r.lower() in postprocess(p).lower() for r in refs) for p, refs in zip(predictions, references)]
    return round(100.0 * sum(scores) / max(1, len(scores)), 2)


METRICS: dict[str, Callable] = {"all": string_match_all, "part": string_match_part}


# ----------------------------------------------------------------------------------------------------------- words
@functools.lru_cache(maxsize=4)
def wonderwords_list(kind: str) -> tuple[str, ...]:
    """``wonderwords``' shipped list (``noun``, ``adjective`` or ``verb``): lowercase single words, sorted."""
    from importlib import resources

    text = resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(sorted({w.strip() for w in text.split("\n") if w.strip().isalpha() and w.strip().islower()}))


class _Vocab:
    """Which words a tokenizer encodes without ``<unk>`` (with and without a leading space); cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.unk = getattr(tokenizer, "unk_token_id", None)
        self.cache: dict[str, bool] = {}

    def known(self, words: Iterable[str]) -> list[str]:
        words = list(words)
        if self.unk is None:
            return words
        missing = [w for w in dict.fromkeys(words) if w not in self.cache]
        if missing:
            enc = self.tokenizer([" " + w for w in missing] + missing, add_special_tokens=False)["input_ids"]
            n = len(missing)
            for i, w in enumerate(missing):
                self.cache[w] = self.unk not in enc[i] and self.unk not in enc[n + i]
        return [w for w in words if self.cache[w]]


def _fit(measure: Callable[[int], int], target: int, max_units: int | None = None) -> int:
    """Largest n (0 ≤ n ≤ max_units) with measure(n) ≤ target: exponential, then binary search."""
    if measure(0) > target:
        raise ValueError(f"length too small: the task's fixed text alone needs more than {target} tokens")
    lo, hi = 0, 1
    while True:
        if max_units is not None and hi >= max_units:
            hi = max_units
            if measure(hi) <= target:
                return hi
            break
        if measure(hi) > target:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # measure(lo) <= target < measure(hi)
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _number(rng: random.Random, taken: set[str]) -> str:
    v = ""
    for attempt in range(200):
        v = str(rng.randrange(10 ** (NUMBER_DIGITS - 1), 10**NUMBER_DIGITS))
        if v not in taken and (attempt >= 100 or not (_digit_groups(v) & taken)):
            break
    taken |= _digit_groups(v)
    return v


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _capitals(rng: random.Random, k: int, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct names of ``k`` random capital letters (not ``VAR`` nor in ``taken``)."""
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name != "VAR" and name not in taken and name not in out:
            out.append(name)
    taken.update(out)
    return out


def _zeta(alpha: float) -> float:
    """Riemann ζ(α) for α > 1 (``scipy.special.zeta`` in RULER): exact for α = 2, else a sum with its tail integral."""
    if alpha == 2.0:
        return math.pi**2 / 6
    n = 100_000
    return sum(k**-alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@dataclass
class _Parts:
    """A task prompt before the chat template: ``pre + context + post`` (the task template, with any worked
    example in ``pre``) and the answer ``prefix``."""

    pre: str
    context: str
    post: str
    prefix: str

    @property
    def body(self) -> str:
        return self.pre + self.context + self.post

    @property
    def question(self) -> int:
        """Offset in :attr:`body` of the question (after the context and the newlines that follow it)."""
        return len(self.pre) + len(self.context) + len(self.post) - len(self.post.lstrip("\n"))


@dataclass
class _Build:
    parts: Callable[[int], _Parts]  # the prompt with n haystack units
    outputs: list[str]
    max_units: int | None = None
    meta: dict = field(default_factory=dict)


def _split(template: str, **values: Any) -> tuple[str, str]:
    """A task template's text before and after ``{context}``, formatted."""
    pre, post = template.split("{context}")
    return pre.format(**values), post.format(**values)


# ------------------------------------------------------------------------------------------------------------ tasks
class _Generator:
    def __init__(self, tokenizer, haystack_source: str | None = None, chat: bool = False, qa_data: str | None = None):
        self.tokenizer = tokenizer
        self.vocab = _Vocab(tokenizer)
        self.essay = haystack_source or "pydoc"
        self.sentence_tokens: dict[str, int] = {}
        self.chat = bool(chat)
        self.qa_data = qa_data
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise KVCompressError("ruler chat_template=true but the tokenizer has no chat template; valid: false")
            from .longbench import _chat_wrap

            self.head, self.tail = _chat_wrap(tokenizer)
        else:
            self.head = self.tail = ""

    # ---- prompts: RULER's `base` model template (task template + answer prefix), or the chat template around it
    def text(self, parts: _Parts) -> str:
        return self.head + parts.body + self.tail + parts.prefix

    def count(self, parts: _Parts) -> int:
        return len(self.tokenizer(self.text(parts), add_special_tokens=not self.chat)["input_ids"])

    def plain_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sent_len(self, sentence: str) -> int:
        if sentence not in self.sentence_tokens:
            ids = self.tokenizer(" " + sentence, add_special_tokens=False)["input_ids"]
            self.sentence_tokens[sentence] = len(ids)
        return self.sentence_tokens[sentence]

    @functools.cached_property
    def nouns(self) -> list[str]:
        return self.vocab.known(wonderwords_list("noun"))

    @functools.cached_property
    def adjectives(self) -> list[str]:
        return self.vocab.known(wonderwords_list("adjective"))

    @functools.cached_property
    def verbs(self) -> list[str]:
        return self.vocab.known(wonderwords_list("verb"))

    @functools.cached_property
    def word_pool(self) -> list[str]:
        return sorted(set(self.nouns) | set(self.adjectives) | set(self.verbs))

    # ---- niah
    def niah(self, spec: TaskSpec, target: int, rng: random.Random, template: str, **_: Any) -> _Build:
        type_v = spec.value_type  # "numbers" | "uuids" (the needles always use the plural)
        exclude: set[str] = set()
        window: list[str] = []
        if spec.haystack == "essay":  # a window of consecutive sentences, more than enough to fill the target
            stream = _haystack.sentence_stream(self.essay, seed=f"ruler-{rng.random()}")
            total = 0
            while total < target:
                s = next(stream)
                window.append(s)
                total += self._sent_len(s)
            exclude = {w.casefold() for s in window for w in s.replace("-", " ").split()}
            exclude = {"".join(ch for ch in w if ch.isalpha()) for w in exclude}
        nouns = [w for w in self.nouns if w not in exclude]
        adjs = [w for w in self.adjectives if w not in exclude]
        if spec.key_type == "words" and (not nouns or not adjs):
            raise KVCompressError("the tokenizer knows no wonderwords nouns/adjectives to build needle keys from")
        rng.shuffle(nouns)
        noun_iter = iter(nouns)

        def new_key(used: set[str]) -> str:
            if spec.key_type == "uuids":
                return _uuid(rng)
            for _ in range(10_000):
                noun = next(noun_iter, None) or rng.choice(nouns)  # distinct nouns while they last
                key = f"{rng.choice(adjs)}-{noun}"
                if key not in used:
                    return key
            raise RuntimeError("ran out of needle keys")

        taken: set[str] = set()

        def new_value(r: random.Random) -> str:
            return _number(r, taken) if spec.value_type == "numbers" else _uuid(r)

        used: set[str] = set()
        keys: list[str] = []
        for _ in range(max(spec.num_keys, spec.num_queries)):
            keys.append(new_key(used))
            used.add(keys[-1])
        values = [[new_value(rng) for _ in range(spec.num_values)] for _ in keys]
        needle_format = NIAH_NEEDLE if template == "ruler" else LEAD_IN_NEEDLE
        needles = [needle_format.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        random.Random(rng.random()).shuffle(needles)
        asked = rng.sample(range(len(keys)), spec.num_queries)
        queries = [keys[i] for i in asked]
        outputs = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        task_template, prefix_template = TEMPLATES["niah"]
        type_q = type_v
        if spec.num_queries * spec.num_values == 1:  # RULER's singular rewrite
            task_template, prefix_template = singular(task_template), singular(prefix_template)
            type_q = type_v[:-1]
        pre, post = _split(task_template, type_needle_v=type_q, query=query)
        if template == "lead_in":
            prefix = LEAD_IN_PREFIX.format(type_needle_v=type_v, query=queries[0])
        else:
            prefix = prefix_template.format(type_needle_v=type_q, query=query)
        depths = rng.sample(DEPTHS, len(needles)) if len(needles) <= len(DEPTHS) else rng.choices(DEPTHS, k=len(needles))
        place = rng.random()
        distractors: list[str] = []
        drng = random.Random(rng.random())

        def units(n: int) -> list[str]:
            if spec.haystack == "noise":
                return [NOISE] * n
            while len(distractors) < n:  # a haystack of needles with other keys
                k = new_key(used)
                used.add(k)
                distractors.append(needle_format.format(type_needle_v=type_v, key=k, value=new_value(drng)))
            return distractors[:n]

        def context(n: int) -> str:
            if spec.haystack == "essay":
                sents = window[:n]
                cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
                pieces: list[str] = []
                for i in range(1, len(cuts)):
                    pieces.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                    if i - 1 < len(needles):
                        pieces.append(needles[i - 1])
                return " ".join(pieces)
            lines = units(n)
            spots = random.Random(f"{place}-{n}").sample(range(max(n, len(needles))), len(needles))
            for spot, needle in zip(sorted(spots, reverse=True), needles):
                lines.insert(min(spot, len(lines)), needle)
            return "\n".join(lines)

        return _Build(lambda n: _Parts(pre, context(n), post, prefix), outputs,
                      len(window) if spec.haystack == "essay" else None, {"keys": keys, "queries": queries})

    # ---- variable tracking
    def _vt_chains(self, rng: random.Random, k: int, value: str, num_chains: int, num_hops: int,
                   taken: set[str]) -> tuple[list[list[str]], list[list[str]]]:
        names = _capitals(rng, k, num_chains * (num_hops + 1), taken)
        chains, groups = [], []
        for c in range(num_chains):
            group = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
            first = value if c == 0 else str(rng.randrange(10000, 99999))
            chains.append([f"VAR {group[0]} = {first}"] + [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(num_hops)])
            groups.append(group)
        return chains, groups

    @staticmethod
    def _vt_context(chains: list[list[str]], n: int, seed: Any) -> str:
        lines = [NOISE] * n
        prng = random.Random(f"{seed}-{n}")
        for chain in chains:
            spots = sorted(prng.sample(range(max(len(lines), len(chain))), len(chain)))
            for j, (spot, statement) in enumerate(zip(spots, chain)):
                lines.insert(min(spot + j, len(lines)), statement)
        return "\n".join(lines).replace(". \n", ".\n")

    def vt(self, spec: TaskSpec, target: int, rng: random.Random, template: str, num_chains: int = 1,
           num_hops: int = 4, **_: Any) -> _Build:
        taken: set[str] = set()
        task_template, prefix_template = TEMPLATES["vt"]
        # the worked example (RULER's add_fewshot): 3-letter names, its prompt sized to 500 tokens, answer appended
        ex_value = str(rng.randrange(10000, 99999))
        ex_chains, ex_groups = self._vt_chains(rng, 3, ex_value, num_chains, num_hops, taken)
        ex_seed = rng.random()
        ex_pre, ex_post = _split(task_template, query=ex_value)
        ex_prefix = prefix_template.format(num_v=num_hops + 1, query=ex_value)

        def example(n: int) -> str:
            return ex_pre + self._vt_context(ex_chains, n, ex_seed) + ex_post + ex_prefix

        ex_n = _fit(lambda n: self.plain_count(example(n)), min(500, target // 2))
        shot = example(ex_n) + " " + " ".join(ex_groups[0]) + "\n"
        value = str(rng.randrange(10000, 99999))
        chains, groups = self._vt_chains(rng, 5, value, num_chains, num_hops, taken)
        pre, post = _split(task_template, query=value)
        prefix = prefix_template.format(num_v=num_hops + 1, query=value)
        seed = rng.random()
        return _Build(lambda n: _Parts(shot + "\n" + pre, self._vt_context(chains, n, seed), post, prefix), groups[0],
                      None, {"value": value, "example_units": ex_n})

    # ---- common words extraction
    def cwe(self, spec: TaskSpec, target: int, rng: random.Random, template: str, length: int = 0, num_cw: int = 10,
            **_: Any) -> _Build:
        pool = self.word_pool
        if len(pool) < num_cw + 1:
            raise KVCompressError("the tokenizer knows too few wonderwords words for the cwe task")
        # RULER: below 4096 tokens 6 vs 1 repeats (example 20 words, 3 vs 1); else 30 vs 3 (example 40 words, 10 vs 3)
        (ex_words, ex_cw, ex_ucw), (freq_cw, freq_ucw) = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
        task_template, prefix = TEMPLATES["cwe"]
        ex = rng.sample(pool, min(ex_words, len(pool)))
        ex_list = ex[:num_cw] * ex_cw + ex[num_cw:] * ex_ucw
        random.Random(rng.random()).shuffle(ex_list)
        shot = task_template.format(context=_numbered(ex_list)) + prefix + " " + _numbered(ex[:num_cw])
        words = rng.sample(pool, len(pool))
        common, uncommon = words[:num_cw], words[num_cw:]
        pre, post = _split(task_template)
        seed = rng.random()

        def context(n: int) -> str:
            items = common * freq_cw + uncommon[:n] * freq_ucw
            random.Random(f"{seed}-{n}").shuffle(items)
            return _numbered(items)

        return _Build(lambda n: _Parts(shot + "\n" + pre, context(n), post, prefix), common, len(uncommon),
                      {"freq_cw": freq_cw, "freq_ucw": freq_ucw})

    # ---- frequent words extraction
    def fwe(self, spec: TaskSpec, target: int, rng: random.Random, template: str, alpha: float = 2.0,
            wordlen: int = 6, **_: Any) -> _Build:
        vocab_size = max(4, target // 50)  # RULER: (max_seq_length - tokens_to_generate) // 50
        seen: set[str] = set()
        coded: list[str] = []
        while len(coded) < vocab_size:
            w = "".join(rng.choices(string.ascii_lowercase, k=wordlen))
            if w not in seen:
                seen.add(w)
                coded.append(w)
        coded.sort()
        source = "coded"
        if len(self.vocab.known(coded[:20])) < min(20, len(coded)):  # word-level tokenizer: coded words are <unk>
            coded = sorted(rng.sample(self.word_pool, min(vocab_size, len(self.word_pool))))
            source = "dictionary words (coded words are <unk> for this tokenizer)"
        rng.shuffle(coded)
        coded[0] = "..."  # the top-ranked "word" is noise, as in RULER
        zeta = _zeta(alpha)
        task_template, prefix = TEMPLATES["fwe"]
        pre, post = _split(task_template)
        seed = rng.random()

        def context(n: int) -> str:
            items: list[str] = []
            for k, w in enumerate(coded, start=1):
                items += [w] * int(n * k**-alpha / zeta)
            random.Random(f"{seed}-{n}").shuffle(items)
            return " ".join(items)

        return _Build(lambda n: _Parts(pre, context(n), post, prefix), coded[1:4], None,
                      {"words": source, "alpha": alpha, "vocab_size": len(coded)})

    # ---- question answering (external data)
    def qa(self, spec: TaskSpec, target: int, rng: random.Random, template: str, index: int = 0, **_: Any) -> _Build:
        qas, docs = load_qa(self.qa_data, spec.dataset)
        item = qas[index % len(qas)]
        gold, more = list(item["context"]), list(item.get("more_context", []))
        others = sorted(set(range(len(docs))) - set(gold) - set(more))
        pick, order = rng.random(), rng.random()

        def context(n: int) -> str:  # n: documents beyond the gold ones
            total = len(gold) + n
            prng = random.Random(f"{pick}-{n}")
            if total < len(docs):
                if n > len(more):
                    chosen = gold + more + prng.sample(others, min(len(others), n - len(more)))
                else:
                    chosen = gold + prng.sample(more, n)
                texts = [docs[i] for i in chosen]
            else:  # RULER repeats the document list
                texts = (docs * (total // len(docs) + 1))[:total]
            random.Random(order).shuffle(texts)
            return "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))

        task_template, prefix = TEMPLATES["qa"]
        pre, post = _split(task_template, query=item["query"])
        return _Build(lambda n: _Parts(pre, context(n), post, prefix), list(item["outputs"]), None,
                      {"question": item["query"], "dataset": spec.dataset})


@functools.lru_cache(maxsize=4)
def _read_json(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_qa(qa_data: str | None, dataset: str) -> tuple[list[dict], list[str]]:
    """RULER's QA sets from ``<qa_data>/squad.json`` (SQuAD 2.0 layout; answerable questions) or
    ``<qa_data>/hotpotqa.json`` (HotpotQA dev distractor layout): ``(questions, documents)``, each question with its
    ``query``, ``outputs``, gold ``context`` document indices and (SQuAD) ``more_context``, the other paragraphs of
    its article. Documents are sorted and de-duplicated, as RULER does."""
    if not qa_data:
        raise KVCompressError("ruler qa tasks need external data; valid: eval.qa_data=DIR with squad.json / "
                              "hotpotqa.json (RULER's download_qa_dataset.sh files)")
    path = Path(str(qa_data)).expanduser() / QA_FILES[dataset]
    if not path.is_file():
        raise KVCompressError(f"ruler {dataset} file {str(path)!r} not found; valid: eval.qa_data=DIR holding "
                              f"{QA_FILES[dataset]}")
    data = _read_json(str(path))
    qas: list[dict] = []
    if dataset == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for q in p["qas"]:
                    if not q.get("is_impossible", False):
                        own = index[p["context"]]
                        qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                    "context": [own], "more_context": [i for i in article if i != own]})
    else:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        for d in data:
            qas.append({"query": d["question"], "outputs": [d["answer"]],
                        "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]})
    if not qas:
        raise KVCompressError(f"ruler {dataset} file {str(path)!r} holds no answerable question")
    return qas, docs


def make_ruler_samples(
    tokenizer,
    tasks: Iterable[str],
    lengths: Iterable[int],
    *,
    num_samples: int = 1,
    seed: int = 0,
    template: str | None = None,
    answer_prefix: str | None = None,
    haystack: str | None = None,
    max_new_tokens: int | None = None,
    chat_template: bool = False,
    qa_data: str | None = None,
) -> list[RulerSample]:
    """Samples for every (task, length, index), in that nesting order. ``lengths`` count the prompt's tokens
    (special tokens included) plus the task's max new tokens (``max_new_tokens`` overrides every task's).
    ``template``: ``ruler`` (default) or ``lead_in`` (``answer_prefix`` is its older name)."""
    tasks = list(tasks)
    for t in tasks:
        if t not in TASKS:
            raise unknown_choice("ruler task", t, TASKS)
    template = str(template or answer_prefix or "ruler")
    if template not in PROMPT_TEMPLATES:
        raise unknown_choice("ruler template", template, PROMPT_TEMPLATES)
    gen = _Generator(tokenizer, haystack, chat_template, qa_data)
    out: list[RulerSample] = []
    for task in tasks:
        spec = TASKS[task]
        new = int(max_new_tokens or spec.max_new_tokens)
        for length in lengths:
            length = int(length)
            for index in range(num_samples):
                rng = random.Random(f"ruler-{task}-{seed}-{length}-{index}")
                build = getattr(gen, spec.kind)(spec, length - new, rng, template, length=length, index=index)
                n = _fit(lambda n: gen.count(build.parts(n)), length - new, build.max_units)
                parts = build.parts(n)
                prompt = gen.text(parts)
                q_char = len(gen.head) + parts.question
                ids, q_token = None, None
                if gen.chat:
                    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
                    ids = list(enc["input_ids"])
                    q_token = next((i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= q_char),
                                   None)
                out.append(
                    RulerSample(
                        task=task, prompt=prompt, outputs=list(build.outputs), context_length=length,
                        num_tokens=gen.count(parts), max_new_tokens=new, question_start=q_char, units=n, seed=seed,
                        index=index, metric=spec.metric, meta=build.meta, template=template, input_ids=ids,
                        question_token=q_token,
                    )
                )
    return out


def validate(cfg) -> list[str]:
    """Check an eval config without loading anything (task names, answer_prefix, lengths, samples); one-line
    :class:`KVCompressError` on bad input. Returns the task list. A caller can run it before loading the model."""
    tasks = option(cfg, "tasks", list(TASKS))
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    tasks = [t for t in tasks if t]
    if not tasks:
        raise KVCompressError(f"ruler: no tasks given; valid choices: {', '.join(sorted(TASKS))}")
    for t in tasks:
        if t not in TASKS:
            raise unknown_choice("ruler task", t, TASKS)
    prefix = str(option(cfg, "answer_prefix", "ruler"))
    if prefix not in ANSWER_PREFIXES:
        raise unknown_choice("ruler answer_prefix", prefix, ANSWER_PREFIXES)
    for key in ("lengths",):
        if any(int(x) < 1 for x in option(cfg, key, [1024])):
            raise KVCompressError(f"ruler: {key} must be positive token counts")
    if int(option(cfg, "samples", 1)) < 1:
        raise KVCompressError("ruler: samples must be an integer >= 1")
    return tasks


class RulerTask(Task):
    """``eval=ruler`` on the evaluation loop.

    ``cfg`` keys (all optional): ``tasks`` (default: :data:`SYNTHETIC_TASKS`, plus qa_1 / qa_2 when ``qa_data`` is
    set), ``lengths`` ([1024]; prompt + max new tokens), ``samples`` (per task and length, 1), ``query_aware``
    (True: the prompt with its question is compressed at prefill; False: the context alone is prefilled and
    compressed, then question + answer prefix are appended uncompressed), ``template`` (``ruler`` | ``lead_in``;
    ``answer_prefix`` is read as its older name), ``chat_template`` (False: RULER's ``base`` template; True: the
    tokenizer's chat template around the task template), ``haystack`` (essay source; default the built-in ``pydoc``
    corpus), ``qa_data`` (directory with ``squad.json`` / ``hotpotqa.json``), ``new_tokens`` (override every task's
    max new tokens). Each sample generates its task's max new tokens. Sample metadata: ``task``, ``length``.

    Accuracy block: ``<task>`` (its RULER metric, ×100) and ``<task>@<length>``, ``average`` (mean over tasks, ×100)
    and ``average@<length>``, ``<task>.string_match_part``, ``samples``, ``template``, ``chat_template``, ``tasks``.
    """

    name = "ruler"
    primary = "all"

    def __init__(self, cfg, seed: int = 0, tokenizer=None):
        if tokenizer is None:
            raise ValueError("the RULER evaluation needs the model's tokenizer (model has none)")
        self.qa_data = option(cfg, "qa_data", None)
        tasks = validate(cfg)
        if option(cfg, "tasks", None) is None:  # the default list: every task its data allows
            tasks = [t for t in TASKS if TASKS[t].kind != "qa" or self.qa_data is not None]
        self.tasks = tasks
        self.tokenizer, self.seed = tokenizer, seed
        self.lengths = [int(x) for x in option(cfg, "lengths", [1024])]
        self.query_aware = bool(option(cfg, "query_aware", True))
        self.template = str(option(cfg, "template", None) or option(cfg, "answer_prefix", "ruler"))
        if self.template not in PROMPT_TEMPLATES:
            raise unknown_choice("ruler template", self.template, PROMPT_TEMPLATES)
        chat = option(cfg, "chat_template", False)
        if isinstance(chat, str):
            if chat.lower() not in ("true", "false"):
                raise unknown_choice("ruler chat_template", chat, ("false", "true"))
            chat = chat.lower() == "true"
        self.chat_template = bool(chat)
        self.num_samples = int(option(cfg, "samples", 1))
        self.haystack = option(cfg, "haystack", None)
        self.new_tokens = option(cfg, "new_tokens", None)
        for t in self.tasks:
            if TASKS[t].kind == "qa":
                load_qa(self.qa_data, TASKS[t].dataset)  # missing data fails before any generation
        self.ruler_samples: list[RulerSample] = []

    def samples(self) -> list[Sample]:
        self.ruler_samples = make_ruler_samples(
            self.tokenizer, self.tasks, self.lengths, num_samples=self.num_samples, seed=self.seed,
            template=self.template, haystack=self.haystack, max_new_tokens=self.new_tokens,
            chat_template=self.chat_template, qa_data=self.qa_data,
        )
        out = []
        for s in self.ruler_samples:
            meta = {"task": s.task, "length": s.context_length}
            if s.input_ids is not None:
                out.append(Sample(input_ids=s.input_ids, question_start=s.question_token, new_tokens=s.max_new_tokens,
                                  reference=s.outputs, meta=meta))
            else:
                out.append(Sample(prompt=s.prompt, question_start=s.question_start, new_tokens=s.max_new_tokens,
                                  reference=s.outputs, meta=meta))
        return out

    def score(self, sample: Sample, outcome: Outcome) -> dict:
        refs = [sample.reference]
        return {"all": string_match_all([outcome.text], refs) / 100.0,
                "part": string_match_part([outcome.text], refs) / 100.0}

    def summarise(self, samples: list[Sample], records: list[dict]) -> dict:
        preds = [r["prediction"] for r in records]
        result: dict = {
            "task": "ruler", "samples": len(samples), "query_aware": self.query_aware, "template": self.template,
            "chat_template": self.chat_template, "tasks": list(self.tasks),
        }
        per_task: dict[str, float] = {}
        per_length: dict[str, float] = {}
        part: dict[str, float] = {}
        for task in self.tasks:
            idx = [i for i, s in enumerate(samples) if s.meta["task"] == task]
            metric = METRICS[TASKS[task].metric]
            task_preds, task_refs = [preds[i] for i in idx], [samples[i].reference for i in idx]
            per_task[task] = metric(task_preds, task_refs)
            part[f"{task}.string_match_part"] = string_match_part(task_preds, task_refs)
            for length in self.lengths:
                li = [i for i in idx if samples[i].meta["length"] == length]
                per_length[f"{task}@{length}"] = metric([preds[i] for i in li], [samples[i].reference for i in li])
        result["average"] = sum(per_task.values()) / max(1, len(per_task))
        result.update(per_task)
        for length in self.lengths:
            result[f"average@{length}"] = sum(per_length[f"{t}@{length}"] for t in self.tasks) / max(1, len(self.tasks))
        result.update(per_length)
        result.update(part)
        return result


def task(cfg, *, seed: int = 0, tokenizer=None, model=None) -> RulerTask:
    """The evaluation of an ``eval=ruler`` config (the ``kvcompress.run`` protocol)."""
    return RulerTask(cfg, seed, tokenizer)


def run(model, make_cache, cfg, seed: int = 0, tokenizer=None) -> dict:
    """The accuracy block of :class:`RulerTask` on ``model`` with a fresh cache from ``make_cache`` per sample."""
    return evaluate(model, RulerTask(cfg, seed, tokenizer), make_cache, tokenizer=tokenizer).accuracy


__all__ = [
    "PROMPT_TEMPLATES",
    "SYNTHETIC_TASKS",
    "TASKS",
    "TEMPLATES",
    "RulerSample",
    "RulerTask",
    "load_qa",
    "make_ruler_samples",
    "run",
    "singular",
    "validate",
    "string_match_all",
    "string_match_part",
    "wonderwords_list",
]
