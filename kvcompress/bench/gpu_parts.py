"""The four measured parts of the GPU acceptance run (:mod:`kvcompress.bench.gpu`): a. the reference method vs
``DynamicCache`` under greedy ``generate`` on a left-padded batch; b. every registered method (prefill + decode,
kept / resident / dense bytes, CUDA allocation growth and peak); c. the decode step vs ``DynamicCache`` at each
decode context; d. the prefill overhead vs ``DynamicCache``. Each returns the raw figures that
:mod:`kvcompress.bench.gpu_report` renders; a failing method is recorded with its error and the part goes on.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from ..compat import cache_arg
from .gpu_device import (
    Log,
    allocated,
    build_model,
    captured_warnings,
    describe_cache,
    device_usable,
    make_cache,
    method_kwargs,
    one_line,
    peak,
    prefill,
    random_ids,
    release,
    reset_peak,
    summary,
    sync,
    timed,
    timed_steps,
    tiny_config,
)
from .gpu_report import _mib

if TYPE_CHECKING:
    from .gpu import Settings

#: max |Δlogit| allowed between the reference method and DynamicCache, as a fraction of the largest |logit| of the
#: reference: 2⁻⁵ = 4 bf16 ulps (bf16 has 8 significant bits) at the largest logit's magnitude — room for a different
#: sdpa kernel or summation order, far below what a wrong key, value or position would cause.
BF16_REL_TOLERANCE = 2.0**-5


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
