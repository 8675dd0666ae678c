"""A context-once question-answering pipeline, registered with transformers' pipeline registry on import (kvpress's
``kv-press-text-generation`` habit)::

    import kvcompress.pipelines  # registers "kvcompress-text-generation"
    from transformers import pipeline

    pipe = pipeline("kvcompress-text-generation", model=model, tokenizer=tokenizer, method="snapkv", ratio=0.25)
    pipe(context, question="What is ...?", max_new_tokens=32)              # -> {"answer": "..."}
    pipe(context, questions=["q1", "q2", "q3"], answer_prefix="Answer:")   # -> {"answers": ["...", "...", "..."]}

The context (with the tokenizer's special tokens) is prefilled and compressed ONCE; each question (+ ``answer_prefix``)
continues from a copy of the compressed cache: all of it but its last token is appended uncompressed
(:func:`kvcompress.methods.token.scoring.append_uncompressed`), then ``generate`` feeds the last token and decodes
greedily. This is the question-agnostic setting of the evaluations (``eval.query_aware=false``): the answer equals the
one of a fresh compressed cache prefilled with the context alone. Method options: ``method``, ``ratio``, ``budget``,
``params`` (as :func:`kvcompress.compress`), given to ``pipeline(...)`` or per call.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .api import compress
from .compat import cache_arg
from .errors import KVCompressError
from .registry import BASELINE

TASK = "kvcompress-text-generation"


@torch.no_grad()
def answer_questions(model: torch.nn.Module, context_ids: torch.Tensor, question_ids: list[torch.Tensor],
                     cache: Any, *, max_new_tokens: int = 50, **generate_kwargs: Any) -> list[torch.Tensor]:
    """Prefill ``context_ids`` ``(1, n)`` into ``cache`` once (compressed), then per question ``(1, m)`` (m ≥ 1) a copy
    of that cache: the question but its last token appended uncompressed, then greedy decoding. Returns each
    answer's generated token ids."""
    from .methods.token.scoring import append_uncompressed

    if any(q.shape[-1] < 1 for q in question_ids):
        raise KVCompressError("a question (with its answer_prefix) is empty; valid: at least one token to answer")
    model(context_ids, **cache_arg(cache))  # the only prefill of the context: compressed here
    answers = []
    for question in question_ids:
        own = copy.deepcopy(cache)  # the compressed context, untouched by the other questions
        if question.shape[-1] > 1:
            append_uncompressed(model, own, question[:, :-1])
        ids = torch.cat([context_ids, question], dim=-1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, **cache_arg(own), **generate_kwargs)
        answers.append(out[0, ids.shape[-1]:])
    return answers


class KVCompressTextGenerationPipeline(Pipeline):
    """``pipeline("kvcompress-text-generation", ...)``: see the module docstring."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None,
                             answer_prefix: str | None = None, max_new_tokens: int | None = None,
                             method: Any = None, ratio: float | None = None, budget: int | None = None,
                             params: dict | None = None, **generate_kwargs: Any):
        preprocess: dict[str, Any] = {}
        if question is not None and questions is not None:
            raise KVCompressError("give question=... or questions=[...], not both; valid: one of them")
        if question is not None:
            preprocess["questions"], preprocess["single"] = [question], True
        if questions is not None:
            if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
                raise KVCompressError(f"questions={questions!r} is invalid; valid: a list of strings")
            preprocess["questions"], preprocess["single"] = list(questions), False
        if answer_prefix is not None:
            preprocess["answer_prefix"] = answer_prefix
        forward = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("method", method), ("ratio", ratio),
                                     ("budget", budget), ("params", params)) if v is not None}
        forward.update(generate_kwargs)
        return preprocess, forward, {}

    def preprocess(self, context: str, questions: list[str] | None = None, answer_prefix: str = "",
                   single: bool = True) -> dict[str, Any]:
        if not isinstance(context, str) or not context:
            raise KVCompressError(f"context={context!r} is invalid; valid: a non-empty string")
        if not questions:
            raise KVCompressError("no question; valid: question='...' or questions=['...', ...]")
        context_ids = self.tokenizer(context, return_tensors="pt")["input_ids"]
        question_ids = [self.tokenizer(q + answer_prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
                        for q in questions]
        return {"context_ids": context_ids, "question_ids": question_ids, "single": single}

    def _forward(self, inputs: dict[str, Any], max_new_tokens: int = 50, method: Any = BASELINE,
                 ratio: float | None = None, budget: int | None = None, params: dict | None = None,
                 **generate_kwargs: Any) -> dict[str, Any]:
        cache = compress(self.model, method, ratio, budget=budget, params=params, tokenizer=self.tokenizer)
        device = next(self.model.parameters()).device
        answers = answer_questions(self.model, inputs["context_ids"].to(device),
                                   [q.to(device) for q in inputs["question_ids"]], cache,
                                   max_new_tokens=max_new_tokens, **generate_kwargs)
        return {"answers": answers, "single": inputs["single"], "memory": cache.memory_report()}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in outputs["answers"]]
        memory = {k: outputs["memory"][k] for k in ("dense_bytes", "kept_bytes", "kept_fraction_prefill")}
        return {"answer": texts[0], **memory} if outputs["single"] else {"answers": texts, **memory}


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVCompressTextGenerationPipeline,
                                    pt_model=AutoModelForCausalLM)

__all__ = ["TASK", "KVCompressTextGenerationPipeline", "answer_questions"]
