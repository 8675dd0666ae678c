"""Needle-in-a-haystack / passkey sample generator and exact-match scoring.

Templates (``template=``):

* ``"magic_number"`` (RULER-style, default) — needle "The special magic number for {key} is {value}.", a 7-digit
  value, ``num_distractors`` other needles with other keys and values at other depths; the prompt ends with the
  answer prefix "The special magic number for {key} is" so the answer is the next tokens.
* ``"passkey"`` (Mohtashami & Jaggi 2023) — "The pass key is {value}. Remember it. {value} is the pass key.", a value
  in [1, 50000], the "noise" filler by default; no distractors (every distractor would share the key).
* ``"kamradt"`` (gkamradt's NIAH) — the San Francisco sandwich needle; no distractors.

Haystack: :mod:`kvcompress.eval.haystack` (``"pydoc"`` by default, ``"noise"``, or a path to .txt files), a run of
consecutive sentences from a seeded random offset, sized **by token count with the given tokenizer** so the whole
prompt (special tokens included) has at most ``context_length`` tokens and falls short by less than one sentence.
The needle is inserted at the sentence boundary at or before ``depth`` × haystack tokens (depth 0 = before the first
sentence, 1 = after the last). Distractor needles go at other boundaries. Keys never occur as words in the haystack
window; values of one sample are distinct and share no full 3-digit group (``\\d{3}`` chunk of ``\\d{1,3}``
grouping) with each other, so a copying model cannot confuse them.

Everything is a pure function of (tokenizer, arguments, seed).

Scoring, as common harnesses do it (the row states the rule, :data:`SCORING`):

* :func:`score_exact_match` — 1 if the normalised answer **occurs in** the normalised prediction (whitespace
  collapsed, stripped, case-folded), as RULER's ``string_match`` and passkey harnesses check the value:
  ``": 4827193"``, ``"**4827193**"`` and ``"The special magic number for apple is 4827193."`` all match
  ``"4827193"``. (:func:`score_prefix_match` is the stricter rule "starts with the answer, which does not run on",
  used by head detection's probes.)
* :func:`score_rouge1_recall` — ROUGE-1 recall as the Retrieval-Head reference computes it (``rouge_score``'s
  ``RougeScorer(["rouge1"], use_stemmer=True)``, ``score(needle, response).recall``), written here: both strings
  lower-cased, every character outside ``[a-z0-9]`` a space, split; with ``stemmer=True`` (the reference's option,
  the default) every token longer than 3 characters is reduced by the Porter stemmer (NLTK's, as ``rouge_score``);
  the clipped unigram overlap divided by the reference's unigrams. Retrieval-Head papers report it (×100) for the
  Kamradt needle, where a paraphrased answer still earns partial credit.

:class:`NeedleTask` is the evaluation on :mod:`kvcompress.eval.loop` (``eval=needle``): it generates
``new_tokens`` tokens per sample — enough for the template's whole answer sentence restated (the question's lead-in,
the value and a period, e.g. "The special magic number for apple is 4827193.") plus 2 (:data:`ANSWER_SLACK`), so an
answer that restates the lead-in or wraps the value in markup is still read whole. It reports both metrics overall,
per length and per depth, the length × depth ``grid`` (exact match; and ``grid_rouge1_recall``) in the results row,
and with ``heatmap: PATH`` writes the classic heatmap PNG (:func:`write_heatmap`).
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import haystack as _haystack
from kvcompress.constraints import (AnyOf, Boolean, Choice, ExistingPath, Integer, ListOf, Number, Optional,
                                    OutputFile, check)
from kvcompress.errors import KVCompressError

from .loop import Outcome, Sample, Task, evaluate, option

#: Needle keys: concrete nouns absent from the Python docs (a key is also skipped if it appears in the haystack).
KEY_WORDS: tuple[str, ...] = tuple(
    """
    apple apricot avocado badger banana beaver bison blueberry bobcat buffalo butterfly cactus camel canary
    cantaloupe caribou carrot catfish cheetah cherry chestnut chipmunk cobra coconut cougar coyote crayfish cricket
    crocodile cucumber daffodil dolphin donkey dragonfly eagle eggplant elephant falcon ferret flamingo gazelle
    gecko giraffe goldfish gooseberry gorilla grapefruit grasshopper hamster hedgehog heron hippo hornet hyena
    iguana jackal jaguar jellyfish kangaroo kiwi koala ladybug lemur leopard lettuce lobster lynx mackerel
    magpie mango meerkat melon mongoose moose mosquito narwhal nectarine nightingale octopus okapi olive orangutan
    ostrich otter owl oyster panda panther papaya parrot peacock pelican penguin pheasant pineapple piranha pistachio
    platypus plum porcupine possum pumpkin quail rabbit raccoon radish raspberry reindeer rhino salamander salmon
    sardine scorpion seahorse seal shark shrimp skunk sloth snail sparrow spinach squid squirrel starfish stingray
    strawberry swan tadpole tangerine tapir termite tiger tomato tortoise toucan trout tulip turnip turtle vulture
    walnut walrus wasp weasel whale wolverine wombat yak zebra
    """.split()
)

KAMRADT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
KAMRADT_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"

TEMPLATES: dict[str, dict[str, str]] = {
    "magic_number": {
        "intro": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about one of them afterwards.",
        "needle": "The special magic number for {key} is {value}.",
        "question": "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} is",
        "haystack": "pydoc",
    },
    "passkey": {
        "intro": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.",
        "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
        "question": "What is the pass key? The pass key is",
        "haystack": "noise",
    },
    "kamradt": {
        "intro": "Read the following text and answer the question at the end.",
        "needle": KAMRADT_NEEDLE,
        "question": "What is the best thing to do in San Francisco? The best thing to do in San Francisco is",
        "haystack": "pydoc",
    },
}


@dataclass
class NeedleSample:
    """One prompt. ``prompt`` is the full text (without special tokens); the model's continuation is scored."""

    prompt: str
    answer: str
    template: str
    context_length: int  # requested size in tokens (special tokens included)
    num_tokens: int  # actual prompt size with the generator's tokenizer (special tokens included)
    depth: float  # requested depth in [0, 1]
    key: str | None
    needle: str
    needle_char_span: tuple[int, int]  # prompt[start:end] == needle
    needle_token_span: tuple[int, int]  # token indices [start, end) covering the needle (special tokens counted)
    value_token_span: tuple[int, int]  # token indices [start, end) of the needle's first occurrence of the answer
    distractor_keys: list[str] = field(default_factory=list)
    distractor_values: list[str] = field(default_factory=list)
    distractor_char_spans: list[tuple[int, int]] = field(default_factory=list)
    actual_depth: float = 0.0  # needle start token / prompt tokens
    new_tokens: int = 15  # tokens the needle evaluation generates: the template's answer sentence + ANSWER_SLACK
    max_new_tokens: int = 16  # answer tokens + 2: head detection's probe length (one decode step fewer); not generated
    seed: int = 0
    index: int = 0  # sample index within its (length, depth) cell

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


