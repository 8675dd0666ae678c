"""Reference computations: a full DynamicCache forward loop that masks out what a compressed cache dropped."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from kvcompress.compat import cache_arg


@torch.no_grad()
def masked_reference_logits(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: list[int],
    kept: list[list[list[int]]] | Callable[[int], list[list[int]]],
) -> list[torch.Tensor]:
    """Logits of a batch-1 greedy continuation where decode steps may only see ``kept[layer][head]`` prompt positions
    (plus every decoded position), or, if ``kept`` is a function, exactly ``kept(length)[head]`` positions at the
    step whose query sits at position ``length − 1``.

    The prompt itself is attended in full (compression happens after the prefill forward). The kept set must be the
    same for every layer (a 4-D mask is shared by all layers), per KV head.
    """
    s = prompt.shape[-1]
    cache = DynamicCache()
    out = model(prompt.view(1, -1), **cache_arg(cache))
    logits = [out.logits[0, -1]]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for t, tok in enumerate(new_tokens[:-1]):
        length = s + t + 1
        per_head = kept(length) if callable(kept) else kept[0]
        allowed = torch.zeros(len(per_head), length, dtype=torch.bool)
        for h, positions in enumerate(per_head):
            allowed[h, positions] = True
        if not callable(kept):
            allowed[:, s:] = True
        mask = allowed.repeat_interleave(groups, 0).view(1, -1, 1, length)
        out = model(
            torch.tensor([[tok]]),
            **cache_arg(cache),
            attention_mask=mask,
            position_ids=torch.tensor([[s + t]]),
        )
        logits.append(out.logits[0, -1])
    return logits
