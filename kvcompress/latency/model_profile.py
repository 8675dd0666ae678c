"""Model profiles: the architecture numbers the serving model needs, from any HF config.

A :class:`ModelProfile` is built from (a) a preset name under ``configs/model/`` (``yi-34b-200k``, ...), (b) a
local directory or ``config.json`` file, (c) a ``transformers.PretrainedConfig``, or (d) a plain dict of
config.json fields.

Parameter count (when the preset gives no ``params`` override), biases ignored::

    attention  = d·(n_q·d_h) + 2·d·(n_kv·d_h) + (n_q·d_h)·d          # q, k, v, o projections
    ffn        = 3·d·f  (gated: gate, up, down)   or   2·d·f  (not gated)
    moe ffn    = E·ffn(f_e) + ffn(f_shared) + d·E (router); active: k·ffn(f_e) + ffn(f_shared) + d·E
    norms      = 2·d per layer + d
    embeddings = V·d, plus V·d for an untied lm_head
    P          = L·(attention + ffn + 2·d) + d + embeddings

MoE assumption: all experts sit in HBM (``params_total``); prefill FLOPs and the weight bytes read per decode step
follow the active experts (``params_active``), which is exact at batch 1 and a lower bound for larger batches.
KV per token (bytes) = 2 (K and V) · L · n_kv · d_h · dtype_bytes; a sliding-window layer holds min(n, window).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import KVCompressError, unknown_choice

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float64": 8, "float8": 1}
_GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "granite", "deepseek_v2", "deepseek_v3"}
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}


@dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of one decoder-only model (see the module docstring for the parameter formulas)."""

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
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

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "vocab_size",
                    "dtype_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KVCompressError(f"model {self.name!r}: {key}={value!r} is invalid; valid: an integer >= 1")
        if self.num_q_heads % self.num_kv_heads:
            raise KVCompressError(f"model {self.name!r}: num_kv_heads={self.num_kv_heads} does not divide "
                                  f"num_q_heads={self.num_q_heads}; valid: a divisor of {self.num_q_heads}")
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
    def attention_type(self) -> str:
        """``MHA`` (n_kv = n_q), ``MQA`` (n_kv = 1) or ``GQA`` (anything between)."""
        if self.num_kv_heads == self.num_q_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of K and V for one token in one layer: 2 · n_kv · d_h · dtype_bytes."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

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

    def attention_flops(self, context: int) -> float:
        """Causal attention FLOPs of a prefill of n tokens: Σ_l 2 · (n_q·d_h) · Σ_{i=1..n} min(i, w_l).

        (Kaplan et al. 2020: 2·L·n_ctx·d_attn per token; summed over the causal prefix that is ≈ L·d·n², the
        term Fu 2024 uses.) QKᵀ and AV use the query heads, so GQA does not reduce this term.
        """
        d_attn = self.num_q_heads * self.head_dim
        n = float(context)
        total = 0.0
        for t in self.layer_types:
            w = self.sliding_window if t == "sliding" else None
            if w and w < n:
                total += w * (w + 1) / 2 + (n - w) * w
            else:
                total += n * (n + 1) / 2
        return 2.0 * d_attn * total

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


def _ffn(d: int, f: int, gated: bool) -> int:
    return (3 if gated else 2) * d * f


def _count_params(m: ModelProfile) -> tuple[int, int]:
    d, dh = m.hidden_size, m.head_dim
    attn = d * m.num_q_heads * dh * 2 + 2 * d * m.num_kv_heads * dh
    if m.is_moe:
        expert = _ffn(d, m.moe_intermediate_size or m.intermediate_size, m.gated_ffn)
        shared = _ffn(d, m.shared_expert_intermediate_size, m.gated_ffn)
        ffn_total = m.num_experts * expert + shared + d * m.num_experts
        ffn_active = m.experts_per_token * expert + shared + d * m.num_experts
    else:
        ffn_total = ffn_active = _ffn(d, m.intermediate_size, m.gated_ffn)
    emb = m.vocab_size * d * (1 if m.tie_word_embeddings else 2)
    base = m.num_layers * (attn + 2 * d) + d + emb
    return base + m.num_layers * ffn_total, base + m.num_layers * ffn_active


# ---- construction ----------------------------------------------------------------------------------------
def _model_dir() -> Path:
    return Path(str(importlib.resources.files("kvcompress.configs"))) / "model"


def list_model_presets() -> list[str]:
    """Names of the presets under ``configs/model`` that carry an ``hf_config`` block."""
    out = []
    for p in sorted(_model_dir().glob("*.yaml")):
        with open(p) as fh:
            data = yaml.safe_load(fh) or {}
        if isinstance(data, dict) and isinstance(data.get("hf_config"), dict):
            out.append(p.stem)
    return out


def _get(cfg: Mapping[str, Any], key: str, name: str) -> Any:
    for alias in _ALIASES.get(key, (key,)):
        if cfg.get(alias) is not None:
            return cfg[alias]
    raise KVCompressError(f"model config {name!r} lacks {key} (looked for {', '.join(_ALIASES.get(key, (key,)))})"
                          f"; valid: a HF config with that field")


