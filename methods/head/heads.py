"""``heads`` — keep the best-scoring KV heads in full, the others a sink + recent window; ``heads_random`` — the
same budget with random heads (the control).

Retrieval heads: Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024
(arXiv 2404.15574). Full-vs-window head split: DuoAttention (Xiao et al. 2024, arXiv 2410.10819) and
RazorAttention (Tang et al. 2024, arXiv 2407.15891).

* ``ratio`` = fraction of all KV heads of the model (layers × KV heads) kept in full, chosen globally by score
  (DuoAttention-style): ``k = ceil(ratio · layers · kv_heads)``, **rounded up, at least one head** — a warning says
  so when the kept fraction differs from ``ratio`` (e.g. ratio 0.02 of 6 heads keeps 1 head, 0.167).
* The other KV heads keep their first ``sink=4`` and last ``recent=32`` real tokens of the prompt (per row, by rank,
  so left padding and other rows never matter). Tokens decoded afterwards are appended to every head.
* Storage is real: a layer whose heads keep different counts is stored in the cache's packed ragged layout (no
  padding between full and window heads), and attention over it is exact, in a fixed number of ops.
* ``scores="auto"`` (default): the head-score artifact of this model, found by its config hash and weights
  fingerprint in ``$KVCOMPRESS_CACHE/heads`` (``python -m kvcompress.methods.head detect model=...``; the methods'
  ``prepare`` step, :func:`kvcompress.methods.head.scores.ensure_scores`, computes it on first use when a tokenizer is
  given, and re-detects a cached one that does not fit the model, saying why). If there is none (no tokenizer, or a
  cache built without ``kvcompress.compress``, so the model is unknown), a warning says so and heads are scored **per
  prompt**: for each row, the attention mass that the last ``query_window=16`` prompt queries put outside the
  sink + recent window (what windowing the head would lose); then ``ceil(ratio · kv_heads)`` heads per layer are
  kept in full, per row. ``scores="prompt"`` forces that; ``scores=PATH`` uses an artifact file, which must have
  been made for this model (config hash, weights fingerprint, sizes) and be valid — otherwise a one-line error.
* With an artifact the head choice is the same for every row (it depends only on the artifact).
* ``heads_random``: ``k`` heads drawn by a counter hash of ``(seed, layer, head)`` (default ``seed=0``); no
  artifact needed.
* Prefill phase only (as kvpress's presses).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import Axis, CompressionContext, Compressor, LayerView
from kvcompress.errors import KVCompressError, check_non_negative_int
from kvcompress.methods.token.reduced import check_reduced, reduced_mask
from kvcompress.registry import register
from kvcompress.selection import counter_hash

#: prompt queries used by the per-prompt fallback score
QUERY_WINDOW = 16


def heads_to_keep(ratio: float, total: int) -> int:
    """``ceil(ratio · total)``, at least 1 (rounding guards against float noise such as 0.1 · 30)."""
    return max(1, min(total, math.ceil(round(ratio * total, 9))))


def _say_rounding(name: str, ratio: float, k: int, total: int) -> None:
    if abs(k / total - ratio) > 1e-9:
        warnings.warn(
            f"{name}: ratio={ratio:g} of {total} KV heads rounds up to {k} head{'s' * (k != 1)} kept in full "
            f"(kept fraction {k / total:.3f})",
            stacklevel=3,
        )


def window_probs(view: LayerView, ctx: CompressionContext, w: int = QUERY_WINDOW) -> torch.Tensor:
    """Attention probabilities of the last ``w`` prompt queries over the view: ``(batch, q_heads, w, n)``; rows of
    queries that are padding (or see no valid entry) are zero. Causal when the view is the prefill buffer."""
    q = ctx.query[:, :, -w:].float()
    b, hq, wq, _ = q.shape
    g = hq // view.keys.shape[1]
    keys = view.keys.float().repeat_interleave(g, 1)
    scores = (q @ keys.transpose(-1, -2)) * ctx.scaling  # (b, hq, w, n)
    n = view.keys.shape[2]
    allowed = view.valid.repeat_interleave(g, 1).unsqueeze(2).expand(b, hq, wq, n)
    q_valid = torch.ones(b, wq, dtype=torch.bool, device=view.valid.device)
    if n == ctx.query.shape[2]:  # the prefill buffer: entry i is prompt token i, so mask causally
        causal = torch.ones(wq, n, dtype=torch.bool, device=view.valid.device).tril(n - wq)
        allowed = allowed & causal
        q_valid = view.valid[:, 0, n - wq :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs * q_valid[:, None, :, None]


def out_of_window_mass(view: LayerView, ctx: CompressionContext, sink: int, recent: int) -> torch.Tensor:
    """Per-prompt head score ``(batch, kv_heads)``: mean attention mass of the last prompt queries outside the
    sink + recent window, max over the query heads of each KV head."""
    probs = window_probs(view, ctx)  # (b, hq, w, n)
    rank = view.rank()
    n = view.counts.unsqueeze(-1)
    outside = view.valid & (rank >= sink) & (rank < n - recent)  # (b, h, n)
    b, h = view.valid.shape[:2]
    g = probs.shape[1] // h
    mass = (probs * outside.repeat_interleave(g, 1).unsqueeze(2)).sum(-1)  # (b, hq, w)
    q_count = (probs.sum(-1) > 0).sum(-1).clamp(min=1)
    return (mass.sum(-1) / q_count).view(b, h, g).amax(-1)


def _top_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``(batch, heads)``: the ``k`` best heads per row (ties to the lower head index)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    full = torch.zeros_like(scores, dtype=torch.bool)
    full.scatter_(-1, order[:, :k], True)
    return full


def prepare_scores(spec: str, model: torch.nn.Module, tokenizer: Any) -> str | None:
    """The ``prepare`` step of the head-score methods: with ``scores="auto"`` and a tokenizer, make sure the model's
    retrieval-head scores exist (detected with needle probes on first use or when the cached artifact does not fit,
    with a message). Without a tokenizer nothing is done: the methods score heads per prompt and say so when they
    run."""
    if spec != "auto" or tokenizer is None:
        return None
    from kvcompress.methods.head.scores import ensure_scores

    path = ensure_scores(model, tokenizer)
    if path is None:
        return None
    return f"retrieval-head scores: {path}" + ("" if path.is_file() else " (in memory: the cache is not writable)")


def resolve_scores(comp: Compressor, ctx: CompressionContext) -> dict | None:
    """The scores a head method uses (None = per-prompt scoring), resolved once per cache: with ``scores="auto"`` those
    of the model owning ``ctx.module`` (:func:`kvcompress.artifacts.model_of`; its config and weights), with a warning
    and per-prompt scoring when there are none; ``scores=PATH`` validated against that model (or, when it is unknown,
    the module's config)."""
    if "artifact" in ctx.shared:
        return ctx.shared["artifact"]
    from kvcompress.artifacts import ArtifactError, model_of
    from kvcompress.methods.head.scores import artifact_path, find_scores, load_scores

    spec = comp.scores
    model = model_of(ctx.module)
    fallback = "scoring heads per prompt instead"
    data = None
    if spec == "auto" and model is None:
        warnings.warn(f"{comp.name}: the model of this cache is unknown (built without kvcompress.compress), so its "
                      f"head scores cannot be found by its weights; {fallback} (create the cache with "
                      "kvcompress.compress(model, ...))", stacklevel=3)
    elif spec == "auto":
        try:
            data = find_scores(model)
        except ArtifactError as err:
            warnings.warn(f"{comp.name}: {err}; {fallback} (run `python -m kvcompress.methods.head detect "
                          "model=...`, or pass a tokenizer to kvcompress.compress to re-detect)", stacklevel=3)
        else:
            if data is None:
                warnings.warn(
                    f"{comp.name}: no head scores for this model (expected {artifact_path(model)}); {fallback} (run "
                    "`python -m kvcompress.methods.head detect model=...` to detect retrieval heads)",
                    stacklevel=3,
                )
    elif spec != "prompt":
        data = load_scores(spec, model if model is not None else ctx.module.config)
    ctx.shared["artifact"] = data
    return data


@dataclass
class _HeadSplit(Compressor):
    """Shared by ``heads`` and ``heads_random``: full heads keep everything, the others a reduced context of
    ``sink + recent`` tokens (:mod:`kvcompress.methods.token.reduced`: the window by default)."""

    axis = Axis.HEAD

    ratio: float = 1.0
    sink: int = 4
    recent: int = 32
    reduced: str = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative_int(self.sink, "sink")
        check_non_negative_int(self.recent, "recent")
        check_reduced(self.reduced)

    def full_heads(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        raise NotImplementedError

    def _global_choice(self, ctx: CompressionContext, order: list[tuple[int, int]], view: LayerView) -> torch.Tensor:
        b = view.valid.shape[0]
        total = ctx.num_layers * ctx.num_kv_heads
        if "kept" not in ctx.shared:
            k = heads_to_keep(self.ratio, total)
            _say_rounding(self.name, self.ratio, k, total)
            ctx.shared["kept"] = set(order[:k])
        full = torch.tensor([(ctx.layer_idx, h) in ctx.shared["kept"] for h in range(ctx.num_kv_heads)],
                            device=view.valid.device)
        return full.unsqueeze(0).expand(b, -1)

    def select(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        full = self.full_heads(view, ctx)  # (batch, kv_heads) bool
        if bool(full.all()):
            return view.valid
        reduced = reduced_mask(view, ctx, self.reduced, self.sink, self.recent)
        return torch.where(full.unsqueeze(-1), view.valid, reduced)


@register
@dataclass
class Heads(_HeadSplit):
    name = "heads"
    summary = "detected retrieval heads in full, others sink + recent"
    paper = "Wu et al. 2024; DuoAttention"

    scores: str = "auto"

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        return prepare_scores(self.scores, model, tokenizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scores, str) or not self.scores:
            raise KVCompressError(f"scores={self.scores!r} is invalid; valid: auto, prompt, or a path to a head-score artifact")

    def full_heads(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        b, h = view.valid.shape[:2]
        if self.ratio >= 1.0:
            return torch.ones(b, h, dtype=torch.bool, device=view.valid.device)
        data = resolve_scores(self, ctx)
        if data is None:
            k = heads_to_keep(self.ratio, h)
            if "said" not in ctx.shared:
                ctx.shared["said"] = True
                _say_rounding(self.name + " (per layer, per prompt)", self.ratio, k, h)
            return _top_heads(out_of_window_mass(view, ctx, self.sink, self.recent), k)
        from kvcompress.methods.head.scores import kv_order

        if "order" not in ctx.shared:
            ctx.shared["order"] = kv_order(data)
        return self._global_choice(ctx, ctx.shared["order"], view)


@register
@dataclass
class HeadsRandom(_HeadSplit):
    name = "heads_random"
    summary = "random heads in full (the control of `heads`), others sink + recent"
    paper = "—"

    seed: int = 0

    def full_heads(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        h = view.valid.shape[1]
        if "order" not in ctx.shared:  # host metadata: the draw becomes a Python list right away
            draw = counter_hash(self.seed, torch.arange(ctx.num_layers, device="cpu").view(-1, 1),
                                torch.arange(h, device="cpu").view(1, -1))
            flat = torch.sort(draw.flatten(), descending=True, stable=True).indices.tolist()
            ctx.shared["order"] = [(i // h, i % h) for i in flat]
        return self._global_choice(ctx, ctx.shared["order"], view)
