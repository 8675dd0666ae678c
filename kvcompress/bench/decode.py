"""Decode: time per step vs bytes read per step, against the measured memory bandwidth.

For each model and context every variant is prefilled once (its cache is kept), then, within each repeat, each
variant runs ``steps`` decode steps (variants interleaved, order reversed every other repeat). The figure is the
mean per-step time of a repeat; median over repeats with min–max. Ratios (the reference variant ``decode.reference``
/ ``DynamicCache``, stored as ``<reference>_vs_dynamic``; variant / reference, stored as ``vs_<reference>``) are taken
per repeat, between runs adjacent in time.

Bytes read per step = the bytes the cache holds (``kept_bytes``) + the model's parameter bytes. Fit over the
selection variants that take the dense sdpa path (the reference and uniform token methods at every kept fraction and
context): ``t = a + b · bytes``; ``1/b`` is the effective bandwidth of the decode, compared with the streaming-copy
bandwidth measured in the same run (read + write bytes per second).

Attention-only: one layer's ``attend`` (what the cache runs for a decode step) timed on the held tensors with a
random query: kept fraction r (a token method) vs the reference's dense layer, same context.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..compat import cache_arg
from .common import BenchModel, axis_of, cache_bytes, load_avg, make_cache, prompt_ids, quiet, summary


def parse_variant(v: str) -> tuple[str, float | None]:
    if "@" in v:
        m, r = v.split("@", 1)
        return m, float(r)
    return v, None


@torch.no_grad()
def _steps(model, cache, token, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(token, **cache_arg(cache))
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def _attend_time(bm: BenchModel, cache, query: torch.Tensor, iters: int) -> float:
    layer = cache.layers[0]
    module = bm.model.model.layers[0].self_attn
    start = time.perf_counter()
    for _ in range(iters):
        layer.attend(module, query, None, module.scaling)
    return (time.perf_counter() - start) / iters


def run(bm: BenchModel, cfg: Any, variants_by_context: dict[int, list[str]], log) -> dict[str, Any]:
    ref = str(cfg.reference)
    token = torch.tensor([[5]])
    results: dict[str, Any] = {"param_bytes": bm.param_bytes, "contexts": {}}
    for context, variants in variants_by_context.items():
        ids = prompt_ids(bm.model, context)
        caches: dict[str, Any] = {}
        t0 = time.perf_counter()
        for v in variants:
            method, ratio = parse_variant(v)
            cache = make_cache(bm.model, method, ratio)
            with quiet(), torch.no_grad():
                bm.model(ids, **cache_arg(cache), logits_to_keep=1)
                bm.model(token, **cache_arg(cache))  # warm-up step
            caches[v] = cache
        prefill_wall = time.perf_counter() - t0
        times: dict[str, list[float]] = {v: [] for v in variants}
        loads: dict[str, list[float]] = {v: [] for v in variants}
        ratio_ref: dict[str, list[float]] = {v: [] for v in variants}
        repeats, steps = int(cfg.repeats), int(cfg.steps)
        for rep in range(repeats):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            this: dict[str, float] = {}
            for v in order:
                loads[v].append(load_avg()[0])
                with quiet():
                    this[v] = _steps(bm.model, caches[v], token, steps)
                times[v].append(this[v])
            if ref in this:
                for v in variants:
                    ratio_ref[v].append(this[v] / this[ref])
        rows: dict[str, Any] = {}
        for v in variants:
            method, ratio = parse_variant(v)
            b = cache_bytes(caches[v])
            rows[v] = {
                "method": method, "ratio": ratio, "axis": axis_of(method),
                "step_ms": summary(times[v], 1e3),
                f"vs_{ref}": summary(ratio_ref[v]) if ratio_ref[v] else None,
                "kept_bytes": b["kept"], "resident_bytes": b["resident"], "dense_bytes": b["dense"],
                "kept_fraction": b["kept"] / b["dense"] if b["dense"] else float("nan"),
                "bytes_read": b["kept"] + bm.param_bytes,
                "ragged": any(getattr(layer, "ragged", None) is not None for layer in caches[v].layers),
                "load_1min": summary(loads[v]),
            }
            rows[v]["effective_GBps"] = rows[v]["bytes_read"] / (rows[v]["step_ms"]["median"] * 1e-3) / 1e9
        # attention only: one layer's attend at each token-method variant vs the reference's dense layer
        attention: dict[str, Any] = {}
        if ref in caches and cfg.get("attention_iters", 0):
            cfg_model = bm.model.config
            head_dim = getattr(cfg_model, "head_dim", None) or cfg_model.hidden_size // cfg_model.num_attention_heads
            q = torch.randn(1, cfg_model.num_attention_heads, 1, head_dim, generator=torch.Generator().manual_seed(0))
            targets = [v for v in variants if v != ref and rows[v]["axis"] == "token"]
            att: dict[str, list[float]] = {v: [] for v in [ref, *targets]}
            att_ratio: dict[str, list[float]] = {v: [] for v in targets}
            for _ in range(int(cfg.attention_repeats)):
                dense = _attend_time(bm, caches[ref], q, int(cfg.attention_iters))
                att[ref].append(dense)
                for v in targets:
                    t = _attend_time(bm, caches[v], q, int(cfg.attention_iters))
                    att[v].append(t)
                    att_ratio[v].append(t / dense)
            for v in att:
                attention[v] = {"attend_us": summary(att[v], 1e6),
                                "vs_dense": summary(att_ratio[v]) if v in att_ratio else None,
                                "kept_fraction": rows[v]["kept_fraction"]}
        out = {"steps": steps, "repeats": repeats, "rows": rows, "attention": attention, "prefill_wall_s": prefill_wall,
               "load_end": load_avg()}
        if "dynamic" in times and ref in times:
            out[f"{ref}_vs_dynamic"] = summary([f / d for f, d in zip(times[ref], times["dynamic"])])
        results["contexts"][str(context)] = out
        log(f"  decode {bm.name} {context}: {len(variants)} variants, load {load_avg()[0]}; "
            + ", ".join(f"{v} {rows[v]['step_ms']['median']:.1f} ms" for v in variants))
        del caches
    results["fit"] = fit(results, ref)
    return results


def fit(results: dict[str, Any], reference: str) -> dict[str, Any]:
    """Least squares ``t = a + b·bytes`` over dense-path selection variants (the reference + uniform token
    methods)."""
    xs, ys, used = [], [], []
    for context, out in results["contexts"].items():
        for v, row in out["rows"].items():
            if (v == reference or row["axis"] == "token") and not row["ragged"]:
                xs.append(row["bytes_read"])
                ys.append(row["step_ms"]["median"] * 1e-3)
                used.append(f"{v}@{context}")
    if len(set(xs)) < 2:
        return {"points": len(xs)}
    A = np.stack([np.ones(len(xs)), np.array(xs, dtype=float)], 1)
    (a, b), *_ = np.linalg.lstsq(A, np.array(ys), rcond=None)
    pred = A @ np.array([a, b])
    ss_res = float(((np.array(ys) - pred) ** 2).sum())
    ss_tot = float(((np.array(ys) - np.mean(ys)) ** 2).sum())
    return {"points": len(xs), "variants": used, "a_ms": a * 1e3, "b_s_per_GB": b * 1e9,
            "effective_GBps": (1 / b) / 1e9 if b > 0 else float("inf"), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}
