"""The evaluation loop: every evaluation (needle, RULER, LongBench, fidelity) is a :class:`Task` run by :func:`evaluate`.

A task supplies its samples (a prompt as text or token ids, where its question starts, how many tokens to generate,
the reference, metadata such as length and depth) and scores each outcome; it then summarises the per-sample
records into the accuracy block. The loop owns everything in between, once for every evaluation:

* **cache creation**: a fresh cache per sample from the caller's ``make_cache`` (a compressed cache, or ``None`` for
  the model's own);
* **the query-aware / question-agnostic split**: query-aware (the default), the whole prompt with its question is
  prefilled and compressed; question-agnostic (``task.query_aware = False``), the context up to
  ``sample.question_start`` is prefilled and compressed, the question is appended uncompressed with the library's
  :func:`~kvcompress.methods.token.scoring.append_uncompressed` (all of it but its last token), then ``generate``
  feeds the last prompt token and decodes as usual. A sample whose split point is unknown or out of range falls
  back to query-aware and says so in its record (``fell_back``);
* **generation**: greedy ``model.generate`` of exactly ``sample.new_tokens`` new tokens (fewer only when an EOS /
  stop token ends the answer early); every evaluation states its own count (needle: the template's answer sentence
  restated + 2 tokens);
* **sharding and gathering**: under ``accelerate launch`` each process evaluates samples ``rank, rank + world, …``
  and the records are gathered back in sample order (:mod:`kvcompress.distributed`), so the accuracy block is the
  one a single process computes;
* **the cache report**: :func:`evaluate` returns the accuracy block, the memory block of the first sample's cache
  (:func:`kvcompress.results.memory_block`), what the methods decided for it, and one record per sample (its ``id``
  in sample order, metadata, prediction, reference, scores, kept fraction right after the prefill and after
  generation, kept bytes and the method state that differs from the first sample's).

Tasks that compare with the uncompressed cache (``compare_to_full = True``: fidelity) also get the full cache's
greedy tokens and the teacher-forced next-token logits of both caches on them; their memory block is the
teacher-forced cache's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from kvcompress.compat import cache_arg
from kvcompress.distributed import gather, is_main_process, shard
from kvcompress.results import jsonable, memory_block

CacheFactory = Callable[[], Any]


def option(cfg: Any, key: str, default: Any) -> Any:
    """``cfg[key]`` of a dict / DictConfig / object, ``default`` when absent or null."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


@dataclass
class Sample:
    """One prompt of a task.

    ``prompt`` (text, tokenized by the loop with special tokens) or ``input_ids`` (used as they are).
    ``question_start``: where the question starts, a character offset into ``prompt`` or a token index into
    ``input_ids`` — the question-agnostic split (None: no split, the sample is always query-aware).
    ``new_tokens``: tokens to generate. ``reference``: what the task's scorer compares with. ``meta``: JSON-able
    metadata kept in the sample's record (length, depth, task, ...). ``stop``: EOS / stop token ids (None: the
    model's). ``min_new_tokens``: tokens generated before a stop token may end the answer."""

    prompt: str | None = None
    input_ids: list[int] | None = None
    question_start: int | None = None
    new_tokens: int = 16
    reference: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    stop: list[int] | None = None
    min_new_tokens: int | None = None


@dataclass
class Outcome:
    """What the loop produced for one sample: the generated ``tokens`` and their ``text`` (None without a
    tokenizer); with ``compare_to_full`` also the full cache's tokens and both caches' teacher-forced logits."""

    tokens: list[int]
    text: str | None
    fell_back: bool = False
    reference_tokens: list[int] | None = None
    logits: torch.Tensor | None = None
    reference_logits: torch.Tensor | None = None


class Task:
    """An evaluation: samples, a per-sample scorer and a summary. Subclasses set ``name`` and may set
    ``query_aware`` (default True) and ``compare_to_full`` (default False)."""

    name: str = "task"
    query_aware: bool = True
    compare_to_full: bool = False
    #: the key of :meth:`score`'s result that is the sample's score (higher is better): the predictions sidecar's
    #: ``score`` and the error-analysis table's order
    primary: str = "score"

    def samples(self) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, outcome: Outcome) -> dict[str, Any]:
        """JSON-able fields of the sample's record (its scores, and whatever :meth:`summarise` needs)."""
        raise NotImplementedError

    def summarise(self, samples: list[Sample], records: list[dict[str, Any]]) -> dict[str, Any]:
        """The accuracy block from every sample's record (in sample order; each has ``meta``, ``prediction`` and the
        fields :meth:`score` returned)."""
        raise NotImplementedError


@dataclass
class EvalResult:
    """``accuracy``: the task's summary. ``memory``: the memory block of the first sample's cache (empty for a cache
    that is not a ``KVCompressCache``). ``method_state``: what the methods decided for that sample. ``samples``: one
    record per sample, in order. ``seconds``: wall time per sample."""

    accuracy: dict[str, Any]
    memory: dict[str, Any]
    method_state: dict[str, Any]
    samples: list[dict[str, Any]]
    seconds: list[float]


def _is_compressed(cache: Any) -> bool:
    from kvcompress.cache import KVCompressCache

    return isinstance(cache, KVCompressCache)


def _split_index(sample: Sample, tokenizer: Any, n: int) -> int | None:
    """Token index where the question starts, or None when unknown or not strictly inside the prompt."""
    if sample.question_start is None:
        return None
    if sample.input_ids is not None:
        index: int | None = int(sample.question_start)
    else:
        offsets = tokenizer(sample.prompt, return_offsets_mapping=True)["offset_mapping"]
        index = next((i for i, (a, b) in enumerate(offsets) if b > a and a >= sample.question_start), None)
    return index if index is not None and 0 < index < n else None


