"""Shared helpers of the benchmark suite: models, caches, statistics, load recording."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
import warnings
from typing import Any

import torch

MiB = 2**20


def load_avg() -> list[float]:
    """The machine's 1/5/15-minute load averages (recorded next to every figure: the machine is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    """Median and min–max of repeated measurements (optionally scaled, e.g. to milliseconds)."""
    v = [float(x) * scale for x in values]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(s: dict[str, Any], digits: int = 2) -> str:
    """``median (min–max)``."""
    if not s or not s.get("n"):
        return "–"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_at_start": load_avg(),
    }


# -- models -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    param_bytes: int
    kv_bytes_per_token: int
    description: str


def load_bench_model(spec: Any) -> BenchModel:
    """``builtin: testbed | tiny-random`` or ``llama: {...}`` (a random-init Llama, fixed seed)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else spec
    name = spec["name"]
    if spec.get("builtin"):
        from kvcompress.models import load_model

        loaded = load_model(OmegaConf.create({"builtin": spec["builtin"], "name": name}), dtype="float32")
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        from kvcompress.models import random_model

        arch = {"vocab_size": 4096, "intermediate_size": 512, "max_position_embeddings": 32768,
                "tie_word_embeddings": True, **spec["llama"]}
        model = random_model("llama", seed=int(spec.get("seed", 1234)), dtype=torch.float32, **arch)
        tokenizer = None
    import kvcompress

    kvcompress.attach(model)  # every variant (plain included) runs through the same attention function
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * layers * kv_heads * head_dim * 4
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    desc = (f"{name}: {layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} query / {kv_heads} KV heads "
            f"of dim {head_dim}, vocab {cfg.vocab_size}, fp32; {params / MiB:.1f} MiB of parameters, "
            f"KV {kv_per_token / 1024:.1f} KiB/token ({16384 * kv_per_token / MiB:.0f} MiB at 16K); attention "
            f"{100 * attention_share(model, 4096):.0f}% of the prefill FLOPs at 4K")
    return BenchModel(name, model, tokenizer, params, kv_per_token, desc)


def attention_share(model: torch.nn.Module, n: int) -> float:
    """Causal attention FLOPs (QKᵀ and AV) over all prefill FLOPs of ``n`` tokens, the decoder layers' matmuls being
    ``2 · layer parameters · n``: what bounds the relative cost of a scorer that makes one more pass over the
    attention scores (H2O's accumulated attention). :meth:`ModelProfile.attention_flops` is Fu 2024's term,
    ``2·d_attn·Σ_i i`` (one of the two matmuls, Kaplan et al.'s convention); both together are twice that."""
    from kvcompress.latency.model_profile import load_model_profile

    attention = 2.0 * load_model_profile(model.config).attention_flops(n)
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    return attention / (attention + 2.0 * layer_params * n)


def prompt_ids(model: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


# -- methods ------------------------------------------------------------------------------------------------------
def resolve_methods(spec: Any, exclude: Any = ()) -> list[str]:
    """``"all"`` = every registered method at run time (so the suite covers whatever has landed)."""
    import kvcompress

    available = kvcompress.available_methods()
    if spec in (None, "all"):
        names = list(available)
    else:
        names = [m for m in spec if m in available or m in ("dynamic", "plain")]
    return [m for m in names if m not in set(exclude or ())]


def axis_of(method: str) -> str | None:
    if method in ("dynamic", "plain"):
        return None
    from kvcompress.registry import get_method

    axis = get_method(method).axis
    return axis.value if axis is not None else None


def prepare(bm: BenchModel, methods: list[str]) -> dict[str, str]:
    """Every method's model-dependent set-up (head scores, low-rank calibration, ...) before timing, through the
    methods' own ``prepare`` hook; returns their notes by method name."""
    import kvcompress

    notes: dict[str, str] = {}
    with quiet():
        for method in methods:
            if method in kvcompress.available_methods():
                notes.update(kvcompress.api.prepare(bm.model, kvcompress.build_pipeline(method), bm.tokenizer))
    return notes


def make_cache(model: torch.nn.Module, method: str, ratio: float | None):
    """A fresh cache: ``dynamic``/``plain`` = the stock ``DynamicCache``; methods of the selection axes (layer, head,
    token) get ``ratio`` (fraction kept); hidden-axis methods and the baseline keep their own defaults."""
    from transformers import DynamicCache

    import kvcompress

    if method in ("dynamic", "plain"):
        return DynamicCache()
    if axis_of(method) in (None, "hidden"):
        return kvcompress.compress(model, method)
    return kvcompress.compress(model, method, ratio=ratio)


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
        warnings.simplefilter("ignore")
        yield


def cache_bytes(cache: Any) -> dict[str, int]:
    """kept / resident / dense bytes; for a ``DynamicCache`` all three are the tensors it holds."""
    if hasattr(cache, "kept_bytes"):
        return {"kept": cache.kept_bytes(), "resident": cache.resident_bytes(), "dense": cache.dense_bytes()}
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return {"kept": total, "resident": total, "dense": total}


def storage_bytes(cache: Any) -> int:
    """Bytes of the distinct storages behind every tensor the cache holds (what is really allocated, views and
    all): an independent check of ``resident_bytes``."""
    seen: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            tensors += [layer.keys, layer.values]
        if getattr(layer, "positions", None) is not None:
            tensors.append(layer.positions)
        ragged = getattr(layer, "ragged", None)
        if ragged is not None:
            tensors += [ragged.keys, ragged.values, *ragged.metadata()]
            if ragged.positions is not None:
                tensors.append(ragged.positions)
        for seg in getattr(layer, "segments", []):
            tensors += list(seg.tensors())
        from kvcompress.storage import state_tensors as _state_tensors

        tensors += list(_state_tensors(getattr(layer, "state", {})))
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
