"""RULER-style synthetic long-context suite (Hsieh et al. 2024), generated offline with the model's tokenizer.

Tasks (``TASKS``; RULER's definitions, our own code and prompt wording):

=================  ==========================================================================  =======  ======
task               setup                                                                       max new  metric
=================  ==========================================================================  =======  ======
niah_single_1      noise haystack ("The grass is green. ..."); word key → 7-digit number          128     all
niah_single_2      essay haystack; word key → number                                              128     all
niah_single_3      essay haystack; word key → UUID                                                128     all
niah_multikey_1    essay haystack; 4 keys, one asked                                               128     all
niah_multikey_2    haystack made of needles (word → number); one asked                            128     all
niah_multikey_3    haystack made of needles (UUID → UUID); one asked                              128     all
niah_multivalue    essay haystack; one key with 4 values, all required                            128     all
niah_multiquery    essay haystack; 4 keys asked together, all values required                     128     all
vt                 variable tracking: 1 chain of 4 hops ("VAR B = VAR A") in the noise haystack     30     all
cwe                common words: 10 words × 30 (fewer at short lengths) vs others × 3; top 10       120     all
fwe                frequent words: Zipf (α = 2) counts over coded words; top 3                      50     all
=================  ==========================================================================  =======  ======

Differences from NVIDIA/RULER, on purpose:

* The **essay** haystack is the built-in corpus of :mod:`kvcompress.eval.haystack` (prose from the Python docs,
  ``pydoc``) instead of Paul Graham's essays (not available offline); ``haystack=<.txt file or dir>`` swaps it.
* Word keys are ``<adjective>-<noun>`` pairs from ``wonderwords``' lists, as in RULER, but only words the model's
  tokenizer encodes without ``<unk>`` are used (with a byte-level BPE tokenizer that is every word; with the word-level
  testbed tokenizer about 60 adjectives and 640 nouns), keys of one sample have distinct nouns, and key words never
  occur in the essay window. cwe draws from the same filtered noun/adjective/verb lists. fwe's coded words are random
  6-letter strings as in RULER unless the tokenizer maps them to ``<unk>``; then filtered dictionary words are used.
  vt's variable names are 5 random capital letters as in RULER (the word-level testbed tokenizer maps them to
  ``<unk>``, so vt cannot be solved by it; accepted and reported).
* No in-context example is prepended to vt / cwe / fwe (RULER adds one); cwe lowers the common words' frequency from
  30 (halving, to at least 4) when 10 × 30 list entries do not fit the length.
* Numbers are 7-digit; values of one sample are distinct and, while possible, share no 3-digit group (so a copying
  model cannot confuse them; RULER does not care).
* Needle depths are drawn from 40 evenly spaced depths in [0, 1] (without replacement), inserted at sentence
  boundaries (needle-haystack: between needles) at ``round(depth × units)``.

Sizing: the prompt (special tokens included) plus the task's max new tokens fits in the target length: the number of
haystack units (sentences, distractor needles, list words) is the largest that fits, found by exponential + binary
search on the **model tokenizer's token count** of the full prompt. Everything is a pure function of (tokenizer,
task, length, seed, sample index).

Prompts: an instruction, the context, the question, then the task's answer prefix (``answer_prefix="ruler"``, e.g.
"The special magic numbers for {key} mentioned in the provided text are"). ``answer_prefix="lead_in"`` instead
removes the colon from the needle ("... for {key} is {value}.") and ends the prompt with the needle's own lead-in
("One of the special magic numbers for {key} is") — a variant for models that copy what followed a repeated phrase
(the constructed testbed); it changes only the niah tasks.

Metrics (RULER): **string_match_all** = mean over samples of the fraction of references contained in the prediction
(case-insensitive) × 100; **string_match_part** = mean of "any reference contained" × 100. All tasks here use
string_match_all (RULER uses part only for QA, which needs external data and is not included).
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import KVCompressError, unknown_choice
from . import haystack as _haystack
from .loop import Outcome, Sample, Task, evaluate, option
from .needle import _digit_groups

NUMBER_DIGITS = 7
DEPTHS = tuple(i / 39 for i in range(40))  # 40 evenly spaced depths in [0, 1]


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # niah | vt | cwe | fwe
    max_new_tokens: int
    metric: str = "all"  # all | part
    haystack: str = "essay"  # niah: noise | essay | needle
    key_type: str = "words"  # words | uuids
    value_type: str = "numbers"  # numbers | uuids
    num_keys: int = 1  # needles with distinct keys (the first num_queries are asked)
    num_values: int = 1  # values per key
    num_queries: int = 1


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
}

ANSWER_PREFIXES = ("ruler", "lead_in")


@dataclass
class RulerSample:
    """One prompt; ``outputs`` are the references scored by the task's metric against the continuation."""

    task: str
    prompt: str  # full text without special tokens, ending with the answer prefix
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

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------- metrics
def _lower(text: str) -> str:
    return text.casefold()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of the fraction of references contained (case-insensitively) in the output, × 100."""
    scores = [sum(_lower(r) in _lower(p) for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(1, len(scores))


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of 1 if any reference is contained (case-insensitively) in the output, × 100."""
    scores = [max(_lower(r) in _lower(p) for r in refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(1, len(scores))


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


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _fit(render: Callable[[int], str], target: int, count: Callable[[str], int], max_units: int | None = None) -> int:
    """Largest n (0 ≤ n ≤ max_units) with count(render(n)) ≤ target: exponential, then binary search."""
    if count(render(0)) > target:
        raise ValueError(f"length too small: the task's fixed text alone needs more than {target} tokens")
    lo, hi = 0, 1
    while True:
        if max_units is not None and hi >= max_units:
            hi = max_units
            if count(render(hi)) <= target:
                return hi
            break
        if count(render(hi)) > target:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(render(lo)) <= target < count(render(hi))
        mid = (lo + hi) // 2
        if count(render(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _insert(units: Sequence[str], inserts: Sequence[tuple[int, str]]) -> list[str]:
    """Units with the (boundary, text) inserts placed before unit `boundary` (stable order)."""
    by_pos: dict[int, list[str]] = {}
    for b, text in inserts:
        by_pos.setdefault(b, []).append(text)
    out: list[str] = []
    for i in range(len(units) + 1):
        out.extend(by_pos.get(i, []))
        if i < len(units):
            out.append(units[i])
    return out


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


# ------------------------------------------------------------------------------------------------------------ tasks
class _Generator:
    def __init__(self, tokenizer, haystack_source: str | None = None):
        self.tokenizer = tokenizer
        self.vocab = _Vocab(tokenizer)
        self.essay = haystack_source or "pydoc"
        self.sentence_tokens: dict[str, int] = {}

    def count(self, text: str) -> int:
        return _count(self.tokenizer, text)

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

    # ---- niah
    def niah(self, name: str, spec: TaskSpec, target: int, rng: random.Random, answer_prefix: str):
        type_v = "numbers" if spec.value_type == "numbers" else "uuids"
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

        def new_value() -> str:
            return _number(rng, taken) if spec.value_type == "numbers" else _uuid(rng)

        used: set[str] = set()
        keys = []
        for _ in range(spec.num_keys):
            keys.append(new_key(used))
            used.add(keys[-1])
        values = [[new_value() for _ in range(spec.num_values)] for _ in keys]
        sep = " is " if answer_prefix == "lead_in" else " is: "

        def needle_line(key: str, value: str) -> str:
            return f"One of the special magic {type_v} for {key}{sep}{value}."

        needles = [needle_line(k, v) for k, vs in zip(keys, values) for v in vs]
        depths = rng.sample(DEPTHS, len(needles)) if len(needles) <= len(DEPTHS) else [rng.random() for _ in needles]
        queries = keys[: spec.num_queries]
        outputs = [v for vs in values[: spec.num_queries] for v in vs]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        intro = (
            f"Some special magic {type_v} are hidden within the following text. Make sure to remember them: "
            f"you will be asked about the {type_v} afterwards."
        )
        question = f"What are all the special magic {type_v} for {query} mentioned in the provided text?"
        if answer_prefix == "lead_in":
            prefix = f"One of the special magic {type_v} for {queries[0]}{sep.rstrip()}"
        else:
            prefix = f"The special magic {type_v} for {query} mentioned in the provided text are"
        tail = "\n" + question + " " + prefix

        if spec.haystack == "noise":
            noise = _haystack.NOISE_SENTENCES

            def units(n: int) -> list[str]:
                return [noise[i % len(noise)] for i in range(n)]

            max_units = None
        elif spec.haystack == "essay":

            def units(n: int) -> list[str]:
                return window[:n]

            max_units = len(window)
        else:  # a haystack of needles with other keys
            distractors: list[str] = []
            drng = random.Random(rng.random())

            def units(n: int) -> list[str]:
                while len(distractors) < n:
                    k = new_key(used)
                    used.add(k)
                    v = _number(drng, taken) if spec.value_type == "numbers" else _uuid(drng)
                    distractors.append(needle_line(k, v))
                return distractors[:n]

            max_units = None

        def render(n: int) -> str:
            hay = units(n)
            inserts = sorted(((round(d * n), t) for d, t in zip(depths, needles)), key=lambda x: x[0])
            return intro + "\n" + " ".join(_insert(hay, inserts)) + tail

        n = _fit(render, target, self.count, max_units)
        prompt = render(n)
        return prompt, outputs, len(prompt) - len(tail) + 1, n, {"keys": keys, "queries": queries}

    # ---- variable tracking
    def vt(self, name, spec, target, rng, answer_prefix, num_chains: int = 1, num_hops: int = 4):
        names: list[str] = []
        while len(names) < num_chains * (num_hops + 1):
            v = "".join(rng.choices(string.ascii_uppercase, k=5))
            if v not in names:
                names.append(v)
        value = str(rng.randint(10000, 99999))
        chain = names[: num_hops + 1]
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(num_hops)]
        for c in range(1, num_chains):  # other chains (distractors) with their own values
            other = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
            statements += [f"VAR {other[0]} = {rng.randint(10000, 99999)}."]
            statements += [f"VAR {other[j + 1]} = VAR {other[j]}." for j in range(num_hops)]
        positions = sorted(rng.random() for _ in statements)
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"Answer: Following the chain(s) of variable assignment in the text above, {len(chain)} variables are "
            f"assigned the value {value}, they are:"
        )
        tail = "\n" + question + " " + prefix
        noise = _haystack.NOISE_SENTENCES

        def render(n: int) -> str:
            hay = [noise[i % len(noise)] for i in range(n)]
            # statements keep their chain order: sorted positions, stable insert
            inserts = [(round(p * n), s) for p, s in zip(positions, statements)]
            return intro + "\n" + " ".join(_insert(hay, inserts)) + tail

        n = _fit(render, target, self.count)
        prompt = render(n)
        return prompt, chain, len(prompt) - len(tail) + 1, n, {"value": value}

    # ---- common words extraction
    def cwe(self, name, spec, target, rng, answer_prefix, num_cw: int = 10, freq_cw: int = 30, freq_ucw: int = 3):
        pool = sorted(set(self.nouns) | set(self.adjectives) | set(self.verbs))
        if len(pool) < num_cw + 1:
            raise KVCompressError("the tokenizer knows too few wonderwords words for the cwe task")
        words = rng.sample(pool, len(pool))
        common, uncommon = words[:num_cw], words[num_cw:]
        shuffle_seed = rng.random()
        intro = "Below is a numbered list of words. In these words, some appear more often than others."
        question = f"Question: What are the {num_cw} most common words in the above list?"
        prefix = f"Answer: The top {num_cw} words that appear most often in the list are:"
        tail = "\n" + question + " " + prefix

        def make_render(fcw: int):
            def render(n: int) -> str:
                items = common * fcw + uncommon[:n] * freq_ucw
                random.Random(f"{shuffle_seed}-{fcw}-{n}").shuffle(items)
                return intro + "\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + tail

            return render

        fcw = freq_cw
        while fcw > max(4, freq_ucw + 1) and self.count(make_render(fcw)(0)) > target:
            fcw = max(max(4, freq_ucw + 1), fcw // 2)
        render = make_render(fcw)
        n = _fit(render, target, self.count, max_units=len(uncommon))
        prompt = render(n)
        return prompt, common, len(prompt) - len(tail) + 1, n, {"freq_cw": fcw, "freq_ucw": freq_ucw}

    # ---- frequent words extraction
    def fwe(self, name, spec, target, rng, answer_prefix, alpha: float = 2.0, vocab_size: int = 2000, wordlen: int = 6):
        coded: list[str] = []
        seen: set[str] = set()
        while len(coded) < vocab_size:
            w = "".join(rng.choices(string.ascii_lowercase, k=wordlen))
            if w not in seen:
                seen.add(w)
                coded.append(w)
        source = "coded"
        if len(self.vocab.known(coded[:20])) < 20:  # word-level tokenizer: coded words would all be <unk>
            pool = sorted(set(self.nouns) | set(self.adjectives) | set(self.verbs))
            coded = rng.sample(pool, min(vocab_size, len(pool)))
            source = "dictionary words (coded words are <unk> for this tokenizer)"
        coded[0] = "..."  # the top-ranked "word" is noise, as in RULER
        zeta = sum(k**-alpha for k in range(1, 100_000)) + 1e-5
        shuffle_seed = rng.random()
        intro = "Read the following coded text and track the frequency of each coded word."
        question = (
            "Question: Ignore the dots '....'. What are the three most frequently appeared coded words in the above "
            "coded text?"
        )
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        tail = "\n" + question + " " + prefix

        def render(n: int) -> str:
            items: list[str] = []
            for k, w in enumerate(coded, start=1):
                c = int(n * k**-alpha / zeta)
                if c == 0:
                    break
                items += [w] * c
            random.Random(f"{shuffle_seed}-{n}").shuffle(items)
            return intro + "\n" + " ".join(items) + tail

        n = _fit(render, target, self.count)
        prompt = render(n)
        return prompt, coded[1:4], len(prompt) - len(tail) + 1, n, {"words": source, "alpha": alpha}


def make_ruler_samples(
    tokenizer,
    tasks: Iterable[str],
    lengths: Iterable[int],
    *,
    num_samples: int = 1,
    seed: int = 0,
    answer_prefix: str = "ruler",
    haystack: str | None = None,
    max_new_tokens: int | None = None,
) -> list[RulerSample]:
    """Samples for every (task, length, index), in that nesting order. ``lengths`` count the prompt's tokens
    (special tokens included) plus the task's max new tokens (``max_new_tokens`` overrides every task's)."""
    tasks = list(tasks)
    for t in tasks:
        if t not in TASKS:
            raise unknown_choice("ruler task", t, TASKS)
    if answer_prefix not in ANSWER_PREFIXES:
        raise unknown_choice("ruler answer_prefix", answer_prefix, ANSWER_PREFIXES)
    gen = _Generator(tokenizer, haystack)
    out: list[RulerSample] = []
    for task in tasks:
        spec = TASKS[task]
        new = int(max_new_tokens or spec.max_new_tokens)
        for length in lengths:
            length = int(length)
            for index in range(num_samples):
                rng = random.Random(f"ruler-{task}-{seed}-{length}-{index}")
                prompt, outputs, qstart, units, meta = getattr(gen, spec.kind)(
                    task, spec, length - new, rng, answer_prefix
                )
                out.append(
                    RulerSample(
                        task=task, prompt=prompt, outputs=list(outputs), context_length=length,
                        num_tokens=gen.count(prompt), max_new_tokens=new, question_start=qstart, units=units,
                        seed=seed, index=index, metric=spec.metric, meta=meta,
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

    ``cfg`` keys (all optional): ``tasks`` (default: all of ``TASKS``), ``lengths`` ([1024]; prompt + max new
    tokens), ``samples`` (per task and length, 1), ``query_aware`` (True: the prompt with its question is compressed
    at prefill; False: the context alone is prefilled and compressed, then question + answer prefix are appended
    uncompressed), ``answer_prefix`` (``ruler`` | ``lead_in``), ``haystack`` (essay source; default the built-in
    ``pydoc`` corpus), ``new_tokens`` (override every task's max new tokens). Each sample generates its task's max
    new tokens. Sample metadata: ``task``, ``length``.

    Accuracy block: ``<task>`` (its RULER metric, ×100) and ``<task>@<length>``, ``average`` (mean over tasks, ×100)
    and ``average@<length>``, ``<task>.string_match_part``, ``samples``.
    """

    name = "ruler"

    def __init__(self, cfg, seed: int = 0, tokenizer=None):
        if tokenizer is None:
            raise ValueError("the RULER evaluation needs the model's tokenizer (model has none)")
        self.tasks = validate(cfg)
        self.tokenizer, self.seed = tokenizer, seed
        self.lengths = [int(x) for x in option(cfg, "lengths", [1024])]
        self.query_aware = bool(option(cfg, "query_aware", True))
        self.answer_prefix = str(option(cfg, "answer_prefix", "ruler"))
        self.num_samples = int(option(cfg, "samples", 1))
        self.haystack = option(cfg, "haystack", None)
        self.new_tokens = option(cfg, "new_tokens", None)
        self.ruler_samples: list[RulerSample] = []

    def samples(self) -> list[Sample]:
        self.ruler_samples = make_ruler_samples(
            self.tokenizer, self.tasks, self.lengths, num_samples=self.num_samples, seed=self.seed,
            answer_prefix=self.answer_prefix, haystack=self.haystack, max_new_tokens=self.new_tokens,
        )
        return [
            Sample(prompt=s.prompt, question_start=s.question_start, new_tokens=s.max_new_tokens, reference=s.outputs,
                   meta={"task": s.task, "length": s.context_length})
            for s in self.ruler_samples
        ]

    def score(self, sample: Sample, outcome: Outcome) -> dict:
        refs = [sample.reference]
        return {"all": string_match_all([outcome.text], refs) / 100.0,
                "part": string_match_part([outcome.text], refs) / 100.0}

    def summarise(self, samples: list[Sample], records: list[dict]) -> dict:
        preds = [r["prediction"] for r in records]
        result: dict = {
            "task": "ruler", "samples": len(samples), "query_aware": self.query_aware,
            "answer_prefix": self.answer_prefix,
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
    "TASKS",
    "RulerSample",
    "RulerTask",
    "make_ruler_samples",
    "run",
    "validate",
    "string_match_all",
    "string_match_part",
    "wonderwords_list",
]
