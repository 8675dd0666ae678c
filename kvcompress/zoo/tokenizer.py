"""Word-level tokenizer with grouped digits for the testbed models (constructed and learned).

* Spaces become a ``▁`` prefix of the following piece (so decoding reconstructs the text exactly, no spaces are
  invented inside numbers); pieces are ``▁?`` + a run of ASCII letters, ``▁?`` + **1–3 digits** (a 7-digit number is
  three tokens, ``4827193`` → ``▁482 719 3``), ``▁?`` + one other character, a lone ``▁`` or ``\\n``.
* Vocabulary: 4 special tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3), ``\\n`` and ``▁``, every digit group
  ``0``–``999`` (1, 2 and 3 digits, with and without ``▁``), ASCII punctuation (with and without ``▁``) and the words
  of ``assets/testbed_words.txt`` (with and without ``▁``). Unknown pieces map to ``<unk>``.
* The word list is shipped (built once from ``pydoc_data.topics`` prose + the needle templates + the needle keys by
  :func:`write_word_list`), so the vocabulary does not depend on the Python version that builds the model.
* ``<s>`` is prepended to every encoded text; ``padding_side="left"``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

WORDS_FILE = Path(__file__).with_name("assets") / "testbed_words.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
PIECE_PATTERN = r"▁?[0-9]{1,3}|▁?[A-Za-z]+|▁?[^\s0-9A-Za-z▁]|▁|\n"
EXTRA_PUNCTUATION = "’‘“”–—…•→"


def digit_groups() -> list[str]:
    return [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]


def read_word_list(path: Path = WORDS_FILE) -> list[str]:
    return [w for w in path.read_text(encoding="utf-8").split() if w]


def write_word_list(path: Path = WORDS_FILE) -> list[str]:
    """Regenerate the shipped word list (maintainers only; the result is committed)."""
    from kvcompress.eval import haystack, needle

    texts = [haystack.corpus_text("pydoc"), haystack.corpus_text("noise")]
    for tpl in needle.TEMPLATES.values():
        texts += [tpl["intro"], tpl["needle"], tpl["question"]]
    texts.append(" ".join(needle.KEY_WORDS))
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return words


def vocabulary(words: list[str] | None = None) -> dict[str, int]:
    words = read_word_list() if words is None else words
    pieces: list[str] = list(SPECIAL_TOKENS) + ["\n", "▁"]
    punct = list(string.punctuation) + list(EXTRA_PUNCTUATION)
    for group in (digit_groups(), punct, sorted(set(words))):
        for p in group:
            pieces += [p, "▁" + p]
    vocab: dict[str, int] = {}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    return vocab


def build_tokenizer(out_dir: str | Path | None = None, words: list[str] | None = None):
    """Build the ``PreTrainedTokenizerFast``; save it to ``out_dir`` if given. Deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(words)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"[ \t\r\f\v]+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
            pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
