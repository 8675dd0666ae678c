"""``python -m kvcompress.bench gpu`` — the one-command GPU acceptance run (CUDA, bf16, fixed seed, ≤ 8 minutes).

Options: Hydra ``key=value`` overrides of ``configs/bench/gpu.yaml`` (``--help`` lists them with their defaults).
Checks, in one process, and writes ``paper_tables/gpu.md`` plus the raw figures in ``gpu.json`` next to it:

a. **equivalence**: ``compress(model, <reference>)`` (``reference``: the plain pass-through method) vs
   ``DynamicCache`` under greedy ``generate`` on a left-padded batch (tiny random Llama and Qwen2): greedy tokens
   identical and max |Δlogit| within a stated bf16 tolerance;
b. **every registered method** on a random-init model of Llama-3.1-8B's shape (``layers`` layers): a
   ``context`` prefill (32K) and ``steps`` greedy decode steps; kept / resident / dense bytes, the CUDA
   allocation growth and peak, prefill time, mean decode step. A method that raises is recorded as FAILED with
   its error and the run goes on with the next one;
c. **decode step vs DynamicCache** at 8K and 32K for the ``decode_methods`` (``ratio`` where a method has one):
   median over repeats of the per-step median, ratio to DynamicCache within each repeat;
d. **prefill overhead** of every method at ``context``: prefill time / DynamicCache prefill time.

Without CUDA it prints one skip line and exits 0: nothing is measured and nothing is written. ``smoke=true`` runs
the same code on the CPU at tiny sizes (what CI uses to exercise this script); its output says loudly that it holds
no GPU figures. Exit status: 0 when every check passed, 1 when a method FAILED or equivalence failed, 2 on a bad
option (one ``error:`` line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..cli import Command, fail
from ..cli import main as cli_main
from ..compat import cache_arg
from ..errors import KVCompressError, check_ratio, unknown_choice

MiB = 2**20
PARTS = ("equivalence", "methods", "decode", "prefill")
EQUIVALENCE_ARCHS = ("llama", "qwen2")
#: max |Δlogit| allowed between the reference method and DynamicCache, as a fraction of the largest |logit| of the
#: reference: 2⁻⁵ = 4 bf16 ulps (bf16 has 8 significant bits) at the largest logit's magnitude — room for a different
#: sdpa kernel or summation order, far below what a wrong key, value or position would cause.
BF16_REL_TOLERANCE = 2.0**-5
#: the models' max_position_embeddings (Llama-3.1's 131072) less room for the decode steps
MAX_CONTEXT = 131072 - 4096
SMOKE_BANNER = "*** CPU SMOKE RUN: tiny model on the CPU; these are NOT GPU figures ***"


# -- options ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    smoke: bool
    out: Path
    layers: int
    context: int
    decode_contexts: tuple[int, ...]
    steps: int
    warmup: int
    timing_steps: int
    repeats: int
    prefill_repeats: int
    methods: tuple[str, ...]
    ratio: float
    seed: int
    time_budget: float
    parts: tuple[str, ...]
    command: str
    reference: str
    decode_methods: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.smoke else torch.device("cuda", torch.cuda.current_device())

    @property
    def json_path(self) -> Path:
        return self.out.with_suffix(".json")


def _int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    try:
        number = None if isinstance(value, (bool, float)) else int(str(value))
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise KVCompressError(f"{name}={value} is invalid; valid: an integer >= {minimum}")
    if maximum is not None and number > maximum:
        raise KVCompressError(f"{name}={value} is too large; valid: an integer <= {maximum} (the model's "
                              f"{MAX_CONTEXT + 4096} positions less room for decoding)")
    return number


def _choices(name: str, value: Any, valid: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(str(x).strip() for x in (value.split(",") if isinstance(value, str) else value) if str(x).strip())
    if not items:
        raise KVCompressError(f"{name}={value!r} is empty; valid: a list of some of {', '.join(valid)}")
    for item in items:
        if item not in valid:
            raise KVCompressError(f"{name}: {unknown_choice(name.rstrip('s'), item, valid)}")
    return tuple(dict.fromkeys(items))


def settings(cfg: Any, argv: list[str]) -> Settings:
    """Validated settings from the composed config (``configs/bench/gpu.yaml`` + overrides); a bad value raises
    :class:`KVCompressError` with a one-line message."""
    import kvcompress

    sizes = cfg.sizes.smoke if cfg.smoke else cfg.sizes.gpu

    def opt(name: str, minimum: int = 1, maximum: int | None = None) -> int:
        return _int(name, cfg[name], minimum, maximum) if cfg[name] is not None else int(sizes[name])

    # the options whose defaults are sizes.<gpu|smoke> (layers, steps, repeats, ...): positive integers, warm-up
    # steps may be 0, a context is bounded by the model's positions
    sized = {name: opt(name, 0 if name == "warmup" else 1, MAX_CONTEXT if name == "context" else None)
             for name in sizes if name not in ("out", "short_context")}
    context = sized["context"]
    if cfg.decode_contexts is not None:
        given = cfg.decode_contexts if not isinstance(cfg.decode_contexts, (int, str)) else [cfg.decode_contexts]
        contexts = tuple(_int("decode_contexts", c, 1, MAX_CONTEXT) for c in given)
    else:
        contexts = tuple(sorted({min(int(sizes.short_context), context), context}))
    gpu_out = Path(str(cfg.sizes.gpu.out))
    out = Path(str(cfg.out)) if cfg.out else Path(str(sizes.out))
    if cfg.smoke and (out.resolve() == gpu_out.resolve() or out.resolve().parts[-2:] == gpu_out.parts[-2:]):
        raise KVCompressError(f"out={cfg.out} with smoke=true is invalid; valid: any other path ({gpu_out} holds GPU "
                              "figures only)")
    try:
        ratio = check_ratio(cfg.ratio, "ratio")
    except KVCompressError:
        raise KVCompressError(f"ratio={cfg.ratio} is invalid; valid: a kept fraction in (0, 1]") from None
    registered = tuple(kvcompress.available_methods())
    methods = registered if cfg.methods in (None, "all") else _choices("methods", cfg.methods, registered)
    reference = str(cfg.reference)
    if reference not in registered:
        raise unknown_choice("reference method", reference, registered)
    return Settings(
        **{**sized, "time_budget": float(sized["time_budget"])}, smoke=bool(cfg.smoke), out=out,
        decode_contexts=contexts, methods=methods, ratio=ratio, seed=_int("seed", cfg.seed, 0),
        parts=_choices("parts", cfg.parts, PARTS),
        command=" ".join(["python -m kvcompress.bench gpu", *map(shlex.quote, argv)]),
        reference=reference, decode_methods=tuple(str(m) for m in cfg.decode_methods),
    )


def skip_line(out: Path) -> str:
    build = f"CUDA {torch.version.cuda} build, no GPU visible" if torch.version.cuda else "CPU-only build, no GPU"
    return (f"kvcompress.bench gpu: skipped — CUDA is not available on this machine (torch {torch.__version__}, "
            f"{build}); nothing was measured and {out} was not changed")


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


# -- a. equivalence -------------------------------------------------------------------------------------------------
def left_padded_batch(model: torch.nn.Module, lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=model.device)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=model.device)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = random_ids(model, (n,), seed + i)
        mask[i, width - n:] = 1
    return ids, mask


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any, new_tokens: int) -> Any:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                          **cache_arg(cache))


def check_equivalence(arch: str, s: Settings, log: Log, lengths: tuple[int, ...] = (45, 96, 30),
                      new_tokens: int = 8) -> dict[str, Any]:
    """The reference method (``s.reference``) vs ``DynamicCache`` on one tiny random model of ``arch``."""
    from transformers import DynamicCache

    import kvcompress

    row: dict[str, Any] = {"architecture": arch, "batch": len(lengths), "prompt_lengths": list(lengths),
                           "new_tokens": new_tokens, "rel_tolerance": BF16_REL_TOLERANCE}
    try:
        model = build_model(tiny_config(arch), s.device, s.seed, sharpen=8.0)
        ids, mask = left_padded_batch(model, lengths, s.seed)
        reference = greedy(model, ids, mask, DynamicCache(), new_tokens)
        ours = greedy(model, ids, mask, kvcompress.compress(model, s.reference), new_tokens)
        ref_logits = torch.stack([x.float() for x in reference.logits])
        our_logits = torch.stack([x.float() for x in ours.logits])
        max_abs = ref_logits.abs().max().item()
        row.update(tokens_identical=bool(torch.equal(reference.sequences, ours.sequences)),
                   max_abs_logit_diff=(our_logits - ref_logits).abs().max().item(), max_abs_logit=max_abs,
                   tolerance=BF16_REL_TOLERANCE * max_abs)
        row["passed"] = row["tokens_identical"] and row["max_abs_logit_diff"] <= row["tolerance"]
    except Exception as err:  # noqa: BLE001 — recorded, the run goes on
        row.update(passed=False, error=one_line(err))
    log(f"  a. {arch}: {'PASS' if row['passed'] else 'FAIL'} "
        + (f"(tokens identical: {row['tokens_identical']}, max |Δlogit| {row['max_abs_logit_diff']:.4g} "
           f"<= {row['tolerance']:.4g}?)" if "error" not in row else row["error"]))
    return row


# -- b. every method --------------------------------------------------------------------------------------------------
def measure_method(model: torch.nn.Module, name: str, ids: torch.Tensor, s: Settings) -> dict[str, Any]:
    """Prefill + ``s.steps`` greedy decode steps with a fresh cache; memory and times. Never raises."""
    device = s.device
    row: dict[str, Any] = {"method": name, "kwargs": {} if name == "dynamic" else method_kwargs(name, s.ratio),
                           "status": "ok"}
    phase = "cache"
    cache = token = None
    with captured_warnings() as notes:
        try:
            release(device)
            sync(device)
            base = allocated(device)
            reset_peak(device)
            torch.manual_seed(s.seed)
            cache = make_cache(model, name, s.ratio)
            row["params"] = describe_cache(cache)
            phase = "prefill"
            token, row["prefill_s"] = timed(lambda: prefill(model, cache, ids), device)
            phase = "decode"
            times, token = timed_steps(model, cache, token, s.steps, device)
            row["decode_ms_mean"] = 1e3 * sum(times) / len(times)
            phase = "report"
            row.update(cache_memory(cache))
            sync(device)
            if base is not None:
                row["allocated_growth_bytes"] = allocated(device) - base
                row["peak_over_baseline_bytes"] = peak(device) - base
                row["peak_bytes"] = peak(device)
                row["unaccounted_bytes"] = (row["allocated_growth_bytes"] - row["resident_bytes"]
                                            - row.get("workspace_bytes", 0))
        except Exception as err:  # noqa: BLE001 — the point is to find what breaks
            row.update(status="FAILED", failed_in=phase, error=one_line(err))
        finally:
            cache = token = None  # drop the last references before collecting
            release(device)
    row["warnings"] = notes
    return row


def cache_memory(cache: Any) -> dict[str, Any]:
    """kept / resident / dense / workspace bytes (a DynamicCache: the tensors it holds, all three equal)."""
    if hasattr(cache, "memory_report"):
        r = cache.memory_report()
        return {k: r[k] for k in ("kept_bytes", "resident_bytes", "dense_bytes", "workspace_bytes", "kept_fraction")}
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
    return {"kept_bytes": held, "resident_bytes": held, "dense_bytes": held, "workspace_bytes": 0,
            "kept_fraction": 1.0}


def prepare_methods(model: torch.nn.Module, s: Settings, log: Log) -> dict[str, str]:
    """Each method's one-time model-dependent set-up (its ``prepare`` hook: low-rank bases, ...) before timing, on
    random ids (no tokenizer). Returns errors by method."""
    import kvcompress

    errors: dict[str, str] = {}
    for name in s.methods:
        try:
            with captured_warnings(), torch.no_grad():
                start = time.perf_counter()
                notes = kvcompress.api.prepare(
                    model, kvcompress.build_pipeline(name, **method_kwargs(name, s.ratio)), None)
            if notes:
                log(f"  {name}: set-up in {time.perf_counter() - start:.1f} s ({'; '.join(notes.values())})")
        except Exception as err:  # noqa: BLE001
            errors[name] = f"set-up: {one_line(err)}"
    return errors


def run_methods(model: torch.nn.Module, s: Settings, log: Log) -> list[dict[str, Any]]:
    ids = random_ids(model, (1, s.context), s.seed)
    setup_errors = prepare_methods(model, s, log)
    rows: list[dict[str, Any]] = []
    lost: str | None = None
    for name in ("dynamic", *s.methods):
        if lost is not None:
            rows.append({"method": name, "status": "FAILED", "failed_in": "not run", "error": lost})
            continue
        if name in setup_errors:
            rows.append({"method": name, "status": "FAILED", "failed_in": "setup", "error": setup_errors[name]})
            log(f"  b. {name}: FAILED {setup_errors[name]}")
            continue
        row = measure_method(model, name, ids, s)
        rows.append(row)
        log("  b. " + method_line(row))
        if row["status"] == "FAILED" and s.device.type == "cuda" and not device_usable(s.device):
            lost = f"not run: the CUDA context became unusable after {name}"
    return rows


def method_line(row: dict[str, Any]) -> str:
    if row["status"] == "FAILED":
        return f"{row['method']}: FAILED in {row.get('failed_in')}: {row['error']}"
    grown = row.get("allocated_growth_bytes")
    return (f"{row['method']}: prefill {row['prefill_s']:.3f} s, decode {row['decode_ms_mean']:.2f} ms/step, kept "
            f"{_mib(row['kept_bytes'])} MiB of {_mib(row['dense_bytes'])}"
            + (f", allocated +{_mib(grown)} MiB, peak +{_mib(row['peak_over_baseline_bytes'])} MiB"
               if grown is not None else ""))


# -- c. decode step vs DynamicCache ---------------------------------------------------------------------------------
def run_decode(model: torch.nn.Module, s: Settings, log: Log, deadline: float) -> dict[str, Any]:
    variants = ["dynamic", *(m for m in s.decode_methods if m in s.methods)]
    out: dict[str, Any] = {}
    for context in s.decode_contexts:
        out[str(context)] = decode_at(model, context, variants, s, log, deadline)
    return out


def decode_at(model: torch.nn.Module, context: int, variants: list[str], s: Settings, log: Log,
              deadline: float) -> dict[str, Any]:
    """Prefill each variant once, then ``s.repeats`` interleaved repeats of ``warmup`` + ``timing_steps`` steps."""
    device = s.device
    ids = random_ids(model, (1, context), s.seed + context)
    caches: dict[str, Any] = {}
    tokens: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        try:
            torch.manual_seed(s.seed)
            with captured_warnings():
                caches[v] = make_cache(model, v, s.ratio)
                tokens[v] = prefill(model, caches[v], ids)
        except Exception as err:  # noqa: BLE001
            caches.pop(v, None)
            rows[v] = {"status": "FAILED", "error": one_line(err)}
    per_rep: dict[str, list[float]] = {v: [] for v in caches}
    vs_dynamic: dict[str, list[float]] = {v: [] for v in caches}
    cut = False
    for rep in range(s.repeats):
        if rep and time.perf_counter() > deadline:
            cut = True
            break
        this: dict[str, float] = {}
        for v in (list(caches) if rep % 2 == 0 else list(reversed(caches))):
            try:
                with captured_warnings():
                    _, tokens[v] = timed_steps(model, caches[v], tokens[v], s.warmup, device)
                    times, tokens[v] = timed_steps(model, caches[v], tokens[v], s.timing_steps, device)
                this[v] = statistics.median(times)
            except Exception as err:  # noqa: BLE001
                rows[v] = {"status": "FAILED", "error": one_line(err)}
                del caches[v]
        for v, t in this.items():
            per_rep[v].append(t)
            if "dynamic" in this:
                vs_dynamic[v].append(t / this["dynamic"])
    for v in caches:
        rows[v] = {"status": "ok", "params": describe_cache(caches[v]), "step_ms": summary(per_rep[v], 1e3),
                   "vs_dynamic": summary(vs_dynamic[v]), **cache_memory(caches[v])}
    caches.clear()
    tokens.clear()
    release(device, empty=True)
    log(f"  c. decode at {context}: " + ", ".join(
        f"{v} {r['step_ms']['median']:.2f} ms" + (f" (x{r['vs_dynamic']['median']:.2f})" if r.get("vs_dynamic") else "")
        if r["status"] == "ok" else f"{v} FAILED" for v, r in ((v, rows[v]) for v in variants)))
    return {"repeats_done": len(next(iter(per_rep.values()), [])), "cut_by_time_budget": cut,
            "rows": {v: rows[v] for v in variants}}


# -- d. prefill overhead ----------------------------------------------------------------------------------------------
def run_prefill(model: torch.nn.Module, s: Settings, log: Log, deadline: float,
                skip: dict[str, str]) -> dict[str, Any]:
    """Prefill time of each method at ``s.context`` over the DynamicCache's, interleaved, per repeat.
    ``skip``: methods that already failed before decoding in part b (method -> reason)."""
    device = s.device
    ids = random_ids(model, (1, s.context), s.seed)
    variants = ["dynamic", *(m for m in s.methods if m not in skip)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    cut = False
    for rep in range(s.prefill_repeats):
        if rep and time.perf_counter() > deadline:
            cut = True
            break
        this: dict[str, float] = {}
        for v in (variants if rep % 2 == 0 else list(reversed(variants))):
            if v in errors:
                continue
            cache = None
            try:
                torch.manual_seed(s.seed)
                with captured_warnings():
                    cache = make_cache(model, v, s.ratio)
                    _, this[v] = timed(lambda c=cache: prefill(model, c, ids), device)
            except Exception as err:  # noqa: BLE001
                errors[v] = one_line(err)
            finally:
                del cache
                release(device)
        for v, t in this.items():
            times[v].append(t)
            if "dynamic" in this:
                ratios[v].append(t / this["dynamic"])
    rows: dict[str, Any] = {}
    for v in ["dynamic", *s.methods]:
        if v in skip:
            rows[v] = {"status": "FAILED", "error": skip[v]}
        elif v in errors:
            rows[v] = {"status": "FAILED", "error": errors[v]}
        else:
            rows[v] = {"status": "ok", "prefill_s": summary(times[v]), "vs_dynamic": summary(ratios[v])}
    log(f"  d. prefill at {s.context}: " + ", ".join(
        f"{v} x{r['vs_dynamic']['median']:.2f}" if r["status"] == "ok" and r.get("vs_dynamic") else f"{v} FAILED"
        for v, r in rows.items() if v != "dynamic"))
    return {"context": s.context, "repeats_done": len(times["dynamic"]), "cut_by_time_budget": cut, "rows": rows}


# -- header and report ----------------------------------------------------------------------------------------------
def header(s: Settings) -> dict[str, Any]:
    import transformers

    from ..results import provenance

    prov = provenance(s.seed, str(s.device), torch.get_num_threads())
    h: dict[str, Any] = {
        "smoke": s.smoke, "command": s.command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": prov["git_commit"], "torch": torch.__version__, "transformers": transformers.__version__,
        "python": prov["python"], "kvcompress": prov["kvcompress"], "dtype": "bfloat16", "seed": s.seed,
        "device": str(s.device),
    }
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        h.update(gpu=torch.cuda.get_device_name(s.device), gpu_memory_bytes=props.total_memory,
                 capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        h.update(gpu=None, cpu_threads=torch.get_num_threads())
    return h


def _mib(x: Any) -> str:
    """Bytes in MiB: whole MiB from 100 up, one decimal from 1, three significant digits below (smoke sizes)."""
    if x is None:
        return "–"
    v = x / MiB
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def _stat(d: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    if not d:
        return "–"
    return f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}–{d['max'] * scale:.{digits}f})"


def _fail(error: str) -> str:
    return "FAILED: `" + error.replace("|", "/").replace("`", "'") + "`"


def render(results: dict[str, Any]) -> str:
    """The Markdown report (every figure in it comes from ``results``; nothing is estimated)."""
    h, s = results["header"], results["settings"]
    lines = ["# GPU acceptance run (`python -m kvcompress.bench gpu`)", ""]
    if h["smoke"]:
        lines += ["> **CPU SMOKE RUN — tiny model on the CPU; these are NOT GPU figures.** Same code path as the GPU "
                  "run at tiny sizes: times are CPU times, the CUDA allocator columns are empty.", ""]
    if not results.get("complete"):
        done = ", ".join(results.get("parts_done", [])) or "none"
        why = f" ({results['aborted']})" if "aborted" in results else ""
        lines += [f"**INCOMPLETE**: the run stopped after parts {done}{why}.", ""]
    lines += header_lines(h, results)
    if "equivalence" in results:
        lines += equivalence_lines(results["equivalence"], s)
    if "methods" in results:
        lines += methods_lines(results["methods"], results, s)
    if "decode" in results:
        lines += decode_lines(results["decode"], s)
    if "prefill" in results:
        lines += prefill_lines(results["prefill"])
    return "\n".join(lines) + "\n"


def header_lines(h: dict[str, Any], results: dict[str, Any]) -> list[str]:
    gpu = (f"{h['gpu']} ({_mib(h['gpu_memory_bytes'])} MiB, compute capability {h['capability']}, CUDA {h['cuda']})"
           if h.get("gpu") else f"none — CPU, {h.get('cpu_threads')} thread(s)")
    wall = results.get("wall_seconds")
    rows = [("GPU", gpu), ("torch / transformers", f"{h['torch']} / {h['transformers']}"),
            ("git commit", h.get("git_commit") or "unknown"), ("date", h["date"]), ("command", f"`{h['command']}`"),
            ("wall time", f"{wall:.0f} s" if wall is not None else "–"), ("dtype, seed", f"{h['dtype']}, {h['seed']}")]
    if "model" in results:
        m = results["model"]
        rows.append(("model (b–d)", f"random-init Llama, Llama-3.1-8B's shape with {m['num_hidden_layers']} layers: "
                     f"hidden {m['hidden']}, {m['query_heads']} query / {m['kv_heads']} KV heads of dim "
                     f"{m['head_dim']}, intermediate {m['intermediate']}, vocab {m['vocab']}, rope "
                     f"{m['rope'].get('rope_type')} θ {m['rope'].get('rope_theta'):g}; {_mib(m['param_bytes'])} MiB "
                     "of weights, KV "
                     f"{m['kv_bytes_per_token'] / 1024:g} KiB/token; sdpa attention"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def equivalence_lines(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    out = [f"## a. Equivalence: `compress(model, \"{s['reference']}\")` vs `DynamicCache`", "",
           "Greedy `generate` (`do_sample=False`, `output_logits=True`) on a left-padded batch; tiny random-init "
           "models (2 layers, hidden 128, 4 query / 2 KV heads; lm_head ×8 so greedy decoding is far from ties, q/k "
           "projections ×4 so attention is sharp enough that a wrong position or a lost entry shows in the logits). "
           "Tolerance: max |Δlogit| ≤ 2⁻⁵ × max |logit| (4 bf16 ulps at the largest logit).", "",
           "| architecture | batch (prompt lengths) | new tokens | tokens identical | max abs logit diff | tolerance "
           "| result |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['architecture']} | {r['batch']} | {r['new_tokens']} | – | – | – | {_fail(r['error'])} |")
            continue
        out.append(f"| {r['architecture']} | {r['batch']} ({', '.join(map(str, r['prompt_lengths']))}) | "
                   f"{r['new_tokens']} | {'yes' if r['tokens_identical'] else 'NO'} | {r['max_abs_logit_diff']:.4g} | "
                   f"{r['tolerance']:.4g} | {'PASS' if r['passed'] else 'FAIL'} |")
    return out + [""]


def methods_lines(rows: list[dict[str, Any]], results: dict[str, Any], s: dict[str, Any]) -> list[str]:
    out = [f"## b. Every method: {s['context']}-token prefill + {s['steps']} greedy decode steps", "",
           f"Methods with a `ratio` get ratio={s['ratio']:g} (hidden-axis ones included); the others keep their "
           "defaults (parameters column). "
           "kept/resident/dense: `cache.memory_report()` after decoding. allocated growth: "
           "`torch.cuda.memory_allocated()` after prefill + decode (prefill outputs deleted) minus before the cache "
           "was created; peak: `max_memory_allocated()` over the same baseline (peak stats reset per method); "
           "unaccounted = growth − resident − workspace. Decode: mean over the steps, synchronised per step. "
           "`dynamic` is the stock `DynamicCache` (reference row).", "",
           "| method | kept MiB | resident MiB | dense MiB | kept fraction | allocated growth MiB "
           "| peak over baseline MiB | unaccounted MiB | prefill s | decode ms/step | parameters |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "FAILED":
            cells = [r["method"], _fail(f"{r.get('failed_in', '')}: {r['error']}"), *[""] * 9]
            out.append("| " + " | ".join(cells) + " |")
            continue
        out.append(f"| {r['method']} | {_mib(r['kept_bytes'])} | {_mib(r['resident_bytes'])} | "
                   f"{_mib(r['dense_bytes'])} | {r['kept_fraction']:.3f} | {_mib(r.get('allocated_growth_bytes'))} | "
                   f"{_mib(r.get('peak_over_baseline_bytes'))} | {_mib(r.get('unaccounted_bytes'))} | "
                   f"{r['prefill_s']:.3f} | {r['decode_ms_mean']:.2f} | `{r['params']}` |")
    failed = [r["method"] for r in rows if r["status"] == "FAILED"]
    out += ["", f"FAILED: {', '.join(failed)}." if failed else "No method failed."]
    notes = [f"* {r['method']}: {w}" for r in rows for w in r.get("warnings", [])]
    if notes:
        out += ["", "Warnings raised:", "", *notes]
    return out + [""]


def decode_lines(by_context: dict[str, Any], s: dict[str, Any]) -> list[str]:
    out = ["## c. Decode step vs DynamicCache", "",
           f"Each variant prefilled once per context, then {s['repeats']} interleaved repeats of {s['warmup']} warm-up "
           f"+ {s['timing_steps']} timed greedy steps; figure = median (min–max) over repeats of the per-step median; "
           "ratio to DynamicCache taken within each repeat.", "",
           "| context | variant | ms/step | vs DynamicCache | kept MiB | parameters |", "|---|---|---|---|---|---|"]
    for context, block in by_context.items():
        for v, r in block["rows"].items():
            if r["status"] == "FAILED":
                out.append(f"| {context} | {v} | {_fail(r['error'])} | | | |")
            else:
                out.append(f"| {context} | {v} | {_stat(r['step_ms'])} | {_stat(r['vs_dynamic'])} | "
                           f"{_mib(r['kept_bytes'])} | `{r['params']}` |")
        if block["cut_by_time_budget"]:
            out.append(f"| {context} | (repeats cut to {block['repeats_done']} by --time-budget) | | | | |")
    return out + [""]


def prefill_lines(block: dict[str, Any]) -> list[str]:
    out = [f"## d. Prefill overhead at {block['context']} tokens", "",
           f"Prefill time with the method / with DynamicCache, within each repeat ({block['repeats_done']} repeat(s)"
           + (", cut by --time-budget" if block["cut_by_time_budget"] else "") + "); median (min–max).", "",
           "| method | prefill s | vs DynamicCache |", "|---|---|---|"]
    for v, r in block["rows"].items():
        if r["status"] == "FAILED":
            out.append(f"| {v} | {_fail(r['error'])} | |")
        else:
            out.append(f"| {v} | {_stat(r['prefill_s'], 3)} | {_stat(r['vs_dynamic'])} |")
    return out + [""]


def write(results: dict[str, Any], s: Settings, log: Log) -> None:
    results["wall_seconds"] = log.elapsed()
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    s.out.write_text(render(results))


# -- main -------------------------------------------------------------------------------------------------------------
def failures(results: dict[str, Any]) -> list[str]:
    """What did not pass: ``equivalence:<arch>`` and ``<method>`` (parts b–d)."""
    bad = [f"equivalence:{r['architecture']}" for r in results.get("equivalence", []) if not r["passed"]]
    bad += ["aborted"] if "aborted" in results else []
    names = [r["method"] for r in results.get("methods", []) if r["status"] == "FAILED"]
    for block in results.get("decode", {}).values():
        names += [v for v, r in block["rows"].items() if r["status"] == "FAILED"]
    names += [v for v, r in results.get("prefill", {}).get("rows", {}).items() if r["status"] == "FAILED"]
    return bad + list(dict.fromkeys(names))


def run(s: Settings) -> int:
    import transformers

    log = Log()
    deadline = time.perf_counter() + s.time_budget
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if s.smoke:
            log(SMOKE_BANNER)
        results: dict[str, Any] = {"header": header(s), "complete": False, "parts_done": [],
                                   "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in dataclasses.asdict(s).items()}}
        h = results["header"]
        log(f"kvcompress.bench gpu on {h.get('gpu') or 'CPU'}: torch {h['torch']}, transformers {h['transformers']}, "
            f"parts {','.join(s.parts)}, methods {len(s.methods)}, context {s.context}, layers {s.layers} -> {s.out}")
        torch.manual_seed(s.seed)
        if "equivalence" in s.parts:
            results["equivalence"] = [check_equivalence(arch, s, log) for arch in EQUIVALENCE_ARCHS]
            results["parts_done"].append("equivalence")
            write(results, s, log)
            release(s.device, empty=True)
        if set(s.parts) & {"methods", "decode", "prefill"}:
            try:
                run_big_model_parts(results, s, log, deadline)
            except Exception as err:  # noqa: BLE001 — keep what was measured, say why the rest is missing
                results["aborted"] = one_line(err)
                log(f"ABORTED: {results['aborted']}")
                release(s.device, empty=True)
        results["complete"] = "aborted" not in results
        write(results, s, log)
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = failures(results)
    log(f"done in {log.elapsed():.0f} s -> {s.out}, {s.json_path}"
        + (f"; FAILED: {', '.join(bad)}" if bad else "; every check passed")
        + (f"  [{SMOKE_BANNER}]" if s.smoke else ""))
    return 1 if bad else 0


def run_big_model_parts(results: dict[str, Any], s: Settings, log: Log, deadline: float) -> None:
    """Parts b–d on one random-init model of Llama-3.1-8B's shape."""
    import kvcompress

    model = build_model(llama8b_config(s.layers, s.smoke), s.device, s.seed)
    kvcompress.attach(model)  # every variant, DynamicCache included, runs through the same attention function
    results["model"] = describe_model(model)
    log(f"model: {s.layers} layers of Llama-3.1-8B's shape, {_mib(results['model']['param_bytes'])} MiB; warm-up")
    warm = random_ids(model, (1, min(s.context, 2048)), s.seed + 1)
    cache = make_cache(model, "dynamic", s.ratio)
    timed_steps(model, cache, prefill(model, cache, warm), 2, s.device)
    del cache
    release(s.device, empty=True)
    if "methods" in s.parts:
        results["methods"] = run_methods(model, s, log)
        results["parts_done"].append("methods")
        write(results, s, log)
    if s.device.type == "cuda" and not device_usable(s.device):
        raise RuntimeError("the CUDA context became unusable in part b; parts c and d were not run")
    if "decode" in s.parts:
        results["decode"] = run_decode(model, s, log, deadline)
        results["parts_done"].append("decode")
        write(results, s, log)
    if "prefill" in s.parts:
        skip = {r["method"]: f"see b ({r.get('failed_in')}): {r['error']}" for r in results.get("methods", [])
                if r["status"] == "FAILED" and r.get("failed_in") in ("setup", "cache", "prefill", "not run")}
        results["prefill"] = run_prefill(model, s, log, deadline, skip)
        results["parts_done"].append("prefill")
    del model
    release(s.device, empty=True)