def _dtype_bytes(value: Any) -> int:
    if value is None:
        return 2
    text = str(value).replace("torch.", "").lower()
    if text not in _DTYPE_BYTES:
        raise unknown_choice("dtype", value, _DTYPE_BYTES)
    return _DTYPE_BYTES[text]


def profile_from_hf_dict(cfg: Mapping[str, Any], name: str = "custom", dtype: Any = None,
                         params: float | None = None, active_params: float | None = None) -> ModelProfile:
    """A profile from config.json fields (``text_config`` is used for multimodal configs).

    Sliding-window layers: ``layer_types`` entries containing "sliding" when the config lists them; otherwise all
    layers when ``sliding_window`` is set and ``use_sliding_window`` is not false (Mistral v0.1); for Qwen2-style
    configs with ``use_sliding_window`` true, layers at index ≥ ``max_window_layers``.
    """
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k in ("torch_dtype", "dtype")}}
    n_layers = int(_get(cfg, "num_hidden_layers", name))
    d = int(_get(cfg, "hidden_size", name))
    n_q = int(_get(cfg, "num_attention_heads", name))
    n_kv = int(cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or n_q)
    if cfg.get("multi_query"):
        n_kv = 1
    head_dim = int(cfg.get("head_dim") or d // n_q)
    ffn = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * d
    model_type = str(cfg.get("model_type", "")).lower()
    act = str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "").lower()
    gated = bool(cfg.get("gated_ffn", model_type in _GATED_TYPES or act in ("silu", "swish", "swiglu")))
    window = cfg.get("sliding_window")
    use_window = cfg.get("use_sliding_window", True)
    layer_types: tuple[str, ...] = ()
    if window and cfg.get("layer_types"):
        layer_types = tuple("sliding" if "sliding" in str(t) else "full" for t in cfg["layer_types"])
    elif window and use_window and "max_window_layers" in cfg and model_type.startswith("qwen"):
        mwl = int(cfg["max_window_layers"])
        layer_types = tuple("sliding" if i >= mwl else "full" for i in range(n_layers))
    elif window and use_window:
        layer_types = ("sliding",) * n_layers
    if layer_types and "sliding" not in layer_types:
        window = None
    n_exp = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    return ModelProfile(
        name=name, num_layers=n_layers, hidden_size=d, num_q_heads=n_q, num_kv_heads=n_kv, head_dim=head_dim,
        intermediate_size=int(ffn), vocab_size=int(_get(cfg, "vocab_size", name)), gated_ffn=gated,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype_bytes=_dtype_bytes(dtype if dtype is not None else (cfg.get("dtype") or cfg.get("torch_dtype"))),
        params_total=float(params or 0.0), params_active=float(active_params or params or 0.0),
        sliding_window=int(window) if (window and layer_types) else None, layer_types=layer_types,
        num_experts=n_exp, experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if n_exp else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0) if n_exp else 0,
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0) if n_exp else 0,
    )


def _from_preset_file(path: Path) -> ModelProfile:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict) or not isinstance(data.get("hf_config"), dict):
        raise KVCompressError(f"model preset {str(path)!r} has no hf_config block; valid: a preset with hf_config")
    params = data.get("params")
    active = data.get("active_params")
    return profile_from_hf_dict(data["hf_config"], name=data.get("name", path.stem), dtype=data.get("dtype"),
                                params=float(params) if params is not None else None,
                                active_params=float(active) if active is not None else None)


def load_model_profile(name_or_path_or_config: Any) -> ModelProfile:
    """A :class:`ModelProfile` from a preset name, a directory/config.json path, a ``PretrainedConfig`` or a dict."""
    spec = name_or_path_or_config
    if isinstance(spec, ModelProfile):
        return spec
    if isinstance(spec, Mapping):
        if isinstance(spec.get("hf_config"), Mapping):
            data = dict(spec)
            return profile_from_hf_dict(data["hf_config"], name=data.get("name", "custom"), dtype=data.get("dtype"),
                                        params=data.get("params"), active_params=data.get("active_params"))
        return profile_from_hf_dict(spec, name=str(spec.get("_name_or_path") or spec.get("model_type") or "custom"))
    if hasattr(spec, "to_dict") and hasattr(spec, "model_type"):  # transformers.PretrainedConfig
        text = spec.get_text_config() if hasattr(spec, "get_text_config") else spec
        cfg = text.to_dict()
        for key in ("head_dim", "num_key_value_heads", "layer_types", "sliding_window"):
            if cfg.get(key) is None and getattr(text, key, None) is not None:
                cfg[key] = getattr(text, key)
        dtype = getattr(spec, "dtype", None) or vars(spec).get("torch_dtype")
        name = getattr(spec, "name_or_path", "") or cfg.get("model_type") or "custom"
        return profile_from_hf_dict(cfg, name=str(name), dtype=dtype)
    text = str(spec)
    preset = _model_dir() / f"{text.lower()}.yaml"
    if preset.is_file():
        return _from_preset_file(preset)
    path = Path(text)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return _from_preset_file(path)
        with open(path) as fh:
            return profile_from_hf_dict(json.load(fh), name=path.parent.name if path.name == "config.json"
                                        else path.stem)
    raise unknown_choice("model (preset name, or a directory with config.json)", spec, list_model_presets())
