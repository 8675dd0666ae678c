"""Per-model artifacts — retrieval-head scores, low-rank bases, the built testbed — and how a model is identified.

Everything lives under one root, ``$KVCOMPRESS_CACHE`` (default ``~/.cache/kvcompress``), one folder per kind. An
artifact made from a model is keyed by what it depends on, :func:`model_key` = ``<config hash>-<weights fingerprint>``:

* :func:`config_hash` — the architecture: the text config without the keys that do not change what the model computes
  (runtime switches, provenance);
* :func:`weights_fingerprint` — the weights: strided samples of the input embeddings and of every attention
  projection, so a fine-tune, an instruct variant or a checkpoint of the same architecture gets its own artifacts.

The low-rank bases also record :func:`layer_fingerprint` per layer. Readers validate an artifact before using it and
raise :class:`ArtifactError` (one line: the file, what is wrong, what is valid); the automatic paths recompute it,
saying why. Code that sees only an attention module reaches its model through :func:`model_of` (registered by
:func:`remember_model`, which ``kvcompress.compress`` calls).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from kvcompress.errors import KVCompressError

#: text-config keys that do not change what the model computes (runtime switches, provenance, label maps)
VOLATILE_KEYS = frozenset({
    "transformers_version", "architectures", "name_or_path", "attn_implementation", "dtype", "torch_dtype",
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "id2label",
    "label2id", "problem_type", "tie_word_embeddings_", "commit_hash",
})

#: elements sampled per weight tensor by :func:`weights_fingerprint`
SAMPLES = 256

#: model -> (the sampled weights' (id, data_ptr, _version), fingerprint)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: attention module -> weak reference to the model that owns it (:func:`remember_model`)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ArtifactError(KVCompressError):
    """An artifact file that cannot be used for this model. The message is one line (the file, what is wrong, what
    is valid); :attr:`reason` is the middle part alone, for "recomputing because ..." messages."""

    def __init__(self, kind: str, path: str | Path, reason: str, valid: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{kind} {str(path)!r} cannot be used: {reason}; valid: {valid}")


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


def _is_attention(module: torch.nn.Module) -> bool:
    """An attention module as :func:`kvcompress.api.attach` sees it (a ``layer_idx`` and an output projection)."""
    return hasattr(module, "layer_idx") and hasattr(module, "o_proj")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules (those with ``layer_idx`` and key/value projections), by layer."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def fingerprinted_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors :func:`weights_fingerprint` samples, in module order: the input embeddings and every attention
    module's projection weights (``q/k/v/o_proj``, or a fused ``qkv_proj``)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weights = []
    for module in model.modules():
        if module is embeddings and isinstance(getattr(module, "weight", None), torch.Tensor):
            weights.append(module.weight)
        elif _is_attention(module):
            weights += [child.weight for name, child in module.named_children()
                        if name.endswith("_proj") and isinstance(getattr(child, "weight", None), torch.Tensor)]
    return weights


def _samples(weight: torch.Tensor) -> torch.Tensor:
    """About :data:`SAMPLES` evenly strided elements of ``weight`` (flattened) as bfloat16, on its device. The stride is
    coprime with the row length, so the samples spread over the columns too (a head permutation moves them)."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES)
    row = weight.shape[-1] if weight.dim() else 1
    while step > 1 and math.gcd(step, row) != 1:
        step -= 1
    index = torch.arange(0, min(flat.numel(), step * SAMPLES), step, device=flat.device)
    return flat[index].to(torch.bfloat16)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits identifying a model's weights: SHA-256 over the shapes of :func:`fingerprinted_weights` and
    about :data:`SAMPLES` evenly strided elements of each, in module order.

    * The samples are rounded to bfloat16 before hashing, so a checkpoint loaded in float32 or in bfloat16 gets the
      same fingerprint (loading in float16 rounds twice and may differ in rare cases).
    * The samples are gathered on the weights' device and copied to the host once.
    * Parameters on the ``meta`` device (offloaded by accelerate) are not read, only their shapes count.
    * Cached per model object; the cache is keyed by each sampled parameter's ``(id, data_ptr, _version)``, so in-place
      edits (which bump ``_version``) and replaced tensors are seen — edits through ``.data`` are not.
    * A sample, not a checksum: trained weights differ in every sample, but weights that differ only in elements
      never sampled (sparse hand-set weights, such as the testbed's filler heads) share a fingerprint.
    """
    weights = fingerprinted_weights(model)
    # inference tensors (made under torch.inference_mode) have no version counter: never cached
    key = None if any(w.is_inference() for w in weights) else tuple((id(w), w.data_ptr(), w._version) for w in weights)
    cached = _FINGERPRINTS.get(model)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(json.dumps([list(w.shape) for w in weights]).encode())
    samples = [_samples(w) for w in weights if w.device.type != "meta"]
    if samples:  # gathered on the first sample's device (device to device for a split model), one copy to the host
        gathered = torch.cat([s.to(samples[0].device) for s in samples])
        digest.update(gathered.cpu().view(torch.int16).numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    _FINGERPRINTS[model] = (key, fingerprint)
    return fingerprint


def model_key(model: torch.nn.Module) -> str:
    """``<config hash>-<weights fingerprint>``: the key of every artifact computed from ``model``."""
    return f"{config_hash(model)}-{weights_fingerprint(model)}"


def remember_model(model: torch.nn.Module) -> None:
    """Record ``model`` (weakly) as the owner of each of its attention modules, for :func:`model_of`."""
    ref = weakref.ref(model)
    for module in model.modules():
        if _is_attention(module):
            _OWNERS[module] = ref


def model_of(module: torch.nn.Module) -> torch.nn.Module | None:
    """The model owning attention ``module`` (registered by :func:`remember_model`), or None when unknown (a cache
    built without ``kvcompress.compress``) or already freed."""
    ref = _OWNERS.get(module)
    return ref() if ref is not None else None


def layer_fingerprint(attention: torch.nn.Module) -> float:
    """A cheap fingerprint of one attention layer's key/value projection weights (a ramp-weighted sum, float64):
    two checkpoints of the same architecture differ in it."""
    k, v = attention.k_proj.weight.detach().double(), attention.v_proj.weight.detach().double()

    def ramp(w: torch.Tensor) -> torch.Tensor:
        return torch.linspace(1.0, 2.0, w.numel(), dtype=torch.float64, device=w.device).view_as(w)

    return float((k * ramp(k)).sum() + 3.0 * (v * ramp(v)).sum())