def run_command(cfg: Any, argv: list[str]) -> int:
    """The run on the composed config; 0 also when CUDA is absent and the run is skipped."""
    s = settings(cfg, argv)
    if not s.smoke and not torch.cuda.is_available():
        print(skip_line(s.out), flush=True)
        return 0
    return run(s)


def command(argv: list[str]) -> Command:
    return Command("bench/gpu", lambda cfg: run_command(cfg, argv), """The GPU acceptance run on one NVIDIA GPU
        (bf16, fixed seed, < 8 minutes): a. compress(model, reference) vs DynamicCache under greedy generate on a
        left-padded batch (tiny Llama and Qwen2); b. every registered method on a random-init model of
        Llama-3.1-8B's shape: 32K prefill + 64 decode steps, kept / resident / dense bytes and CUDA memory; c. decode
        step of decode_methods vs DynamicCache at 8K and 32K; d. prefill time of every method vs DynamicCache.
        Writes paper_tables/gpu.md + gpu.json; without CUDA it prints one skip line and exits 0; smoke=true runs it
        on the CPU at tiny sizes (never GPU figures). Exit status 1 when a check failed, 2 on a bad option.""")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 also when CUDA is absent and the run is skipped)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = cli_main("python -m kvcompress.bench gpu", {"gpu": command(args)}, args, default="gpu")
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
