"""``layers`` — keep the full context only in the most important layers; the others keep sinks + a recent window.

Layer-axis selection after SimLayerKV (Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache
Reduction", arXiv 2410.13846) and SqueezeAttention (Wang et al., "SqueezeAttention: 2D Management of KV-Cache in LLM
Inference via Layer-wise Optimal Budget", arXiv 2404.04793).

The number of full layers is ``ceil(ratio · L)`` (at least 1). Every other layer keeps, per row and KV head, its
first ``sink`` real tokens and its last ``window`` real tokens (a StreamingLLM cache). Which layers are full is
decided per batch row at the end of the prefill (``cross_layer``: every layer is scored before any layer selects),
from ``score``:

* ``"lazy"`` (default, SimLayerKV) — a layer is *lazy* when its last ``lazy_queries`` prompt queries put their
  attention mass on the positions the window cache would keep anyway (the first ``sink`` + last ``window`` real
  tokens). Importance = 1 − that mass, averaged over query heads and queries (causal, padding excluded). Lazy layers
  are dropped first. Computed from ``ctx.query[:, :, -lazy_queries:]`` against the layer's keys: a
  ``lazy_queries × n`` score block, never ``n × n``.
* ``"cosine"`` (SqueezeAttention) — importance = 1 − cos(h, h + o_proj(attn)) averaged over the row's real tokens,
  where h is the attention block's input: a layer that barely turns the residual stream is dropped first.
  (SqueezeAttention then clusters the L values with KMeans and re-budgets; here the score only ranks layers.)
* ``"first"`` / ``"last"`` — the first / last ``ceil(ratio · L)`` layers; ``"every_k"`` — evenly spaced layers
  ``floor(i · L / k)``, i < k = ``ceil(ratio · L)`` (stride L/k, starting at layer 0).
* ``"random"`` — the control: layers ranked by a counter hash of ``(seed, layer)`` (the same for every row).

Ties go to the earlier layer. Defaults: ``score="lazy"``, ``sink=4`` (StreamingLLM/SimLayerKV), ``window=None``:
``min(1024, n // 8)`` per row of ``n`` real tokens — SimLayerKV's 1024-token recent window, capped at an eighth of
the context so that short contexts are compressed at all (give an int for a fixed window), ``lazy_queries=1`` (SimLayerKV-prefill scores the last prompt token), ``seed=0``.

Recorded in ``cache.shared["layers"]`` (for the results row): ``kept_layers`` (per row, sorted layer indices),
``layer_importance`` (per row, per layer), ``prefill_saving = "memory-only"``: this is a cache-side method — every
layer's K/V is still computed during the prefill and the saving is memory (and decode attention) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import check_non_negative_int, check_positive_int, unknown_choice
from kvcompress.methods.token.reduced import WINDOW, check_reduced, query_window, reduced_mask
from kvcompress.registry import register
from kvcompress.selection import counter_hash

SCORES = ("lazy", "cosine", "first", "last", "every_k", "random")


def kept_layer_count(ratio: float, num_layers: int) -> int:
    """Full layers kept: ``ceil(ratio · L)``, at least 1 (a tiny epsilon guards float noise such as 0.3·10)."""
    return max(1, min(num_layers, math.ceil(ratio * num_layers - 1e-9)))


def fixed_pattern(score: str, count: int, num_layers: int, seed: int = 0) -> list[int]:
    """Layers kept by a data-independent pattern."""
    if score == "first":
        return list(range(count))
    if score == "last":
        return list(range(num_layers - count, num_layers))
    if score == "every_k":
        return sorted({(i * num_layers) // count for i in range(count)})
    ranks = counter_hash(seed, torch.arange(num_layers, device="cpu"))  # "random" (host: becomes a list)
    order = torch.sort(ranks, descending=True, stable=True).indices
    return sorted(order[:count].tolist())


@register
@dataclass
class Layers(Compressor):
    name = "layers"
    summary = "full context in the most important layers (lazy / cosine / fixed / random), others a window"
    paper = "SimLayerKV, SqueezeAttention"
    axis = Axis.LAYER
    cross_layer = True
    query_window = 1  # select() needs no queries: scores are computed in observe()

    ratio: float = 1.0
    score: str = "lazy"
    sink: int = 4
    window: int | None = None
    lazy_queries: int = 1
    seed: int = 0
    reduced: str = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise unknown_choice("score", self.score, SCORES)
        check_non_negative_int(self.sink, "sink")
        if self.window is not None:
            check_non_negative_int(self.window, "window")
        check_positive_int(self.lazy_queries, "lazy_queries")
        check_reduced(self.reduced)
        self.query_window = query_window(self.reduced)  # a token method in the dropped layers needs its queries

    def prefill_cost(self, config, n: int) -> dict:
        """For the latency model: no layer skips its K/V projection (memory-only saving); the scoring FLOPs added to
        the prefill of ``n`` tokens (lazy: ``lazy_queries × n`` scores per query head and layer; cosine: one more
        ``o_proj`` per layer plus the cosine)."""
        L = config.num_hidden_layers
        hq = config.num_attention_heads
        d_h = getattr(config, "head_dim", None) or config.hidden_size // hq
        if self.score == "lazy":
            extra = L * 2 * hq * min(self.lazy_queries, n) * n * d_h
        elif self.score == "cosine":
            extra = L * (2 * n * hq * d_h * config.hidden_size + 6 * n * config.hidden_size)
        else:
            extra = 0
        if kept_layer_count(self.ratio, L) == L:
            extra = 0  # nothing to rank: scoring is skipped
        return {"prefill_saving": "memory-only", "prefill_skips_kv_layers": (), "extra_prefill_flops": float(extra)}

    # -- scoring (prefill, every prompt query at hand) -----------------------------------------------------------
    def observe(self, view: LayerView, ctx: CompressionContext) -> None:
        shared = ctx.shared
        shared["prefill_saving"] = "memory-only"
        if self.score not in ("lazy", "cosine") or kept_layer_count(self.ratio, ctx.num_layers) == ctx.num_layers:
            return
        imp = self._lazy(view, ctx) if self.score == "lazy" else self._cosine(view, ctx)
        shared.setdefault("_importance", {})[ctx.layer_idx] = imp.double().cpu()

    def _lazy(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """1 − attention mass of the last queries on the sink + recent positions, per row: ``(batch,)``."""
        b, h, n = view.valid.shape
        q = ctx.query[:, :, -self.lazy_queries :].float()  # (b, hq, w, d)
        w = q.shape[2]
        g = q.shape[1] // h
        keys = view.keys.float().repeat_interleave(g, 1)  # (b, hq, n, d)
        scores = (q @ keys.transpose(-1, -2)) * ctx.scaling  # (b, hq, w, n)
        # Query j sits at logical position n − w + j; it sees keys up to itself (causal) that are real tokens.
        qpos = torch.arange(n - w, n, device=q.device).view(1, 1, w, 1)
        kpos = torch.arange(n, device=q.device).view(1, 1, 1, n)
        valid = view.valid[:, :1].unsqueeze(2)  # (b, 1, 1, n): the same for every head at a pristine prefill
        visible = valid & (kpos <= qpos)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
        kept = self.window_mask(view)
        mass = (probs * kept[:, :1].unsqueeze(2)).sum(-1)  # (b, hq, w)
        q_real = valid.squeeze(1).squeeze(1)[:, n - w :]  # (b, w): padding queries do not vote
        weight = q_real.unsqueeze(1).float().expand(b, q.shape[1], w)
        lazy = (mass * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1)
        return 1.0 - lazy

    def _cosine(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        """1 − cosine(h, h + o_proj(attn)) averaged over each row's real tokens: ``(batch,)``."""
        hidden, attn = ctx.hidden_states, ctx.attn_output
        if hidden is None or attn is None:
            raise RuntimeError("layers(score='cosine') needs the attention block's input and output (core hook)")
        b, q_len = attn.shape[:2]
        with torch.no_grad():
            delta = ctx.module.o_proj(attn.reshape(b, q_len, -1))
        h = hidden.float()
        cos = torch.nn.functional.cosine_similarity(h, h + delta.float(), dim=-1)  # (b, q_len)
        real = view.valid[:, 0, -q_len:].float()
        return 1.0 - (cos * real).sum(-1) / real.sum(-1).clamp(min=1)

    # -- selection (after every layer was observed) ---------------------------------------------------------------
    def kept_layers(self, ctx: CompressionContext, batch: int) -> list[list[int]]:
        shared = ctx.shared
        if "kept_layers" in shared and len(shared["kept_layers"]) == batch:
            return shared["kept_layers"]
        L = ctx.num_layers
        count = kept_layer_count(self.ratio, L)
        if count == L:
            kept = [list(range(L))] * batch
        elif self.score in ("lazy", "cosine"):
            imp = torch.stack([shared["_importance"][i] for i in range(L)], -1)  # (batch, L)
            shared["layer_importance"] = imp.tolist()
            order = torch.sort(imp, dim=-1, descending=True, stable=True).indices
            kept = [sorted(order[r, :count].tolist()) for r in range(batch)]
        else:
            kept = [fixed_pattern(self.score, count, L, self.seed)] * batch
        shared.pop("_importance", None)
        shared["kept_layers"] = [list(k) for k in kept]
        return shared["kept_layers"]

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        b = view.valid.shape[0]
        kept = self.kept_layers(ctx, b)
        full = torch.tensor([ctx.layer_idx in kept[r] for r in range(b)], dtype=torch.bool, device=view.valid.device)
        if bool(full.all()):
            return view.valid
        reduced = reduced_mask(view, ctx, self.reduced, self.sink, self.recent_tokens(view))
        return torch.where(full.view(b, 1, 1), view.valid, reduced)

    def recent_tokens(self, view: LayerView) -> torch.Tensor:
        """The recent part of a dropped layer's budget per (row, head): ``window``, or ``min(1024, n // 8)``."""
        n = view.counts
        return torch.clamp(n // 8, max=1024) if self.window is None else torch.full_like(n, self.window)

    def window_mask(self, view: LayerView) -> torch.Tensor:
        """The sink + recent window of each (row, head): what lazy layers attend to (SimLayerKV's test)."""
        return reduced_mask(view, None, WINDOW, self.sink, self.recent_tokens(view))
