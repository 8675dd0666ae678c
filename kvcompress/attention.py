"""Attention over what a compressed layer holds: the dense buffer, ragged pairs and encoded blocks.

A compressed layer holds, per (row, KV head) pair and in position order: encoded blocks (hidden-axis codecs), then
ragged full-precision entries (:class:`~kvcompress.ragged.Ragged`), then the dense append buffer. Each part yields, per
pair and query, an unnormalised output, the logit offset it used and its softmax mass; :func:`merged_attention`
combines them exactly (log-sum-exp, float32). Logits and the value mix use the cache dtype (as eager attention does),
softmax statistics float32.

The number of ops per call is fixed for the buffer and the ragged part whatever the batch, heads or per-pair counts;
encoded blocks add a fixed number per block (one block per group of pairs, joined across decode-time flushes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer import KVCompressLayer


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Single-query attention ``softmax(q·Kᵀ·s)·V`` by two matmuls, GQA by grouping the query heads of each KV head.
    Faster than the CPU sdpa kernel for one query; on an accelerator the model's own kernel is used instead."""
    b, hq, _, d = query.shape
    h = keys.shape[1]
    q = query.reshape(b, h, hq // h, d)  # query head h*g + j serves KV head h (as repeat_kv)
    probs = torch.softmax((q @ keys.transpose(-1, -2)).float() * scaling, dim=-1).to(values.dtype)
    return (probs @ values).reshape(b, hq, 1, -1).transpose(1, 2)


#: the logit offset of a part holding nothing for a pair (−inf clamped: exp(−inf − offset) stays 0, no NaN)
_LOWEST = torch.finfo(torch.float32).min


def _softmax_part(scores: torch.Tensor, mix: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, max, sum) of float32 ``scores (..., n)``; ``mix(p)`` = p·V."""
    top = scores.amax(-1)
    p = torch.exp(scores - top.clamp(min=_LOWEST).unsqueeze(-1))
    return mix(p), top, p.sum(-1)


def _combine(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax output from parts ``(out (pairs, m, d_v), max (pairs, m), sum (pairs, m))`` that each cover
    every pair: rescale each part to the common maximum and divide (a fixed number of ops for any number of parts)."""
    if len(parts) == 1:
        out, _, total = parts[0]
        return out / total.unsqueeze(-1)
    tops = torch.stack([top for _, top, _ in parts])  # (parts, pairs, m)
    weights = torch.exp(tops - tops.amax(0).clamp(min=_LOWEST))
    total = (weights * torch.stack([t for _, _, t in parts])).sum(0)
    out = (weights.unsqueeze(-1) * torch.stack([o for o, _, _ in parts])).sum(0)
    return out / total.unsqueeze(-1)


def _spread(part: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ids: torch.Tensor, pairs: int):
    """A part computed for the pairs ``ids`` as one covering every pair (nothing held for the others)."""
    out, top, total = part
    full_out = out.new_zeros((pairs, *out.shape[1:])).index_copy_(0, ids, out)
    full_top = top.new_full((pairs, *top.shape[1:]), float("-inf")).index_copy_(0, ids, top)
    return full_out, full_top, total.new_zeros((pairs, *total.shape[1:])).index_copy_(0, ids, total)


def merged_attention(
    query: torch.Tensor, layer: KVCompressLayer, causal: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Exact softmax attention of ``query (batch, q_heads, q_len, d)`` over everything ``layer`` holds; the last
    ``q_len`` buffer entries are this forward's own tokens (``causal (q_len, buffer length)`` hides the later ones).
    Returns ``(batch, q_len, q_heads, d_v)``."""
    b, hq, q_len, d = query.shape
    keys, values = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
    h = keys.shape[1]
    g = hq // h
    pairs, m = b * h, g * q_len
    q = query.reshape(pairs, m, d)  # query head h*g + j serves KV head h (as repeat_kv); rows (j, query)
    parts = []
    every_pair = tuple(range(pairs))
    for seg in layer.segments:  # encoded blocks (the order of parts does not matter for an exact merge)
        whole = seg.pairs == every_pair  # a dense layer's block: every pair, in order (host check)
        ids = None if whole else seg.rows * h + seg.heads
        qs = (q if whole else q.index_select(0, ids)).float()
        codec = seg.codec
        if codec.attends_directly:
            part = _softmax_part(codec.scores(qs, layer.cache.workspace) * scaling,
                                 lambda p, c=codec: c.mix(p, layer.cache.workspace))
        else:
            seg_k, seg_v = seg.kv(layer.cache.workspace, torch.float32)  # reconstructed, one block at a time
            part = _softmax_part((qs @ seg_k.transpose(-1, -2)) * scaling, lambda p, v=seg_v: p @ v)
        parts.append(part if whole else _spread(part, ids, pairs))
    if layer.ragged is not None:
        parts.append(layer.ragged.attend(q.to(layer.ragged.keys.dtype), scaling))
    if keys.shape[-2] > 0:
        scores = (q.view(b, h, m, d).to(keys.dtype) @ keys.transpose(-1, -2)).float() * scaling  # (b, h, m, n)
        if causal is not None:
            scores = scores.view(b, h, g, q_len, -1).masked_fill(~causal, float("-inf")).view(b, h, m, -1)
        out, top, total = _softmax_part(scores, lambda p: (p.to(values.dtype) @ values).float())
        parts.append((out.view(pairs, m, -1), top.view(pairs, m), total.view(pairs, m)))
    out = _combine(parts)
    return out.view(b, hq, q_len, -1).transpose(1, 2).to(query.dtype)
