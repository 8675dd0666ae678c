"""Model profiles: the architecture numbers the serving model needs, from any HF config.

A :class:`ModelProfile` is built from (a) a preset name under ``configs/model/`` (``yi-34b-200k``, ...), (b) a
local directory or ``config.json`` file, (c) a ``transformers.PretrainedConfig``, or (d) a plain dict of
config.json fields. The class and its formulas (parameter count, MoE, KV per token, ``paper_params``):
:mod:`kvcompress.latency.architecture`.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import KVCompressError, unknown_choice
from .architecture import ModelProfile

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float64": 8, "float8": 1}
_GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "granite", "deepseek_v2", "deepseek_v3"}
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}


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
                         params: float | None = None, active_params: float | None = None,
                         paper_params: float | None = None) -> ModelProfile:
    """A profile from config.json fields (``text_config`` is used for multimodal configs).

    Sliding-window layers: ``layer_types`` entries containing "sliding" when the config lists them; otherwise all
    layers when ``sliding_window`` is set and ``use_sliding_window`` is not false (Mistral v0.1); for Qwen2-style
    configs with ``use_sliding_window`` true, layers at index ≥ ``max_window_layers``.
    MoE: ``num_local_experts`` (Mixtral) / ``num_experts`` (Qwen-MoE) / ``n_routed_experts`` (DeepSeek),
    ``num_experts_per_tok``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``, ``n_shared_experts``,
    ``first_k_dense_replace``. MLA (DeepSeek-V2/V3): ``kv_lora_rank``, ``q_lora_rank``, ``qk_rope_head_dim``,
    ``qk_nope_head_dim``, ``v_head_dim``; the cache is one latent per token (n_kv = 1, whatever
    ``num_key_value_heads`` says).
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
    kv_lora = int(cfg.get("kv_lora_rank") or 0)
    rope = int(cfg.get("qk_rope_head_dim") or 0)
    v_head = int(cfg.get("v_head_dim") or 0)
    if kv_lora:
        n_kv = 1
        head_dim = int(cfg.get("qk_nope_head_dim") or 0) + rope
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
        num_shared_experts=int(cfg.get("n_shared_experts") or 0) if n_exp else 0,
        first_dense_layers=int(cfg.get("first_k_dense_replace") or 0) if n_exp else 0,
        v_head_dim=v_head if v_head != head_dim else 0, kv_lora_rank=kv_lora, qk_rope_head_dim=rope,
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        paper_params=float(paper_params or 0.0),
    )


def _from_mapping(data: Mapping[str, Any], name: str) -> ModelProfile:
    """A preset's fields: ``hf_config`` (config.json fields), ``dtype``, and the optional counts ``params`` /
    ``active_params`` (overrides for every convention) and ``paper_params`` (Fu 2024's rounded count)."""
    def number(key: str) -> float | None:
        value = data.get(key)
        return float(value) if value is not None else None

    return profile_from_hf_dict(data["hf_config"], name=data.get("name", name), dtype=data.get("dtype"),
                                params=number("params"), active_params=number("active_params"),
                                paper_params=number("paper_params"))


def _from_preset_file(path: Path) -> ModelProfile:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict) or not isinstance(data.get("hf_config"), dict):
        raise KVCompressError(f"model preset {str(path)!r} has no hf_config block; valid: a preset with hf_config")
    return _from_mapping(data, path.stem)


def load_model_profile(name_or_path_or_config: Any) -> ModelProfile:
    """A :class:`ModelProfile` from a preset name, a directory/config.json path, a ``PretrainedConfig`` or a dict."""
    spec = name_or_path_or_config
    if isinstance(spec, ModelProfile):
        return spec
    if isinstance(spec, Mapping):
        if isinstance(spec.get("hf_config"), Mapping):
            return _from_mapping(spec, "custom")
        return profile_from_hf_dict(spec, name=str(spec.get("_name_or_path") or spec.get("model_type") or "custom"))
    if hasattr(spec, "to_dict") and hasattr(spec, "model_type"):  # transformers.PretrainedConfig
        text = spec.get_text_config() if hasattr(spec, "get_text_config") else spec
        cfg = text.to_dict()
        for key in ("head_dim", "num_key_value_heads", "layer_types", "sliding_window", "max_position_embeddings"):
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
