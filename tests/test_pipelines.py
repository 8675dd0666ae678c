"""The context-once pipeline (``pipeline("kvcompress-text-generation")``) and ``KVCompressCache.crop``."""

from __future__ import annotations

import copy

import pytest
import torch

import kvcompress
import kvcompress.pipelines  # noqa: F401  (registers the task)
from kvcompress.compat import cache_arg
from kvcompress.errors import KVCompressError
from kvcompress.methods.token.scoring import append_uncompressed


@pytest.fixture(scope="module")
def testbed():
    from kvcompress.zoo import testbed_path
    from kvcompress.zoo.testbed import load

    return load(testbed_path())


FACTS = {"fox": "4827193", "owl": "9035521", "cat": "1274406"}


def _context() -> str:
    from kvcompress.eval.haystack import pydoc_sentences

    filler = " ".join(pydoc_sentences()[:40])
    parts = [filler[:600]]
    for key, value in FACTS.items():
        parts += [f"The special magic number for {key} is: {value}.", filler[600:900]]
    return " ".join(parts)


def _fresh_answer(model, tok, context: str, question: str, **method) -> str:
    """The question-agnostic reference: a fresh compressed cache prefilled with the context alone."""
    ctx = tok(context, return_tensors="pt")["input_ids"]
    q = tok(question, add_special_tokens=False, return_tensors="pt")["input_ids"]
    cache = kvcompress.compress(model, **method)
    with torch.no_grad():
        model(ctx, **cache_arg(cache))
        append_uncompressed(model, cache, q[:, :-1])
        ids = torch.cat([ctx, q], dim=-1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             **cache_arg(cache))
    return tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)


@pytest.mark.parametrize("method", [dict(method="snapkv", ratio=0.3), dict(method="quant"),
                                    dict(method="heads", ratio=0.5)])
def test_questions_share_one_compressed_prefill(testbed, method: dict) -> None:
    from transformers import pipeline

    model, tok = testbed
    context = _context()
    n_ctx = tok(context, return_tensors="pt")["input_ids"].shape[-1]
    questions = [f"What is the special magic number for {key}? The special magic number for {key} is:" for key in FACTS]
    kvcompress.compress(model, tokenizer=tok, **method)  # per-model set-up first (heads: detection probes)
    prefills = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: prefills.append(args[0].shape[-1]) if args[0].shape[-1] >= n_ctx else None)
    try:
        pipe = pipeline("kvcompress-text-generation", model=model, tokenizer=tok, **method)
        result = pipe(context, questions=questions, max_new_tokens=8)
    finally:
        hook.remove()
    assert prefills == [n_ctx]  # the context went through the model once, for all three questions
    assert result["kept_bytes"] < result["dense_bytes"] and len(result["answers"]) == 3
    for question, answer in zip(questions, result["answers"]):
        assert answer == _fresh_answer(model, tok, context, question, **method)
    single = pipe(context, question=questions[1], max_new_tokens=8)
    assert single["answer"] == result["answers"][1]


def test_pipeline_bad_input_is_one_line(testbed) -> None:
    from transformers import pipeline

    model, tok = testbed
    pipe = pipeline("kvcompress-text-generation", model=model, tokenizer=tok, method="snapkv", ratio=0.5)
    for kwargs, needle in ((dict(question="a", questions=["b"]), "not both"), (dict(), "no question"),
                           (dict(questions="abc"), "questions='abc'")):
        with pytest.raises(KVCompressError, match=needle):
            pipe("some context", **kwargs)


def test_crop_removes_tokens_appended_after_the_compression(testbed) -> None:
    model, tok = testbed
    ids = tok(_context(), return_tensors="pt")["input_ids"]
    question = tok(" What is the special magic number for owl?", add_special_tokens=False,
                   return_tensors="pt")["input_ids"]
    cache = kvcompress.compress(model, "snapkv", ratio=0.3)
    with torch.no_grad():
        model(ids, **cache_arg(cache))
        before = copy.deepcopy(cache)
        append_uncompressed(model, cache, question)
    n = ids.shape[-1]
    assert cache.get_seq_length() == n + question.shape[-1]
    cache.crop(n)
    assert cache.get_seq_length() == n and cache.kept_bytes() == before.kept_bytes()
    for mine, theirs in zip(cache.layers, before.layers):
        assert torch.equal(mine.keys[:, :, : mine.length], theirs.keys[:, :, : theirs.length])
    with pytest.raises(KVCompressError, match="cannot crop to 10: layer 0 was compressed at"):
        cache.crop(10)  # into the compressed prompt: refused, nothing changed
    assert cache.get_seq_length() == n