def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: Any, sample: Sample, pad: int | None) -> list[int]:
    kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": int(sample.new_tokens)}
    if pad is not None:
        kwargs["pad_token_id"] = pad
    if sample.stop is not None:
        kwargs["eos_token_id"] = sample.stop
    if sample.min_new_tokens:
        kwargs["min_new_tokens"] = sample.min_new_tokens
    if cache is not None:
        kwargs.update(cache_arg(cache))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, ids.shape[1] :].tolist()


def _continuation_logits(model: torch.nn.Module, ids: torch.Tensor, tokens: list[int], cache: Any) -> torch.Tensor:
    """Next-token logits after the prompt and after each of ``tokens[:-1]`` (teacher forcing), one step at a time."""
    out = model(ids, **cache_arg(cache), logits_to_keep=1)
    logits = [out.logits[0, -1].float()]
    for tok in tokens[:-1]:
        out = model(torch.tensor([[tok]], device=ids.device), **cache_arg(cache))
        logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


@torch.no_grad()
def run_sample(
    model: torch.nn.Module, sample: Sample, make_cache: CacheFactory, *, tokenizer: Any = None,
    query_aware: bool = True, compare_to_full: bool = False,
) -> tuple[Outcome, Any]:
    """Evaluate one sample (see the module docstring); returns its outcome and the cache to report."""
    from transformers import DynamicCache

    from kvcompress.methods.token.scoring import append_uncompressed

    device = next(model.parameters()).device
    if sample.input_ids is not None:
        ids = torch.tensor([list(sample.input_ids)], device=device)
    else:
        ids = tokenizer(sample.prompt, return_tensors="pt")["input_ids"].to(device)
    n = ids.shape[1]
    pad = None
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache = make_cache()
    fell_back = False
    if not query_aware:
        split = _split_index(sample, tokenizer, n)
        if split is None:
            fell_back = True
        else:
            model(ids[:, :split], **cache_arg(cache))  # the context alone: prefilled and compressed
            if split < n - 1:  # the question (but its last token, which generate feeds), not compressed
                if _is_compressed(cache):
                    append_uncompressed(model, cache, ids[:, split : n - 1])
                else:
                    model(ids[:, split : n - 1], **cache_arg(cache))
    tokens = _generate(model, ids, cache, sample, pad)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    outcome = Outcome(tokens, text, fell_back)
    if compare_to_full:
        outcome.reference_tokens = _generate(model, ids, DynamicCache(), sample, pad)
        outcome.reference_logits = _continuation_logits(model, ids, outcome.reference_tokens, DynamicCache())
        cache = make_cache()
        outcome.logits = _continuation_logits(model, ids, outcome.reference_tokens, cache)
    return outcome, cache


def _state_diff(state: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per method, the entries of ``state`` whose value differs from ``base``'s."""
    out = {}
    for name, entries in state.items():
        ref = base.get(name, {})
        if isinstance(entries, dict) and isinstance(ref, dict):
            changed = {k: v for k, v in entries.items() if ref.get(k) != v}
        else:
            changed = entries if entries != ref else {}
        if changed:
            out[name] = changed
    return out


def evaluate(model: torch.nn.Module, task: Task, make_cache: CacheFactory, *, tokenizer: Any = None) -> EvalResult:
    """Run ``task`` through ``model`` with a fresh cache from ``make_cache`` per sample; see the module docstring."""
    samples = task.samples()
    local: list[tuple[dict[str, Any], float]] = []
    memory: dict[str, Any] = {}
    first = True
    for sample in tqdm(shard(samples), desc=task.name, leave=False, disable=not is_main_process()):
        start = time.perf_counter()
        outcome, cache = run_sample(model, sample, make_cache, tokenizer=tokenizer, query_aware=task.query_aware,
                                    compare_to_full=task.compare_to_full)
        record: dict[str, Any] = {"meta": dict(sample.meta)}
        if outcome.text is not None:
            record["prediction"] = outcome.text
        if sample.reference is not None:
            record["reference"] = jsonable(sample.reference)
        if not task.query_aware:
            record["fell_back"] = outcome.fell_back
        record.update(task.score(sample, outcome))
        if _is_compressed(cache):
            report = cache.memory_report()
            record.update(kept_fraction=report["kept_fraction"], kept_fraction_prefill=report["kept_fraction_prefill"],
                          kept_bytes=report["kept_bytes"], method_state=jsonable(cache.shared))
            if first:  # this process's first sample (the first sample of all on the main process)
                memory = memory_block(cache, model.config)
        first = False
        del cache
        local.append((record, time.perf_counter() - start))
    gathered = gather(local, len(samples))  # every process gets every sample's record, in sample order
    records = [r for r, _ in gathered]
    for index, record in enumerate(records):  # the sample's id: its index in the task's sample order
        record["id"] = index
    method_state = records[0].get("method_state", {}) if records else {}
    for record in records:
        if "method_state" in record:
            record["method_state"] = _state_diff(record["method_state"], method_state)
            if not record["method_state"]:
                del record["method_state"]
    accuracy = task.summarise(samples, records)
    return EvalResult(accuracy, memory, method_state, records, [s for _, s in gathered])


__all__ = ["EvalResult", "Outcome", "Sample", "Task", "evaluate", "option", "run_sample"]
