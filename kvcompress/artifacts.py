"""Per-model artifacts — retrieval-head scores, low-rank bases, the built testbed — and how a model is identified.

Everything lives under one root, ``$KVCOMPRESS_CACHE`` (default ``~/.cache/kvcompress``), one folder per kind. A model
is identified by :func:`config_hash`: its text config without the keys that do not change what it computes (runtime
switches, provenance); artifacts that depend on the weights also record :func:`layer_fingerprint` per layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

#: text-config keys that do not change what the model computes (runtime switches, provenance, label maps)
VOLATILE_KEYS = frozenset({
    "transformers_version", "architectures", "name_or_path", "attn_implementation", "dtype", "torch_dtype",
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "tie_word_embeddings_", "commit_hash",
})


def cache_root() -> Path:
    """``$KVCOMPRESS_CACHE`` (default ``~/.cache/kvcompress``)."""
    env = os.environ.get("KVCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcompress"


def artifact_dir(kind: str) -> Path:
    """The folder of one kind of artifact (``heads``, ``lowrank``, ...) under :func:`cache_root`."""
    return cache_root() / kind


def text_config(config_or_model: Any) -> Any:
    """The text config of a model or config (multimodal configs nest it)."""
    config = getattr(config_or_model, "config", config_or_model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_hash(config_or_model: Any) -> str:
    """16 hex digits identifying a model's architecture: its text config minus :data:`VOLATILE_KEYS` and private
    (``_``-prefixed) keys, as sorted JSON."""
    cfg = text_config(config_or_model).to_dict()
    clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules (those with ``layer_idx`` and key/value projections), by layer."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def layer_fingerprint(attention: torch.nn.Module) -> float:
    """A cheap fingerprint of one attention layer's key/value projection weights (a ramp-weighted sum, float64):
    two checkpoints of the same architecture differ in it."""
    k, v = attention.k_proj.weight.detach().double(), attention.v_proj.weight.detach().double()

    def ramp(w: torch.Tensor) -> torch.Tensor:
        return torch.linspace(1.0, 2.0, w.numel(), dtype=torch.float64, device=w.device).view_as(w)

    return float((k * ramp(k)).sum() + 3.0 * (v * ramp(v)).sum())
