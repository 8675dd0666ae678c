"""Fidelity to the full cache: how much a compressed cache changes what the same model generates.

For each sample (a seeded prompt of ``context`` tokens):

* ``token_agreement`` — fraction of the ``new_tokens`` greedy tokens generated with the compressed cache that equal
  those generated with the full cache (free-running, so one divergence can carry on);
* ``top1_agreement`` and ``kl`` — teacher-forced on the full-cache continuation: at each step, whether the compressed
  cache's next-token argmax equals the full cache's, and ``KL(p_full || p_compressed)`` in nats.

These measure the cache, not the model: they are meaningful for any model, random-init ones included, but they are
not task accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

from kvcompress.distributed import gather, is_main_process, shard

from ..compat import cache_arg

CacheFactory = Callable[[], Any]


def _prompt(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # a host generator: the same prompt on every device
    return torch.randint(3, vocab_size, (1, length), generator=g, device="cpu")


@torch.no_grad()
def _continuation_logits(model: torch.nn.Module, prompt: torch.Tensor, tokens: list[int], cache: Any) -> torch.Tensor:
    """Next-token logits after the prompt and after each of ``tokens[:-1]`` (teacher forcing), one step at a time."""
    out = model(prompt, **cache_arg(cache), logits_to_keep=1)
    logits = [out.logits[0, -1].float()]
    for tok in tokens[:-1]:
        out = model(torch.tensor([[tok]], device=prompt.device), **cache_arg(cache))
        logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


@torch.no_grad()
def run(model: torch.nn.Module, make_cache: CacheFactory, cfg: Any, seed: int = 0, tokenizer: Any = None) -> dict[str, Any]:
    """Returns the accuracy block and the cache of the first sample (for its memory report). Samples are split
    across processes under ``accelerate launch`` and gathered back in order."""
    context, new_tokens, samples = int(cfg.context), int(cfg.new_tokens), int(cfg.samples)
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    local, first_cache = [], None
    for i in tqdm(shard(range(samples)), desc="fidelity", leave=False, disable=not is_main_process()):
        prompt = _prompt(vocab, context, seed * 1000 + i).to(device)
        full = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **cache_arg(DynamicCache()))
        ref_tokens = full[0, context:].tolist()
        cache = make_cache()
        ours = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **cache_arg(cache))
        our_tokens = ours[0, context:].tolist()
        agreement = sum(a == b for a, b in zip(our_tokens, ref_tokens)) / len(ref_tokens)
        ref_logits = _continuation_logits(model, prompt, ref_tokens, DynamicCache())
        cache = make_cache()
        our_logits = _continuation_logits(model, prompt, ref_tokens, cache)
        first_cache = first_cache or cache
        top1 = (our_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        log_p, log_q = torch.log_softmax(ref_logits, -1), torch.log_softmax(our_logits, -1)
        local.append((agreement, top1, (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()))
    token_agree, top1s, kls = zip(*gather(local, samples))
    return {
        "task": "fidelity",
        "samples": samples,
        "context": context,
        "new_tokens": new_tokens,
        "token_agreement": sum(token_agree) / samples,
        "top1_agreement": sum(top1s) / samples,
        "kl": sum(kls) / samples,
        "_cache": first_cache,
    }
