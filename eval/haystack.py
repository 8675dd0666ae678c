"""Offline haystack text for needle / passkey tests.

Sources (all available without network):

* ``"pydoc"`` — the Python standard library's ``pydoc_data.topics`` documentation (about 465K characters of technical
  English), cleaned into prose sentences: code blocks, grammar productions and headings are dropped.
* ``"noise"`` — the passkey filler of Mohtashami & Jaggi (2023): "The grass is green. The sky is blue. ..." repeated.
* a path — a ``.txt`` file or a directory of ``.txt`` files (read in sorted order), split into sentences the same way.

Everything is deterministic: the sentence list depends only on the source (and, for ``"pydoc"``, on the Python
version's copy of the docs); a haystack window is chosen by a seeded offset into it.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_HEADING_RULE = re.compile(r"^\s*([*=\-~^#+])\1{3,}\s*$")


def _is_code_or_markup(line: str) -> bool:
    return line.startswith((" ", "\t")) or "::=" in line or line.lstrip().startswith((">>>", "...", "|", "+--"))


def split_sentences(text: str) -> list[str]:
    """Split documentation-like text into prose sentences.

    Paragraphs are separated by blank lines; a paragraph that contains indented (code) lines, grammar productions
    or heading underlines is dropped. Kept sentences end with ``.``, ``!`` or ``?``, are 20–400 characters long and
    mostly letters.
    """
    sentences: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(_is_code_or_markup(ln) or _HEADING_RULE.match(ln) for ln in lines):
            continue
        flat = re.sub(r"\s+", " ", " ".join(lines)).strip()
        for sent in _SENTENCE_SPLIT.split(flat):
            sent = sent.strip()
            if not (20 <= len(sent) <= 400) or sent[-1] not in ".!?":
                continue
            letters = sum(ch.isalpha() or ch == " " for ch in sent)
            if letters < 0.8 * len(sent):
                continue
            sentences.append(sent)
    return sentences


@functools.lru_cache(maxsize=1)
def pydoc_sentences() -> tuple[str, ...]:
    """Prose sentences of ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        out.extend(split_sentences(topics[name]))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _file_sentences(path: str) -> tuple[str, ...]:
    p = Path(path)
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .txt files under {p}")
    out: list[str] = []
    for f in files:
        out.extend(split_sentences(f.read_text(encoding="utf-8", errors="replace")))
    if not out:
        raise ValueError(f"no usable sentences in {p}")
    return tuple(out)


def load_sentences(source: str | Path = "pydoc") -> tuple[str, ...]:
    """The ordered sentence list of a haystack source: ``"pydoc"``, ``"noise"`` or a path (.txt file or directory)."""
    if isinstance(source, str) and source == "pydoc":
        return pydoc_sentences()
    if isinstance(source, str) and source == "noise":
        return NOISE_SENTENCES
    return _file_sentences(str(Path(source).expanduser().resolve()))


def sentence_stream(source: str | Path = "pydoc", *, seed: int | str = 0):
    """Yield sentences forever from a seeded random offset, wrapping around the source.

    The ``"noise"`` source always starts at its first sentence (its order is part of the passkey protocol).
    """
    sentences = load_sentences(source)
    start = 0 if source == "noise" else random.Random(f"haystack-{seed}").randrange(len(sentences))
    i = start
    while True:
        yield sentences[i % len(sentences)]
        i += 1


def corpus_text(source: str | Path = "pydoc") -> str:
    """All sentences of a source joined by spaces (used to build the testbed tokenizer's vocabulary)."""
    return " ".join(load_sentences(source))
