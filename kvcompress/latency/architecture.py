"""The architecture numbers of one decoder-only model: :class:`ModelProfile` and its parameter count (built from
presets, config.json files or HF configs by :mod:`kvcompress.latency.model_profile`).

Parameter count (when the preset gives no ``params`` override), biases ignored::

    attention  = d·(n_q·d_h) + 2·d·(n_kv·d_h) + (n_q·d_v)·d          # q, k, v, o projections (d_v = d_h)
    MLA        = q: d·n_q·(d_nope + d_rope)  [or d·r_q + r_q + r_q·n_q·(d_nope + d_rope) with a q LoRA rank r_q]
                 + kv_a: d·(r_kv + d_rope) + r_kv (norm) + kv_b: r_kv·n_q·(d_nope + d_v) + o: n_q·d_v·d
    ffn        = 3·d·f  (gated: gate, up, down)   or   2·d·f  (not gated)
    moe ffn    = E·ffn(f_e) + shared + d·E (router); active: k·ffn(f_e) + shared + d·E
                 shared = ffn(f_shared) (Qwen2-MoE) or n_shared·ffn(f_e) (DeepSeek); the first
                 ``first_dense_layers`` layers (DeepSeek's first_k_dense_replace) are dense with ffn(f)
    norms      = 2·d per layer + d
    embeddings = V·d (input table), plus V·d for an untied lm_head
    P          = L·(attention + norms) + Σ_l ffn_l + d + embeddings
    P_body     = P − V·d − (V·d if untied)      # what the layers compute with: no input table, no lm_head

MoE: all experts sit in HBM (``params_total``); prefill FLOPs follow the active experts (``params_active``); a
decode step of B sequences reads the experts its B·k routing picks touch (:meth:`ModelProfile.decode_weight_params`,
uniform routing).
KV per token and layer (elements) = n_kv · (d_k + d_v): 2·n_kv·d_h for MHA/GQA/MQA, and for MLA one latent of
r_kv + d_rope per token (DeepSeek-V2/V3: 512 + 64; K and V are both rebuilt from it), held by every TP rank. A
sliding-window layer holds min(n, window).

``paper_params`` (Yi-34B-200K's preset: 34e9) is the rounded count Fu 2024 charges; only the ``paper``
convention uses it (:attr:`ModelProfile.paper_params`); ``exact`` counts the architecture (34.39e9 for Yi).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import KVCompressError


@dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of one decoder-only model (see the module docstring for the parameter formulas)."""

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int  #: query/key width per head (MLA: d_nope + d_rope)
    intermediate_size: int
    vocab_size: int
    gated_ffn: bool = True
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    params_total: float = 0.0  #: 0 = computed from the architecture
    params_active: float = 0.0  #: 0 = computed (equals params_total for dense models)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  #: "full" or "sliding" per layer; () = all full
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_shared_experts: int = 0  #: DeepSeek: shared experts of width moe_intermediate_size
    first_dense_layers: int = 0  #: DeepSeek's first_k_dense_replace: the first k layers have a dense FFN
    v_head_dim: int = 0  #: value width per head; 0 = head_dim
    kv_lora_rank: int = 0  #: MLA latent width r_kv (0 = not MLA)
    qk_rope_head_dim: int = 0  #: MLA decoupled RoPE key width (cached once per token)
    q_lora_rank: int = 0  #: MLA query LoRA rank (0 = a plain q projection)
    max_position_embeddings: int = 0  #: the model's context limit (0 = unknown: not checked)
    paper_params: float = 0.0  #: Fu 2024's rounded parameter count (used by the `paper` convention only)

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "vocab_size",
                    "dtype_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KVCompressError(f"model {self.name!r}: {key}={value!r} is invalid; valid: an integer >= 1")
        for key in ("num_experts", "experts_per_token", "num_shared_experts", "first_dense_layers", "v_head_dim",
                    "kv_lora_rank", "qk_rope_head_dim", "q_lora_rank", "max_position_embeddings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KVCompressError(f"model {self.name!r}: {key}={value!r} is invalid; valid: an integer >= 0")
        if self.num_q_heads % self.num_kv_heads:
            raise KVCompressError(f"model {self.name!r}: num_kv_heads={self.num_kv_heads} does not divide "
                                  f"num_q_heads={self.num_q_heads}; valid: a divisor of {self.num_q_heads}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise KVCompressError(f"model {self.name!r}: experts_per_token={self.experts_per_token} with "
                                  f"{self.num_experts} experts; valid: 1..{self.num_experts}")
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise KVCompressError(f"model {self.name!r}: {len(self.layer_types)} layer_types for "
                                  f"{self.num_layers} layers; valid: one entry per layer")
        total, active = _count_params(self)
        if not self.params_total:
            object.__setattr__(self, "params_total", float(total))
        if not self.params_active:
            ratio = active / total if total else 1.0
            object.__setattr__(self, "params_active", float(self.params_total * ratio))

    # ---- attention ---------------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_type(self) -> str:
        """``MLA`` (a latent cache), ``MHA`` (n_kv = n_q), ``MQA`` (n_kv = 1) or ``GQA`` (anything between)."""
        if self.is_mla:
            return "MLA"
        if self.num_kv_heads == self.num_q_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def value_dim(self) -> int:
        """d_v: the value width per head (attention's AV matmul and o_proj)."""
        return self.v_head_dim or self.head_dim

    @property
    def cache_key_dim(self) -> int:
        """Elements cached per token, layer and KV head for K: d_h, or the MLA latent r_kv + d_rope."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def cache_value_dim(self) -> int:
        """Elements cached per token, layer and KV head for V: d_v (0 for MLA: V is rebuilt from the latent)."""
        return 0 if self.is_mla else self.value_dim

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of K and V for one token in one layer: n_kv · (d_k + d_v) · dtype_bytes (2·n_kv·d_h·bytes)."""
        return self.num_kv_heads * (self.cache_key_dim + self.cache_value_dim) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """2 · L · n_kv · d_h · dtype_bytes (every layer holding the token; true while n ≤ any sliding window)."""
        return self.num_layers * self.kv_bytes_per_token_layer

    def layer_tokens(self, context: float) -> list[float]:
        """Tokens each layer holds at ``context``: n for full layers, min(n, window) for sliding layers."""
        w = self.sliding_window
        return [min(context, w) if (t == "sliding" and w) else context for t in self.layer_types]

    def kv_bytes(self, context: float) -> float:
        """Dense KV bytes of one sequence: Σ_l tokens_l(n) · 2 · n_kv · d_h · dtype_bytes."""
        return sum(self.layer_tokens(context)) * self.kv_bytes_per_token_layer

    def attention_flops(self, context: int, matmuls: int = 1) -> float:
        """Causal attention FLOPs of a prefill of n tokens, ``matmuls=1``: QKᵀ alone, Σ_l 2·(n_q·d_h)·Σ_{i=1..n}
        min(i, w_l) (Kaplan et al. 2020's 2·L·n_ctx·d_attn per token summed over the causal prefix ≈ L·d·n², the
        term Fu 2024 uses); ``matmuls=2``: QKᵀ and AV, Σ_l 2·n_q·(d_h + d_v)·Σ_i min(i, w_l) (what a prefill
        computes; the ``exact`` convention). Query heads count, so GQA does not reduce it."""
        n = float(context)
        total = self._causal_pairs(n)
        if matmuls == 1:
            return 2.0 * self.num_q_heads * self.head_dim * total
        return 2.0 * self.num_q_heads * (self.head_dim + self.value_dim) * total

    def _causal_pairs(self, n: float) -> float:
        """Σ_l Σ_{i=1..n} min(i, w_l): the (query, key) pairs of a causal prefill, summed over layers."""
        total = 0.0
        for t in self.layer_types:
            w = self.sliding_window if t == "sliding" else None
            if w and w < n:
                total += w * (w + 1) / 2 + (n - w) * w
            else:
                total += n * (n + 1) / 2
        return total

    def prefix_attention_flops(self, start: float, end: float) -> float:
        """QKᵀ + AV FLOPs of the queries at positions start+1..end over their causal prefix (a prefill after a
        cached prefix of ``start`` tokens): A(end) − A(start) with A = :meth:`attention_flops` (matmuls=2)."""
        per_pair = 2.0 * self.num_q_heads * (self.head_dim + self.value_dim)
        return per_pair * (self._causal_pairs(float(end)) - self._causal_pairs(float(start)))

    def decode_attention_flops(self, held: float) -> float:
        """QKᵀ + AV FLOPs of one decoded token attending over ``held`` cached tokens plus itself:
        Σ_l 2·n_q·(d_h + d_v)·min(held + 1, w_l)."""
        return 2.0 * self.num_q_heads * (self.head_dim + self.value_dim) * sum(self.layer_tokens(held + 1))

    # ---- parameters --------------------------------------------------------------------------------------
    @property
    def embedding_params(self) -> float:
        """V·d: the input embedding table (a lookup: no FLOPs, one row read per token)."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def lm_head_params(self) -> float:
        """V·d: the output projection (its weights are the embedding table when tied)."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def _table_params(self) -> float:
        """Parameters outside the layers: the input table, plus the lm_head when untied."""
        return self.embedding_params * (1 if self.tie_word_embeddings else 2)

    @property
    def body_params_total(self) -> float:
        """P_body: every parameter but the input table and the lm_head (all experts)."""
        return self.params_total - self._table_params

    @property
    def body_params_active(self) -> float:
        """P_body,active: the layers' parameters one token computes with (its k experts)."""
        return self.params_active - self._table_params

    @property
    def moe_layers(self) -> int:
        return max(0, self.num_layers - self.first_dense_layers) if self.is_moe else 0

    @property
    def expert_params(self) -> float:
        """Parameters of one routed expert of one layer: ffn(f_e)."""
        return float(_ffn(self.hidden_size, self.moe_intermediate_size or self.intermediate_size, self.gated_ffn)) \
            if self.is_moe else 0.0

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct routed experts of one layer that ``tokens`` tokens pick (k each, uniform routing):
        E·(1 − (1 − k/E)^tokens); k at one token, → E for many."""
        if not self.is_moe:
            return 0.0
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** max(tokens, 1.0))

    def decode_weight_params(self, tokens: float = 1.0) -> float:
        """Parameters a forward of ``tokens`` tokens reads (decode step of B sequences: tokens = B): the layers'
        active parameters with the experts the batch touches, plus the lm_head (the tied table, when tied);
        the input table is gathered one row per token (``tokens``·d), not read whole."""
        extra = self.moe_layers * (self.experts_touched(tokens) - self.experts_per_token) * self.expert_params
        return self.body_params_active + extra + self.lm_head_params + tokens * self.hidden_size

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights in HBM: params_total · dtype_bytes."""
        return self.params_total * self.dtype_bytes

    @property
    def active_weight_bytes(self) -> float:
        """Bytes of weights read per decode step at batch 1: params_active · dtype_bytes."""
        return self.params_active * self.dtype_bytes

    def with_kv_heads(self, num_kv_heads: int, name: str | None = None) -> ModelProfile:
        """The same model with another KV head count (MHA/GQA/MQA variants); parameter counts are kept."""
        return dataclasses.replace(self, num_kv_heads=num_kv_heads, name=name or f"{self.name}-kv{num_kv_heads}")

    def check_context(self, tokens: int) -> None:
        """One-line error when ``tokens`` (prompt + generated) exceeds the model's position limit."""
        limit = self.max_position_embeddings
        if limit and tokens > limit:
            raise KVCompressError(f"context of {tokens:,} tokens (prompt + output) exceeds {self.name}'s limit of "
                                  f"{limit:,} positions; valid: context + output <= {limit:,}")


def _ffn(d: int, f: int, gated: bool) -> int:
    return (3 if gated else 2) * d * f


def _attention_params(m: ModelProfile) -> int:
    d, nq = m.hidden_size, m.num_q_heads
    if m.is_mla:
        qk = m.head_dim  # d_nope + d_rope
        q = d * nq * qk if not m.q_lora_rank else d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * nq * qk
        nope = m.head_dim - m.qk_rope_head_dim
        kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * nq * (nope + m.value_dim)
        return q + kv + nq * m.value_dim * d
    return d * nq * m.head_dim + 2 * d * m.num_kv_heads * m.head_dim + nq * m.value_dim * d


def _count_params(m: ModelProfile) -> tuple[int, int]:
    d = m.hidden_size
    attn = _attention_params(m)
    dense = _ffn(d, m.intermediate_size, m.gated_ffn)
    if m.is_moe:
        expert = _ffn(d, m.moe_intermediate_size or m.intermediate_size, m.gated_ffn)
        shared = _ffn(d, m.shared_expert_intermediate_size, m.gated_ffn) + m.num_shared_experts * expert
        moe_total = m.num_experts * expert + shared + d * m.num_experts
        moe_active = m.experts_per_token * expert + shared + d * m.num_experts
        n_moe = max(0, m.num_layers - m.first_dense_layers)
        ffn_total = n_moe * moe_total + (m.num_layers - n_moe) * dense
        ffn_active = n_moe * moe_active + (m.num_layers - n_moe) * dense
    else:
        ffn_total = ffn_active = m.num_layers * dense
    emb = m.vocab_size * d * (1 if m.tie_word_embeddings else 2)
    base = m.num_layers * (attn + 2 * d) + d + emb
    return base + ffn_total, base + ffn_active
