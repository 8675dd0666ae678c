"""``think`` — query-driven key channel pruning (ThinK).

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025 (arXiv 2407.21018).

For every (row, KV head) the key channels are scored with the observation window's queries and the lowest-scoring
are dropped: the cache stores only the kept key channels (and their indices); values are untouched, so the savings
are on the key half of the cache. ``ratio`` is the fraction of key channels kept.

Choices (stated, since the paper leaves them open or differs):

* Score of channel ``c`` (ThinK's ``‖Q[:, c] K[:, c]ᵀ‖_F = ‖Q[:, c]‖ · ‖K[:, c]‖``) with ``Q`` the last ``window``
  post-RoPE prompt queries of the row (its real tokens only) of **all query heads of the GQA group stacked** (so
  the group shares one channel set, as a KV head must), and ``K`` all the row's real prompt keys of that KV head.
* Channels are pruned in **RoPE pairs** ``(c, c + head_dim/2)``: post-RoPE, a pair is rotated by a position-dependent
  angle, so the energy of one channel moves to its partner from token to token while the pair's energy does not.
  A pair's score is the sum of its two channels' scores; ``round(ratio · head_dim/2)`` pairs are kept (at least 1).
* The choice is made once per layer at prefill (over the whole prompt, before any token-axis selection) and kept in
  the layer's state (int16 indices, counted as cache memory); decode-time flushes reuse it.
* Attention applies the same channel selection to the queries (``q[kept] · k[kept]``) and reads only the stored
  channels; ``decode()`` (for scorers that need full-width keys) zero-fills the dropped channels, which gives the
  same scores.
* The newest ``residual`` tokens stay whole in the append buffer (flushed in chunks of 32); ``residual=32``.

Defaults: ``ratio=0.5`` (ThinK's 50% channel pruning), ``window=32`` (SnapKV's observation window), ``residual=32``.
The per-layer relative Frobenius error of the pruned K (V is exact) is in ``cache.shared["think"]["recon_error"]``
when the cache is created with ``diagnostics=True`` (the run CLI does; off by default: it decodes every encoded block).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kvcompress.compressor import Codec, CompressionContext, LayerView, Workspace
from kvcompress.errors import check_non_negative_int, check_positive_int
from kvcompress.methods.hidden.packing import ResidualHidden
from kvcompress.registry import register

CHUNK = 32


class PrunedKeyCodec(Codec):
    """Kept key channels ``(pairs, count, k)`` + their indices ``(pairs, k)`` (int16); values as they are."""

    attends_directly = True
    joinable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, channels: torch.Tensor):
        self.dim = keys.shape[-1]
        self.channels = channels.to(torch.int16)
        idx = channels.long().unsqueeze(1).expand(-1, keys.shape[1], -1)
        self.keys = keys.gather(-1, idx)
        self.values = values

    def decode(self, workspace: Workspace | None = None, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p, n, _ = self.keys.shape
        full = self.keys.new_zeros((p, n, self.dim), dtype=dtype)
        full.scatter_(-1, self.channels.long().unsqueeze(1).expand(-1, n, -1), self.keys.to(full.dtype))
        return full, self.values.to(full.dtype)

    def scores(self, query: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """The query restricted to the kept channels (ThinK's masked query) times the stored key channels."""
        idx = self.channels.long().unsqueeze(1).expand(-1, query.shape[1], -1)
        return query.gather(-1, idx) @ self.keys.float().transpose(-1, -2)

    def mix(self, probs: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        return probs @ self.values.float()

    def concat(self, later: PrunedKeyCodec) -> PrunedKeyCodec | None:
        if later.dim != self.dim or not torch.equal(later.channels, self.channels):
            return None
        joined = copy.copy(self)
        joined.keys = torch.cat([self.keys, later.keys], 1)
        joined.values = torch.cat([self.values, later.values], 1)
        return joined

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.channels, self.values]


def channel_scores(keys: torch.Tensor, key_valid: torch.Tensor, query: torch.Tensor, query_valid: torch.Tensor,
                   groups: int) -> torch.Tensor:
    """ThinK scores ``(batch, kv_heads, head_dim)``: ‖Q[:, c]‖ over the group's valid window queries × ‖K[:, c]‖ over
    the valid keys. keys ``(b, h, n, d)``, key_valid ``(b, h, n)``, query ``(b, h·groups, w, d)``, query_valid ``(b, w)``."""
    b, h, _, d = keys.shape
    k2 = (keys.float().pow(2) * key_valid.unsqueeze(-1)).sum(2)  # (b, h, d)
    q = query.float().reshape(b, h, groups * query.shape[2], d)  # query head h·groups + j serves KV head h
    qv = query_valid.repeat(1, groups)[:, None, :, None]  # (b, 1, g·w, 1)
    q2 = (q.pow(2) * qv).sum(2)
    return q2.sqrt() * k2.sqrt()


def pair_choice(scores: torch.Tensor, kept_pairs: int) -> torch.Tensor:
    """Kept channel indices ``(..., 2·kept_pairs)``, sorted, from channel scores ``(..., d)`` (RoPE pairs c, c + d/2);
    ties go to the lower pair index."""
    half = scores.shape[-1] // 2
    pair = scores[..., :half] + scores[..., half:]
    order = torch.sort(pair, dim=-1, descending=True, stable=True).indices[..., :kept_pairs]
    order = torch.sort(order, dim=-1).values
    return torch.cat([order, order + half], -1)


@register
@dataclass
class Think(ResidualHidden):
    name = "think"
    summary = "query-driven key channel pruning (RoPE pairs)"
    paper = "ThinK (Xu et al. 2025)"

    ratio: float = 0.5
    window: int = 32
    residual: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.window, "window")
        check_non_negative_int(self.residual, "residual")

    def chunk_tokens(self) -> int:
        return CHUNK

    def kept_pairs(self, head_dim: int) -> int:
        return max(1, min(head_dim // 2, round(self.ratio * head_dim / 2)))

    def observe(self, view: LayerView, ctx: CompressionContext) -> None:
        """Choose each (row, KV head)'s channels from the prompt (its real keys and last ``window`` real queries)."""
        w = min(self.window, ctx.query.shape[2])
        query = ctx.query[:, :, -w:]
        tok_valid = view.valid[:, 0]  # (b, n): padding is the same for every head of a row
        if tok_valid.shape[1] == ctx.query.shape[2]:
            q_valid = tok_valid[:, -w:]
        else:
            q_valid = torch.ones(query.shape[0], w, dtype=torch.bool, device=query.device)
        scores = channel_scores(view.keys, view.valid, query, q_valid, ctx.num_kv_groups)
        ctx.state["channels"] = pair_choice(scores, self.kept_pairs(view.keys.shape[-1])).to(torch.int16)

    def encode_block(self, keys, values, rows, heads, ctx: CompressionContext) -> PrunedKeyCodec:
        chosen = ctx.state.get("channels")
        if chosen is None:  # no prefill observation (e.g. prompt fed with the cache paused): score this block
            b, h = ctx.query.shape[0], ctx.num_kv_heads
            w = min(self.window, ctx.query.shape[2])
            k = keys.new_zeros((b, h, keys.shape[1], keys.shape[2]))
            valid = torch.zeros(b, h, keys.shape[1], dtype=torch.bool, device=keys.device)
            k[rows, heads], valid[rows, heads] = keys, True
            scores = channel_scores(k, valid, ctx.query[:, :, -w:], torch.ones(b, w, dtype=torch.bool, device=keys.device),
                                    ctx.num_kv_groups)
            chosen = ctx.state["channels"] = pair_choice(scores, self.kept_pairs(keys.shape[-1])).to(torch.int16)
        return PrunedKeyCodec(keys, values, chosen[rows, heads])
