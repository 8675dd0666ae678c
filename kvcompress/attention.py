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
    from .cache import KVCompressLayer


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Single-query attention ``softmax(q·Kᵀ·s)·V`` by two matmuls, GQA by grouping the query heads of each KV head.
    Faster than the CPU sdpa kernel for one query; on an accelerator the model's own kernel is used instead."""
    b, hq, _, d = query.shape
    h = keys.shape[1]
    q = query.reshape(b, h, hq // h, d)  # query head h*g + j serves KV head h (as repeat_kv)
    probs = torch.softmax((q @ keys.transpose(-1, -2)).float() * scaling, dim=-1).to(values.dtype)
    return (probs @ values).reshape(b, hq, 1, -1).transpose(1, 2)


class _Accumulator:
    """Running (output, max, sum) per pair and query, merged part by part (log-sum-exp)."""

    def __init__(self, pairs: int, m: int, d_v: int, device: torch.device):
        self.out = torch.zeros(pairs, m, d_v, device=device)
        self.top = torch.full((pairs, m), float("-inf"), device=device)
        self.total = torch.zeros(pairs, m, device=device)

    def add(self, out: torch.Tensor, top: torch.Tensor, total: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Merge a part covering every pair (``ids`` None) or the pairs ``ids``."""
        cur_top = self.top if ids is None else self.top[ids]
        new_top = torch.maximum(cur_top, top)
        shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))
        a_old, a_new = torch.exp(cur_top - shift), torch.exp(top - shift)
        if ids is None:
            self.out.mul_(a_old.unsqueeze(-1)).add_(out * a_new.unsqueeze(-1))
            self.total.mul_(a_old).add_(total * a_new)
            self.top = new_top
            return
        self.out[ids] = self.out[ids] * a_old.unsqueeze(-1) + out * a_new.unsqueeze(-1)
        self.total[ids] = self.total[ids] * a_old + total * a_new
        self.top[ids] = new_top


def _softmax_part(scores: torch.Tensor, mix: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, max, sum) of float32 ``scores (..., n)``; ``mix(p)`` = p·V."""
    top = scores.amax(-1)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - shift.unsqueeze(-1))
    return mix(p), top, p.sum(-1)


def merged_attention(query: torch.Tensor, layer: KVCompressLayer, causal: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Exact softmax attention of ``query (batch, q_heads, q_len, d)`` over everything ``layer`` holds; the last
    ``q_len`` buffer entries are this forward's own tokens (``causal (q_len, buffer length)`` hides the later ones).
    Returns ``(batch, q_len, q_heads, d_v)``."""
    b, hq, q_len, d = query.shape
    keys, values = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
    h = keys.shape[1]
    g = hq // h
    pairs, m = b * h, g * q_len
    q = query.reshape(pairs, m, d)  # query head h*g + j serves KV head h (as repeat_kv); rows (j, query)
    acc = _Accumulator(pairs, m, values.shape[-1], query.device)
    for seg in layer.segments:  # encoded blocks, oldest first (order does not matter for an exact merge)
        ids = seg.rows * h + seg.heads
        qs = q[ids].float()
        codec = seg.codec
        if hasattr(codec, "scores"):
            acc.add(*_softmax_part(codec.scores(qs, layer.cache.workspace) * scaling,
                                   lambda p: codec.mix(p, layer.cache.workspace)), ids=ids)
        else:
            seg_k, seg_v = seg.kv(layer.cache.workspace, torch.float32)  # reconstructed, one block at a time
            acc.add(*_softmax_part((qs @ seg_k.transpose(-1, -2)) * scaling, lambda p: p @ seg_v), ids=ids)
    if layer.ragged is not None:
        acc.add(*layer.ragged.attend(q.to(layer.ragged.keys.dtype), scaling))
    if keys.shape[-2] > 0:
        scores = (q.view(b, h, m, d).to(keys.dtype) @ keys.transpose(-1, -2)).float() * scaling  # (b, h, m, n)
        if causal is not None:
            scores = scores.view(b, h, g, q_len, -1).masked_fill(~causal, float("-inf")).view(b, h, m, -1)
        out, top, total = _softmax_part(scores, lambda p: (p.to(values.dtype) @ values).float())
        acc.add(out.view(pairs, m, -1), top.view(pairs, m), total.view(pairs, m))
    out = acc.out / acc.total.unsqueeze(-1)
    return out.view(b, hq, q_len, -1).transpose(1, 2).to(query.dtype)
