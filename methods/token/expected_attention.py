"""``expected_attention`` — closed-form expected attention of future queries, times the value norm (kvpress).

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution"
(arXiv 2510.00636); kvpress ``presses/expected_attention_press.py``.

Future queries are modelled as a Gaussian N(μ, Σ) fitted per query head to the row's prompt queries (its first
``sink`` tokens excluded), rotated by RoPE averaged over the next ``n_future`` positions: with R̄ the mean rotation,
μ' = R̄μ and Σ' = R̄ΣR̄ᵀ. The expected exp-logit of key k is exp(k·μ'/√d + ½·kᵀΣ'k/d); its softmax over the row's
keys (sinks excluded), averaged over the GQA group (``gqa="mean"``), plus ``epsilon`` and times ‖v‖₂
(``use_vnorm``), is the score. The ``sink`` first tokens are always kept.

Faithful RoPE handling without re-projecting hidden states: the cached queries are post-RoPE; each is un-rotated by
its position, and the future positions are placed after the row's last token. Positions are counted from the row's
first real token; a constant offset (left padding under a manual loop) cancels, since RoPE rotations compose
additively. The inverse frequencies are read from the model's rotary embedding in :meth:`ExpectedAttention.prepare`
(its class rebuilt from its config in float32; partial rotary, as Phi-3, is handled; RoPE ``attention_scaling``
cancels between un-rotating and re-rotating).

Defaults (kvpress): ``n_future=512``, ``sink=4``, ``use_covariance=True``, ``use_vnorm=True``, ``epsilon=0``
(kvpress's evaluation registry wraps it in AdaKV with ε = 1e-2: ``allocation=adakv epsilon=0.01``). The covariance
is the population one (divided by N). Prefill only here (kvpress reaches decode through ``DecodingPress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvcompress.compressor import CompressionContext, LayerView
from kvcompress.errors import KVCompressError, check_positive_int
from kvcompress.methods.token.scoring import (
    ScoredTokenCompressor,
    check_gqa,
    group_reduce,
    needs_all_queries,
    query_validity,
)
from kvcompress.registry import register


def rope_inv_freq(comp: ExpectedAttention, cache: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    """The model's inverse RoPE frequencies ``(rotary_dim / 2,)`` (found by :meth:`ExpectedAttention.prepare`), on
    ``device``: one copy per device, memoised in ``cache``."""
    if comp._inv_freq is None:
        raise KVCompressError("expected_attention needs the model's RoPE frequencies; valid: create the cache with "
                              "kvcompress.compress(model, ...) (its prepare step reads them from the model)")
    on_device = cache.setdefault("inv_freq", {})
    key = str(torch.device(device))
    if key not in on_device:
        on_device[key] = comp._inv_freq.to(device)
    return on_device[key]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply ``x·cos + rotate_half(x)·sin`` to the first ``cos.shape[-1]`` channels (the rest pass through)."""
    rd = cos.shape[-1]
    rot = x[..., :rd] * cos + _rotate_half(x[..., :rd]) * sin
    return torch.cat([rot, x[..., rd:]], dim=-1) if rd < x.shape[-1] else rot


@register
@dataclass
class ExpectedAttention(ScoredTokenCompressor):
    name = "expected_attention"
    summary = "closed-form expected attention of future queries × ‖v‖, sinks"
    paper = "Expected Attention (kvpress)"

    sink: int = 4
    n_future: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gqa(self.gqa)
        self._inv_freq: torch.Tensor | None = None
        check_positive_int(self.n_future, "n_future")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise KVCompressError(f"epsilon={self.epsilon!r} is invalid; valid: a number >= 0")

    def prepare(self, model: torch.nn.Module, tokenizer: Any = None) -> str | None:
        """Read the inverse RoPE frequencies from the model's rotary embedding: rebuilt from its own class and config
        in float32 (the module's buffer follows the model's dtype)."""
        rotary = next((m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
        if rotary is None:
            raise KVCompressError(f"expected_attention needs RoPE; {type(model).__name__} has no rotary embedding")
        self._inv_freq = type(rotary)(config=rotary.config).inv_freq.float()
        return None

    def future_query_stats(self, view: LayerView, ctx: CompressionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """μ' ``(batch, q_heads, d)`` and Σ' ``(batch, q_heads, d, d)`` of the RoPE-averaged future queries."""
        q = ctx.query.float()
        b, hq, s, d = q.shape
        inv_freq = rope_inv_freq(self, ctx.shared, q.device)
        qv = query_validity(view, s)  # (b, s)
        pos = (qv.long().cumsum(-1) - 1).clamp(min=0).double()
        angle = torch.cat([pos[..., None] * inv_freq.double()] * 2, dim=-1)  # (b, s, rd)
        pre = _rotate(q, angle.cos().float()[:, None], -angle.sin().float()[:, None])  # R(-p)·q
        use = qv & (pos >= self.sink)
        use = torch.where(use.any(-1, keepdim=True), use, qv)  # a row no longer than its sinks: use every query
        w = use.float()[:, None, :, None]
        count = w.sum(2).clamp(min=1)  # (b, 1, 1)
        mu = (pre * w).sum(2) / count  # (b, hq, d)
        centered = (pre - mu[:, :, None]) * w
        cov = centered.transpose(-1, -2) @ centered / count[..., None]  # (b, hq, d, d)
        # Mean rotation over the future positions n_row .. n_row + n_future − 1.
        start = qv.sum(-1).double()  # (b,)
        future = start[:, None] + torch.arange(self.n_future, dtype=torch.float64, device=q.device)  # (b, F)
        f_angle = future[..., None] * inv_freq.double()  # (b, F, rd/2)
        cos_bar = torch.cat([f_angle.cos().mean(1)] * 2, -1).float()[:, None]  # (b, 1, rd)
        sin_bar = torch.cat([f_angle.sin().mean(1)] * 2, -1).float()[:, None]
        mu_rot = _rotate(mu, cos_bar, sin_bar)
        eye = torch.eye(d, device=q.device).expand(b, 1, d, d)
        m = _rotate(eye, cos_bar[:, :, None], sin_bar[:, :, None]).transpose(-1, -2)  # (b, 1, d, d): M
        cov_rot = m @ cov @ m.transpose(-1, -2)
        return mu_rot, cov_rot

    def score(self, view: LayerView, ctx: CompressionContext) -> torch.Tensor:
        needs_all_queries(self, view, ctx)
        mu, cov = self.future_query_stats(view, ctx)
        b, hq, d = mu.shape
        h = view.valid.shape[1]
        g = hq // h
        keys = view.keys.float().repeat_interleave(g, 1)  # (b, hq, n, d); transient
        scaling = ctx.scaling
        logits = (keys @ mu[..., None]).squeeze(-1) * scaling
        if self.use_covariance:
            logits = logits + 0.5 * scaling**2 * ((keys @ cov) * keys).sum(-1)
        scored = view.valid & (view.rank() >= self.sink)
        logits = logits.masked_fill(~scored.repeat_interleave(g, 1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        scores = group_reduce(probs, h, self.gqa)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * torch.linalg.vector_norm(view.values.float(), dim=-1)
        return scores
