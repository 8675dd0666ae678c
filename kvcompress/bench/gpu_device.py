"""Device, model and timing helpers of the GPU acceptance run (:mod:`kvcompress.bench.gpu`): CUDA allocator
statistics and synchronisation that fall back to no-ops on the CPU, one-line error and warning capture, the
timestamped progress log, the random-init bf16 models (a tiny Llama / Qwen2 for the equivalence check and
Llama-3.1-8B's shape for the rest), the cache of each variant (``DynamicCache`` or ``kvcompress.compress``), and
the synchronised prefill / decode-step timers with their median (min–max) summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..compat import cache_arg


# -- device helpers -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int | None:
    """Bytes held by the CUDA caching allocator's live tensors; None on the CPU (no allocator statistics)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release(device: torch.device, empty: bool = False) -> None:
    """Free what the last variant left (caches hold reference cycles, so collect); ``empty`` also hands the CUDA
    allocator's cached blocks back (only between parts: keeping them spares later prefills the cudaMalloc calls)."""
    gc.collect()
    if empty and device.type == "cuda":
        torch.cuda.empty_cache()


def device_usable(device: torch.device) -> bool:
    """False once a device-side assert (or similar) has made the CUDA context unusable."""
    try:
        return bool(torch.ones(1, device=device).add_(1).sum().item() == 2.0)
    except Exception:  # noqa: BLE001 — any failure means the context is gone
        return False


def one_line(err: BaseException) -> str:
    """``Type: first line of the message (file:line of the innermost kvcompress/methods frame)``."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        parts = Path(frame.filename).parts
        if "kvcompress" in parts or "methods" in parts:
            tail = "/".join(parts[-2:])
            where = f" ({tail}:{frame.lineno})"
            break
    return f"{type(err).__name__}: {text[:300]}{where}"


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect the distinct warning messages raised inside the block (first line of each)."""
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    for w in caught:
        msg = str(w.message).strip().splitlines()[0][:200] if str(w.message).strip() else ""
        if msg and msg not in seen and w.category not in (FutureWarning, DeprecationWarning):
            seen.append(msg)


class Log:
    """Timestamped progress lines with the seconds since start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)


# -- models ---------------------------------------------------------------------------------------------------------
def tiny_config(arch: str) -> tuple[str, dict[str, Any]]:
    """A tiny random model of ``arch`` for the equivalence check (no sliding window): ``(arch, config fields)``."""
    extra = {"qwen2": dict(sliding_window=None, use_sliding_window=False)}.get(arch, {})
    return arch, dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      tie_word_embeddings=False, **extra)


def llama8b_config(layers: int, smoke: bool) -> tuple[str, dict[str, Any]]:
    """Llama-3.1-8B's shape (``smoke``: scaled down to hidden 64, 4 query / 2 KV heads, vocab 1024)."""
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=1024)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return "llama", dict(num_hidden_layers=layers, max_position_embeddings=131072, rope_parameters=rope,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, **shape)


def build_model(config: tuple[str, dict[str, Any]], device: torch.device, seed: int,
                sharpen: float = 1.0) -> torch.nn.Module:
    """Random-init bf16 sdpa model (:func:`kvcompress.models.random_model`) created directly on ``device``.

    ``sharpen`` scales the lm_head (greedy decoding far from ties) and, by half as much, the query and key
    projections: random init gives near-uniform attention, where a wrong RoPE position or a lost entry barely moves
    the logits; sharper attention makes such bugs exceed the equivalence tolerance many times over."""
    from kvcompress.models import random_model

    arch, fields = config
    model = random_model(arch, seed=seed, dtype=torch.bfloat16, sharpen=sharpen, device=device, **fields)
    if sharpen != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    for p in proj.parameters():
                        p.mul_(sharpen / 2)
    return model


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bf16
    return {
        "num_hidden_layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
        "query_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "vocab": c.vocab_size, "rope": dict(c.rope_parameters or {}),
        "max_position_embeddings": c.max_position_embeddings,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_per_token": kv_per_token,
    }


def random_ids(model: torch.nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Token ids in ``[3, vocab)`` drawn on the model's device with a seeded generator."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, shape, generator=gen, device=model.device)


def method_kwargs(name: str, ratio: float) -> dict[str, Any]:
    """``ratio`` for methods that have one (hidden-axis ``lowrank``/``think`` included); ``quant``, ``share``,
    ``full`` keep their defaults (quant: 4 bits)."""
    from ..registry import get_method

    fields = {f.name for f in dataclasses.fields(get_method(name))}
    return {"ratio": ratio} if "ratio" in fields else {}


def make_cache(model: torch.nn.Module, variant: str, ratio: float) -> Any:
    """``dynamic`` = the stock ``DynamicCache``; any other name = ``kvcompress.compress`` with :func:`method_kwargs`."""
    import kvcompress

    if variant == "dynamic":
        from transformers import DynamicCache

        return DynamicCache()
    return kvcompress.compress(model, variant, **method_kwargs(variant, ratio))


def describe_cache(cache: Any) -> str:
    comps = getattr(cache, "compressors", None)
    if comps is None:
        return "DynamicCache"
    return " + ".join(c.describe() for c in comps) or "full()"


@torch.no_grad()
def prefill(model: torch.nn.Module, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    """Prefill ``ids`` into ``cache`` (last position's logits only); returns the greedy next token ``(1, 1)``."""
    out = model(ids, **cache_arg(cache), logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    del out
    return token


@torch.no_grad()
def step(model: torch.nn.Module, cache: Any, token: torch.Tensor) -> torch.Tensor:
    out = model(token, **cache_arg(cache))
    token = out.logits[:, -1:].argmax(-1)
    del out
    return token


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def timed_steps(model: torch.nn.Module, cache: Any, token: torch.Tensor, n: int,
                device: torch.device) -> tuple[list[float], torch.Tensor]:
    """``n`` greedy decode steps, each timed between device synchronisations."""
    times = []
    for _ in range(n):
        token, seconds = timed(lambda t=token: step(model, cache, t), device)
        times.append(seconds)
    return times, token


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any] | None:
    if not values:
        return None
    v = [x * scale for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
