"""Fidelity to the full cache: how much a compressed cache changes what the same model generates.

For each sample (a seeded prompt of ``context`` random token ids):

* ``token_agreement`` — fraction of the ``new_tokens`` greedy tokens generated with the compressed cache that equal
  those generated with the full cache (free-running, so one divergence can carry on);
* ``top1_agreement`` and ``kl`` — teacher-forced on the full-cache continuation: at each step, whether the compressed
  cache's next-token argmax equals the full cache's, and ``KL(p_full || p_compressed)`` in nats.

These measure the cache, not the model: they are meaningful for any model, random-init ones included, but they are
not task accuracy. :class:`FidelityTask` runs on :mod:`kvcompress.eval.loop` with ``compare_to_full``: the loop also
generates with the full cache and teacher-forces both caches; the memory block is the teacher-forced cache's.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcompress.constraints import Integer, check

from .loop import Outcome, Sample, Task, evaluate

#: prompts are token ids: any model, with or without a tokenizer
NEEDS_TOKENIZER = False
#: what each ``eval=fidelity`` option accepts (checked by :func:`validate` before any model loads)
CONSTRAINTS = {"samples": Integer(min=1), "context": Integer(min=1), "new_tokens": Integer(min=1)}


def validate(cfg: Any, tokenizer: Any = None) -> None:
    """Check an ``eval=fidelity`` config before any model loads (one-line :class:`KVCompressError`)."""
    check(cfg, CONSTRAINTS, prefix="eval.")


def _prompt(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # a host generator: the same prompt on every device
    return torch.randint(3, vocab_size, (1, length), generator=g, device="cpu")


class FidelityTask(Task):
    """``eval=fidelity``: ``context`` prompt tokens, ``new_tokens`` generated, ``samples`` prompts (seed·1000 + i).
    Sample metadata: ``index``."""
    primary = "token_agreement"

    name = "fidelity"
    compare_to_full = True

    def __init__(self, cfg: Any, seed: int = 0, model: torch.nn.Module | None = None):
        self.context, self.new_tokens, self.num_samples = int(cfg.context), int(cfg.new_tokens), int(cfg.samples)
        self.vocab = model.config.get_text_config().vocab_size
        self.seed = seed

    def samples(self) -> list[Sample]:
        return [Sample(input_ids=_prompt(self.vocab, self.context, self.seed * 1000 + i)[0].tolist(),
                       new_tokens=self.new_tokens, meta={"index": i}) for i in range(self.num_samples)]

    def score(self, sample: Sample, outcome: Outcome) -> dict[str, float]:
        ref = outcome.reference_tokens
        agreement = sum(a == b for a, b in zip(outcome.tokens, ref)) / len(ref)
        top1 = (outcome.logits.argmax(-1) == outcome.reference_logits.argmax(-1)).float().mean().item()
        log_p, log_q = torch.log_softmax(outcome.reference_logits, -1), torch.log_softmax(outcome.logits, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
        return {"token_agreement": agreement, "top1_agreement": top1, "kl": kl}

    def summarise(self, samples: list[Sample], records: list[dict[str, Any]]) -> dict[str, Any]:
        n = self.num_samples
        return {
            "task": "fidelity",
            "samples": n,
            "context": self.context,
            "new_tokens": self.new_tokens,
            "token_agreement": sum(r["token_agreement"] for r in records) / n,
            "top1_agreement": sum(r["top1_agreement"] for r in records) / n,
            "kl": sum(r["kl"] for r in records) / n,
        }


def task(cfg: Any, *, seed: int = 0, tokenizer: Any = None, model: torch.nn.Module | None = None) -> FidelityTask:
    """The evaluation of an ``eval=fidelity`` config (the ``kvcompress.run`` protocol)."""
    return FidelityTask(cfg, seed, model)


def run(model: torch.nn.Module, make_cache: Any, cfg: Any, seed: int = 0, tokenizer: Any = None) -> dict[str, Any]:
    """The accuracy block of :class:`FidelityTask` (samples split across processes under ``accelerate launch`` and
    gathered back in order)."""
    return evaluate(model, FidelityTask(cfg, seed, model), make_cache, tokenizer=tokenizer).accuracy
