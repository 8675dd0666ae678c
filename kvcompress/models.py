"""Model loading for runs: built-in models (made here, no download) or any local Hugging Face directory / hub id."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .api import check_architecture
from .errors import KVCompressError, unknown_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: accelerate's placement strategies for ``from_pretrained(device_map=...)`` (a device or a {module: device} map also works)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | int | dict[str, str | int]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    constructed: bool = False  # weights set by construction (the testbed), not learned
    random_init: bool = False  # accuracy is meaningless
    note: str = ""


def random_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, sharpen: float = 1.0,
                 device: torch.device | str | None = None, **config: Any) -> torch.nn.Module:
    """A random-init causal LM of architecture ``arch`` (``AutoConfig.for_model(arch, **config)``, special tokens
    0/1/2), initialised from ``seed`` without disturbing the global RNG, sdpa attention, in eval mode. ``sharpen``
    scales the output embeddings: random init gives near-uniform logits, so tests that compare greedy tokens sharpen
    them to keep decoding far from ties. ``device``: built there directly (no host copy of a large model). The one
    definition of a random model, used by ``model=tiny-random``, the bench and the tests."""
    config = AutoConfig.for_model(arch, **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config})
    config._attn_implementation = "sdpa"
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device if device is not None else "cpu"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    finally:
        torch.random.set_rng_state(state)
    if sharpen != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)
    return model


#: ``model=tiny-random``: a 4-layer Llama (hidden 256, 8 query / 2 KV heads, head_dim 32)
TINY_RANDOM = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=16384, tie_word_embeddings=True)


def _tiny_random(dtype: torch.dtype) -> LoadedModel:
    return LoadedModel(
        random_model("llama", seed=1234, dtype=dtype, **TINY_RANDOM),
        None,
        "tiny-random",
        random_init=True,
        note="random-init model: accuracy is meaningless; memory and fidelity-to-full-cache are real",
    )


BUILTIN: dict[str, Callable[[torch.dtype], LoadedModel]] = {"tiny-random": _tiny_random}
#: built-in models' tokenizers, loadable without the weights
TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {}


def register_builtin(name: str, factory: Callable[[torch.dtype], LoadedModel],
                     tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None) -> None:
    BUILTIN[name] = factory
    if tokenizer is not None:
        TOKENIZERS[name] = tokenizer


def check_model_config(model_cfg: Any, dtype: str | None = None) -> None:
    """Everything about a run's ``model`` config that can be checked without loading weights (one-line
    :class:`KVCompressError`): the dtype, the device map, the built-in name, and for ``path`` a local directory whose
    ``config.json`` transformers reads (``AutoConfig``, no weights) naming a supported architecture."""
    dtype_name = dtype or model_cfg.get("dtype") or "float32"
    if dtype_name not in DTYPES:
        raise unknown_choice("dtype", dtype_name, DTYPES)
    device_map = check_device_map(model_cfg.get("device_map"))
    path, builtin = model_cfg.get("path"), model_cfg.get("builtin")
    if path:
        local = _local_dir(str(path))
        if local is not None:
            from .constraints import ModelDir, check_value

            check_value("model.path", str(path), ModelDir())
            try:
                config = AutoConfig.from_pretrained(str(local))
            except (OSError, ValueError, KeyError) as err:
                raise KVCompressError(f"model.path={str(path)!r}: transformers cannot read its config.json "
                                      f"({str(err).splitlines()[0]}); valid: a directory written by save_pretrained") from None
            check_architecture(config)
    elif builtin:
        if device_map is not None:
            raise KVCompressError(
                f"model.device_map={device_map!r} applies to models loaded from model.path; built-in model {builtin!r} "
                "is loaded whole onto `device`; valid: model.device_map=null"
            )
        _load_builtin_plugins()
        if builtin not in BUILTIN:
            raise unknown_choice("built-in model", builtin, BUILTIN)
    else:
        raise KVCompressError(f"model {model_cfg.get('name')!r} has neither `builtin` nor `path`; set model.path=DIR")


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a run's model without its weights (None when the model has none, e.g. ``tiny-random``):
    checks that need it (a needle length too short for a template's fixed text) run before the model loads."""
    path, builtin = model_cfg.get("path"), model_cfg.get("builtin")
    if path:
        local = _local_dir(str(path))
        try:
            return AutoTokenizer.from_pretrained(str(local) if local is not None else str(path))
        except (OSError, ValueError):
            return None
    _load_builtin_plugins()
    factory = TOKENIZERS.get(builtin)
    return factory() if factory is not None else None


def load_model(model_cfg: Any, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load the model a run's ``model`` config describes (``builtin:`` name or ``path:`` to a directory / hub id)."""
    check_model_config(model_cfg, dtype)
    torch_dtype = DTYPES[dtype or model_cfg.get("dtype") or "float32"]
    device_map = check_device_map(model_cfg.get("device_map"))
    path, builtin = model_cfg.get("path"), model_cfg.get("builtin")
    if path:  # an explicit path wins over a built-in name (model.path=DIR on any model config)
        loaded = _from_pretrained(str(path), torch_dtype, device_map)
    else:
        loaded = BUILTIN[builtin](torch_dtype)
    check_architecture(loaded.model)
    if device_map is None:  # with a device_map, accelerate has placed (and may have split) the model already
        loaded.model.to(device)
    return loaded


def _local_dir(path: str) -> Path | None:
    """The local directory ``path`` names, or None for a hub id; an absent local-looking path (or any absent path
    with ``HF_HUB_OFFLINE=1``) is an error."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or path.startswith((".", "/", "~")):
        raise KVCompressError(
            f"unknown model path {path!r}: no such local directory"
            + (" (and HF_HUB_OFFLINE=1, so hub ids cannot be fetched)" if offline else "")
            + "; valid: a directory with config.json, or a built-in model (model=tiny-random | model=testbed)"
        )
    return None


def check_device_map(value: Any) -> DeviceMap | None:
    """``model.device_map``: null (load whole, then move to ``device``), one of accelerate's strategies (``auto``
    spreads a model larger than one GPU over every visible GPU, then CPU memory), a device (``cpu``, ``cuda:1``, a GPU
    index) or a ``{module name: device}`` map."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): v if v == "disk" else check_device_map(v) for k, v in value.items()}  # type: ignore[misc]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        try:
            torch.device(value)
            return value
        except RuntimeError:
            pass
    raise KVCompressError(
        f"unknown device_map {value!r}; valid: null, {' | '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:0, "
        "a GPU index) or a {module: device} map"
    )


def _from_pretrained(path: str, dtype: torch.dtype, device_map: DeviceMap | None = None) -> LoadedModel:
    local = _local_dir(path)
    source = str(local) if local is not None else path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", device_map=device_map
        )
    except OSError as err:
        raise KVCompressError(f"cannot load model {path!r}: {str(err).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model.eval(), tokenizer, Path(path).name or path)


def _load_builtin_plugins() -> None:
    """Built-in models defined outside this module register themselves on import."""
    try:
        import kvcompress.zoo.builtin  # noqa: F401
    except ImportError:
        pass
