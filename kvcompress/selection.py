"""Budgets and selection helpers shared by the selection methods (layer, head and token axes): kept counts from a
ratio or budget, top-k masks with ties to the earlier position, sink + recent windows, and a counter-based hash for
seeded draws that do not depend on the batch."""

from __future__ import annotations

import torch

from .compressor import LayerView


def kept_counts(n_valid: torch.Tensor, ratio: float = 1.0, budget: int | None = None) -> torch.Tensor:
    """Entries to keep per (row, head): ``min(budget, n)`` if a budget is given, else ``clamp(round(ratio·n), 1, n)``.

    Never empties a non-empty head, never exceeds what is there (a budget larger than the context keeps everything).
    ``ratio`` and ``budget`` are alternatives: :func:`make_compressor`, :func:`~kvcompress.build_pipeline` and the
    methods' constructors reject both (:func:`check_ratio_or_budget`), so the precedence here is never a choice.
    """
    if budget is not None:
        return torch.minimum(n_valid, torch.full_like(n_valid, budget))
    kept = torch.round(n_valid.double() * ratio).long()
    return torch.minimum(torch.clamp(kept, min=1), n_valid)


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[b, h]`` highest-scoring valid entries of each (row, head).

    Ties are broken towards the earlier position (stable sort), so selection is deterministic.
    """
    scores = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k.unsqueeze(-1)) & valid


def sink_and_recent_mask(view: LayerView, sink: int, kept: torch.Tensor) -> torch.Tensor:
    """Keep the first ``sink`` valid entries and the most recent ``kept − sink`` of each (row, head)."""
    rank = view.rank()
    n = view.counts.unsqueeze(-1)
    recent = (kept.unsqueeze(-1) - sink).clamp(min=0)
    return view.valid & ((rank < sink) | (rank >= n - recent))


def counter_hash(*parts: torch.Tensor | int) -> torch.Tensor:
    """A counter-based pseudo-random number in [0, 1) from integer inputs (broadcast), SplitMix64-style.

    Unlike a stateful generator, the value for (seed, layer, head, rank) does not depend on the batch it is drawn in,
    which keeps batched rows independent of one another. The draw lives on the device of the tensor parts (the CPU
    when every part is an int).
    """
    mask = (1 << 62) - 1
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
    x = torch.zeros((), dtype=torch.long, device=device)
    for i, p in enumerate(parts):
        p = torch.as_tensor(p, dtype=torch.long, device=device)
        x = (x * 1_000_003 + p + (i + 1) * 0x9E3779B9) & mask
        x = ((x ^ (x >> 31)) * 0x5851F42D) & mask
        x = ((x ^ (x >> 29)) * 0x14057B7E) & mask
        x = x ^ (x >> 32)
    return (x & ((1 << 24) - 1)).double() / float(1 << 24)