#: Tokens generated beyond the template's answer sentence (room for markup such as ``**`` or a leading colon).
ANSWER_SLACK = 2

#: How the accuracy block's metrics are computed (recorded in every needle row).
SCORING = {
    "exact_match": "the answer occurs in the prediction (both case-folded, whitespace collapsed)",
    "rouge1_recall": "ROUGE-1 recall of the answer (rouge_score tokenization, Retrieval-Head reference)",
}


def score_exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised answer occurs in the normalised prediction, else 0.0 (common harnesses' rule)."""
    pred, ans = _normalize(prediction), _normalize(answer)
    return 1.0 if ans and ans in pred else 0.0


def score_prefix_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction starts with the normalised answer and does not continue it, else 0.0."""
    pred, ans = _normalize(prediction), _normalize(answer)
    if not ans or not pred.startswith(ans):
        return 0.0
    rest = pred[len(ans) :]
    return 0.0 if rest and rest[0].isalnum() else 1.0


def score_contains(prediction: str, answer: str) -> float:
    """RULER's string_match_part for one reference: 1.0 if the answer occurs (case-insensitively) in the prediction."""
    return 1.0 if _normalize(answer) in _normalize(prediction) else 0.0


_STEMMER = None


def _stem(token: str) -> str:
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem import porter

        _STEMMER = porter.PorterStemmer()
    return _STEMMER.stem(token)


def _rouge_tokens(text: str, stemmer: bool = True) -> list[str]:
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [_stem(t) if stemmer and len(t) > 3 else t for t in tokens]


def score_rouge1_recall(prediction: str, reference: str, stemmer: bool = True) -> float:
    """ROUGE-1 recall: clipped unigram overlap / reference unigrams, ``rouge_score``'s tokenization (lower-case,
    ``[a-z0-9]`` runs) and, with ``stemmer``, its Porter stemming of tokens longer than 3 characters."""
    from collections import Counter

    ref = Counter(_rouge_tokens(reference, stemmer))
    if not ref:
        return 0.0
    pred = Counter(_rouge_tokens(prediction, stemmer))
    return sum((ref & pred).values()) / sum(ref.values())


def write_heatmap(grid: dict, path, *, title: str = "", metric: str = "exact match") -> str:
    """Write the length × depth heatmap (x: context length, y: needle depth, 0 at the top as in Kamradt's plots).

    ``grid`` is ``{length: {depth: score in [0, 1]}}`` (keys may be strings). Every cell is annotated with its
    score. Uses matplotlib's Agg canvas directly (no pyplot global state). Returns the path written.
    """
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths = sorted(grid, key=lambda x: int(x))
    depths = sorted({d for cells in grid.values() for d in cells}, key=float)
    values = [[float(grid[n].get(d, float("nan"))) for n in lengths] for d in depths]
    fig = Figure(figsize=(max(4.0, 1.0 + 0.7 * len(lengths)), max(3.0, 0.9 + 0.35 * len(depths))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle {metric}", fontsize=9)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None})
    return str(out)


def _digit_groups(value: str) -> set[str]:
    """The value itself and its full 3-digit groups (a trailing 1–2 digit group may repeat across values)."""
    return {value} | {g for g in re.findall(r"\d{1,3}", value) if len(g) == 3}


def _new_value(rng: random.Random, template: str, value_digits: int, taken: set[str]) -> str:
    for _ in range(10_000):
        if template == "passkey":
            v = str(rng.randint(1, 50_000))
        else:
            v = str(rng.randrange(10 ** (value_digits - 1), 10**value_digits))
        if not (_digit_groups(v) & taken):
            return v
    raise RuntimeError("could not draw a value with fresh digit groups")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    idx = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (idx[0], idx[-1] + 1) if idx else (0, 0)


class _SentenceLengths:
    """Token counts of haystack sentences, cached per (tokenizer, sentence)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, sentences: list[str]) -> list[int]:
        missing = [s for s in dict.fromkeys(sentences) if s not in self.cache]
        if missing:
            enc = self.tokenizer([" " + s for s in missing], add_special_tokens=False)["input_ids"]
            self.cache.update({s: len(ids) for s, ids in zip(missing, enc)})
        return [self.cache[s] for s in sentences]


def _assemble(intro: str, hay: list[str], inserts: dict[int, list[str]], question: str):
    """Join intro, haystack sentences with needles inserted before sentence index i, and the question.

    Returns (prompt, {needle text -> char span}) — spans listed in insertion order.
    """
    parts: list[str] = [intro]
    spans: list[tuple[str, int, int]] = []
    pos = len(intro)
    for i in range(len(hay) + 1):
        for needle in inserts.get(i, []):
            pos += 1
            spans.append((needle, pos, pos + len(needle)))
            parts.append(needle)
            pos += len(needle)
        if i < len(hay):
            pos += 1
            parts.append(hay[i])
            pos += len(hay[i])
    body = " ".join(parts)
    prompt = body + "\n" + question
    return prompt, spans


def make_needle_samples(
    tokenizer,
    lengths: Iterable[int],
    depths: Iterable[float],
    *,
    template: str = "magic_number",
    num_distractors: int | None = None,
    haystack: str | None = None,
    seed: int = 0,
    num_samples: int = 1,
    value_digits: int = 7,
) -> list[NeedleSample]:
    """Generate needle samples for every (length, depth, sample index), in that nesting order.

    tokenizer: a Hugging Face tokenizer (callable, fast tokenizers give exact token spans via offsets).
    lengths: prompt sizes in tokens (special tokens included). depths: fractions in [0, 1].
    num_distractors: extra needles with other keys/values (default 3 for ``magic_number``, 0 otherwise).
    haystack: ``"pydoc"``, ``"noise"`` or a path; default per template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    tpl = TEMPLATES[template]
    if num_distractors is None:
        num_distractors = 3 if template == "magic_number" else 0
    if num_distractors and template != "magic_number":
        raise ValueError(f"template {template!r} has one fixed key; distractors need template='magic_number'")
    if not 1 <= value_digits <= 12:
        raise ValueError("value_digits must be in [1, 12]")
    source = haystack if haystack is not None else tpl["haystack"]
    sent_len = _SentenceLengths(tokenizer)
    out: list[NeedleSample] = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= float(depth) <= 1.0:
                raise ValueError(f"depth {depth} outside [0, 1]")
            for index in range(num_samples):
                out.append(
                    _one_sample(
                        tokenizer, sent_len, tpl, template, int(length), float(depth), index, seed, source,
                        num_distractors, value_digits,
                    )
                )
    return out


def _one_sample(tokenizer, sent_len, tpl, template, length, depth, index, seed, source, num_distractors, value_digits):
    rng = random.Random(f"needle-{template}-{seed}-{length}-{depth:.6f}-{index}")
    # 1. haystack window: consecutive sentences from a seeded offset, enough to fill `length` tokens.
    stream = _haystack.sentence_stream(source, seed=f"{seed}-{length}-{index}-{rng.random()}")
    hay: list[str] = []
    total = 0
    while total < length:
        s = next(stream)
        hay.append(s)
        total += sent_len([s])[0]
    hay_words = {w.casefold() for s in hay for w in re.findall(r"[A-Za-z]+", s)}

    # 2. keys and values.
    keys = [k for k in KEY_WORDS if k not in hay_words]
    rng.shuffle(keys)
    n_needles = 1 + num_distractors
    if template == "magic_number":
        if len(keys) < n_needles:
            raise RuntimeError("not enough keys absent from the haystack")
        chosen_keys: list[str | None] = list(keys[:n_needles])
    else:
        chosen_keys = [None]
    taken: set[str] = set()
    values: list[str] = []
    for _ in range(n_needles):
        if template == "kamradt":
            values.append(KAMRADT_ANSWER)
            break
        v = _new_value(rng, template, value_digits, taken)
        taken |= _digit_groups(v)
        values.append(v)
    needles = [tpl["needle"].format(key=k, value=v) for k, v in zip(chosen_keys, values)]
    question = tpl["question"].format(key=chosen_keys[0])
    intro = tpl["intro"]

    # 3. size: largest number of sentences whose prompt fits in `length` tokens (binary search on full prompts).
    def prompt_for(n: int):
        lens = sent_len(hay[:n])
        cum = [0]
        for x in lens:
            cum.append(cum[-1] + x)
        # insertion boundary for the needle: last boundary whose token offset <= depth * haystack tokens
        target = depth * cum[-1]
        b_needle = max(0, bisect.bisect_right(cum, target + 1e-9) - 1)
        inserts: dict[int, list[str]] = {b_needle: [needles[0]]}
        drng = random.Random(f"distractors-{rng_state}-{n}")
        free = [b for b in range(n + 1) if b != b_needle]
        for d in needles[1:]:
            b = drng.choice(free) if free else b_needle
            inserts.setdefault(b, []).append(d)
        return _assemble(intro, hay[:n], inserts, question)

    rng_state = rng.random()
    lo, hi = 0, len(hay)
    while lo < hi:  # largest n with count(prompt(n)) <= length
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, prompt_for(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid - 1
    prompt, spans = prompt_for(lo)
    if lo == 0 and _count(tokenizer, prompt) > length:
        raise ValueError(f"context_length={length} is too small for the {template!r} template's fixed text")
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    needle_text, n_start, n_end = next(sp for sp in spans if sp[0] == needles[0])
    v_start = n_start + needle_text.index(values[0])
    needle_tok = _token_span(offsets, n_start, n_end)
    value_tok = _token_span(offsets, v_start, v_start + len(values[0]))
    answer_tokens = len(tokenizer(" " + values[0], add_special_tokens=False)["input_ids"])
    lead_in = question.rsplit("? ", 1)[-1]  # the question's last sentence, which the answer completes
    sentence_tokens = len(tokenizer(f" {lead_in} {values[0]}.", add_special_tokens=False)["input_ids"])
    distractor_spans = [(a, b) for text, a, b in spans if text != needles[0]]
    return NeedleSample(
        prompt=prompt,
        answer=values[0],
        template=template,
        context_length=length,
        num_tokens=len(ids),
        depth=depth,
        key=chosen_keys[0],
        needle=needle_text,
        needle_char_span=(n_start, n_end),
        needle_token_span=needle_tok,
        value_token_span=value_tok,
        distractor_keys=[k for k in chosen_keys[1:] if k is not None],
        distractor_values=values[1:],
        distractor_char_spans=distractor_spans,
        actual_depth=needle_tok[0] / max(1, len(ids)),
        new_tokens=max(answer_tokens + 1, sentence_tokens + ANSWER_SLACK),
        max_new_tokens=answer_tokens + 2,
        seed=seed,
        index=index,
    )


#: what each ``eval=needle`` option accepts (checked by :func:`validate` before any model loads)
CONSTRAINTS = {
    "lengths": ListOf(Integer(min=1)),
    "depths": Optional(ListOf(Number(0.0, 1.0))),
    "template": Choice(TEMPLATES),
    "num_distractors": Optional(Integer(min=0, max=len(KEY_WORDS) - 1)),
    "samples": Integer(min=1),
    "value_digits": Integer(min=1, max=12),
    "haystack": Optional(AnyOf((Choice(("pydoc", "noise")), ExistingPath("any", text=True, suffixes=(".txt",))))),
    "new_tokens": Optional(Integer(min=1)),
    "query_aware": Boolean(),
    "heatmap": Optional(OutputFile(suffixes=(".png", ".pdf", ".svg"))),
}


def validate(cfg, tokenizer=None) -> None:
    """Check an ``eval=needle`` config before any model loads (one-line :class:`KVCompressError` naming the option,
    the value and what is valid): every option's constraint, distractors only with ``magic_number``, a haystack
    with usable sentences; with the model's ``tokenizer`` (loaded without the weights), every length must hold the
    template's fixed text (intro, needles, question)."""
    check(cfg, CONSTRAINTS, prefix="eval.")
    template = str(option(cfg, "template", "magic_number"))
    distractors = option(cfg, "num_distractors", None)
    if distractors and template != "magic_number":
        raise KVCompressError(f"eval.num_distractors={distractors} with template {template!r}, which has one fixed "
                              "key; valid: eval.num_distractors=0 (or null), or eval.template=magic_number")
    source = option(cfg, "haystack", None) or TEMPLATES[template]["haystack"]
    try:
        _haystack.load_sentences(source)
    except (OSError, ValueError) as err:
        raise KVCompressError(f"eval.haystack={str(source)!r} has no usable text ({err}); valid: pydoc, noise, or "
                              ".txt files of prose") from None
    if tokenizer is not None:
        lengths = [int(x) for x in option(cfg, "lengths", [1024])]
        digits = int(option(cfg, "value_digits", 7))
        need = minimum_length(tokenizer, template, distractors, digits)
        if min(lengths) < need:
            raise KVCompressError(f"eval.lengths={lengths}: {min(lengths)} tokens cannot hold the {template!r} "
                                  f"template's fixed text ({need} tokens with this tokenizer); valid: lengths >= {need}")


def minimum_length(tokenizer, template: str = "magic_number", num_distractors: int | None = None,
                   value_digits: int = 7) -> int:
    """Tokens of a prompt with no haystack at all (intro, every needle, question, special tokens): the smallest
    context length the template fits in."""
    tpl = TEMPLATES[template]
    if num_distractors is None:
        num_distractors = 3 if template == "magic_number" else 0
    keys = [max(KEY_WORDS, key=len)] * (1 + num_distractors)
    value = KAMRADT_ANSWER if template == "kamradt" else "8" * value_digits
    needles = [tpl["needle"].format(key=k, value=value) for k in keys]
    prompt, _ = _assemble(tpl["intro"], [], {0: needles}, tpl["question"].format(key=keys[0]))
    return _count(tokenizer, prompt)


class NeedleTask(Task):
    """``eval=needle`` on the evaluation loop.

    ``cfg`` keys (all optional): ``lengths`` (default [1024]), ``depths`` (default 0, 0.1, …, 1), ``template``
    (``magic_number``), ``num_distractors`` (template default), ``samples`` (per length × depth cell, 1),
    ``value_digits`` (7), ``haystack`` (template default), ``new_tokens`` (default: the template's answer sentence
    + :data:`ANSWER_SLACK` tokens), ``rouge_stemmer`` (True: Porter stemming in ROUGE-1, the Retrieval-Head
    reference's ``use_stemmer=True``),
    ``query_aware`` (True: the prompt with its question is compressed at prefill, as SnapKV/PyramidKV papers do;
    False: the context alone is prefilled and compressed, then the question is appended uncompressed, as kvpress
    does by default — harder, since the compressor cannot see what will be asked; the question is what follows
    the prompt's last newline). ``heatmap`` (None, or a PNG path: the length × depth exact-match heatmap is written
    there). Sample metadata: ``length``, ``depth``, ``tokens`` (prompt tokens), ``answer``.

    Accuracy block: ``exact_match`` and ``rouge1_recall`` overall, ``<metric>@<length>`` per length,
    ``<metric>@d<depth>`` per depth; ``grid`` / ``grid_rouge1_recall`` (``{"<length>": {"<depth>": score}}``, scores
    in [0, 1]); ``scoring`` (the rule of each metric, :data:`SCORING`; ROUGE's says whether it stemmed);
    ``heatmap`` (the PNG's path, when asked).
    """

    name = "needle"
    primary = "exact_match"

    def __init__(self, cfg, seed: int = 0, tokenizer=None):
        if tokenizer is None:
            raise ValueError("the needle evaluation needs the model's tokenizer (model has none)")
        self.tokenizer, self.seed = tokenizer, seed
        self.lengths = [int(x) for x in option(cfg, "lengths", [1024])]
        self.depths = [float(x) for x in option(cfg, "depths", [i / 10 for i in range(11)])]
        self.template = str(option(cfg, "template", "magic_number"))
        self.num_distractors = option(cfg, "num_distractors", None)
        self.haystack = option(cfg, "haystack", None)
        self.num_samples = int(option(cfg, "samples", 1))
        self.value_digits = int(option(cfg, "value_digits", 7))
        self.new_tokens = option(cfg, "new_tokens", None)
        self.query_aware = bool(option(cfg, "query_aware", True))
        self.heatmap = option(cfg, "heatmap", None)
        self.rouge_stemmer = bool(option(cfg, "rouge_stemmer", True))

    def samples(self) -> list[Sample]:
        needles = make_needle_samples(
            self.tokenizer, self.lengths, self.depths, template=self.template, num_distractors=self.num_distractors,
            haystack=self.haystack, seed=self.seed, num_samples=self.num_samples, value_digits=self.value_digits,
        )
        return [
            Sample(prompt=s.prompt, question_start=s.prompt.rindex("\n") + 1,
                   new_tokens=int(self.new_tokens) if self.new_tokens else s.new_tokens, reference=s.answer,
                   meta={"length": s.context_length, "depth": s.depth, "tokens": s.num_tokens, "answer": s.answer})
            for s in needles
        ]

    def score(self, sample: Sample, outcome: Outcome) -> dict:
        return {"exact_match": score_exact_match(outcome.text, sample.reference),
                "rouge1_recall": score_rouge1_recall(outcome.text, sample.reference, self.rouge_stemmer)}

    def summarise(self, samples: list[Sample], records: list[dict]) -> dict:
        hits = [(r["meta"]["length"], r["meta"]["depth"], r["exact_match"], r["rouge1_recall"]) for r in records]
        result = _summarise(hits, self.lengths, self.depths, self.template, self.query_aware, self.heatmap)
        stem = "with the Porter stemmer" if self.rouge_stemmer else "without stemming"
        result["scoring"] = {**SCORING, "rouge1_recall": f"{SCORING['rouge1_recall']}, {stem}"}
        return result


def task(cfg, *, seed: int = 0, tokenizer=None, model=None) -> NeedleTask:
    """The evaluation of an ``eval=needle`` config (the ``kvcompress.run`` protocol)."""
    return NeedleTask(cfg, seed, tokenizer)


def run(model, make_cache, cfg, seed: int = 0, tokenizer=None) -> dict:
    """The accuracy block of :class:`NeedleTask` on ``model`` with a fresh cache from ``make_cache`` per sample."""
    return evaluate(model, NeedleTask(cfg, seed, tokenizer), make_cache, tokenizer=tokenizer).accuracy


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


def _summarise(hits, lengths, depths, template, query_aware, heatmap) -> dict:
    """The accuracy block: metrics overall / per length / per depth, the length × depth grids, the heatmap file."""
    result: dict = {"task": "needle", "template": template, "samples": len(hits), "query_aware": query_aware}
    for col, metric in ((2, "exact_match"), (3, "rouge1_recall")):
        result[metric] = _mean(h[col] for h in hits)
        for length in lengths:
            result[f"{metric}@{length}"] = _mean(h[col] for h in hits if h[0] == length)
        for depth in depths:
            result[f"{metric}@d{depth:g}"] = _mean(h[col] for h in hits if h[1] == depth)
    for col, key in ((2, "grid"), (3, "grid_rouge1_recall")):
        result[key] = {
            str(n): {f"{d:g}": _mean(h[col] for h in hits if h[0] == n and h[1] == d) for d in depths} for n in lengths
        }
    if heatmap:
        result["heatmap"] = write_heatmap(
            result["grid"], heatmap, title=f"needle ({template}) exact match", metric="exact match"
        )
    return result
