"""Prefill: the plain model vs the model + each method (scoring + gather), overhead as a ratio.

For each model and context, within each repeat the plain model (stock ``DynamicCache``) is run between the methods
(every ``plain_every`` methods), and each method's prefill time is divided by the mean of the plain runs right
before and after it: ``overhead = t_method / t_plain − 1``, a ratio taken in the same run, adjacent in time.
The time spent inside the compression hook (``KVCompressCache._prefill``: materialise the view, score, select,
gather and store, every layer) is also recorded, giving ``hook / (t_method − hook)``, which is less sensitive to
machine noise. ``logits_to_keep=1``, ``torch.no_grad()``; one warm-up pass per method at the first context.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..compat import cache_arg
from .common import BenchModel, axis_of, load_avg, make_cache, prompt_ids, quiet, summary


@torch.no_grad()
def one_prefill(bm: BenchModel, method: str, ratio: float, ids: torch.Tensor) -> dict[str, float]:
    cache = make_cache(bm.model, method, ratio)
    hook = [0.0]
    if hasattr(cache, "_prefill"):
        original = cache._prefill

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                hook[0] += time.perf_counter() - start

        cache._prefill = timed
    with quiet():
        start = time.perf_counter()
        bm.model(ids, **cache_arg(cache), logits_to_keep=1)
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "hook": hook[0]}
    if hasattr(cache, "kept_bytes"):
        dense = cache.dense_bytes()
        out["kept_fraction"] = cache.kept_bytes() / dense if dense else float("nan")
    return out


def run(bm: BenchModel, cfg: Any, methods_by_context: dict[int, list[str]], log) -> dict[str, Any]:
    ratio = float(cfg.ratio)
    results: dict[str, Any] = {"ratio": ratio, "contexts": {}}
    first = True
    for context, methods in methods_by_context.items():
        ids = prompt_ids(bm.model, context)
        repeats = int(cfg.repeats_by_context.get(context, cfg.repeats)) if "repeats_by_context" in cfg else int(cfg.repeats)
        repeats = int((cfg.get("repeats_by_model", {}) or {}).get(bm.name, repeats))
        every = int(cfg.plain_every_by_context.get(context, cfg.plain_every)) if "plain_every_by_context" in cfg \
            else int(cfg.plain_every)
        if first:  # warm-up: first-call allocations, lazy imports, artifacts
            for m in ["plain", *methods]:
                one_prefill(bm, m, ratio, prompt_ids(bm.model, min(context, 512)))
            first = False
        rows: dict[str, dict[str, list]] = {m: {"ratio": [], "hook_ratio": [], "seconds": [], "kept_fraction": [],
                                                "load": []} for m in methods}
        plain_seconds: list[float] = []
        t0 = time.perf_counter()
        for rep in range(repeats):
            order = methods if rep % 2 == 0 else list(reversed(methods))  # drift hits both ends alike
            plain_before = one_prefill(bm, "plain", ratio, ids)["seconds"]
            plain_seconds.append(plain_before)
            pending: list[tuple[str, dict]] = []
            for i, m in enumerate(order):
                load = load_avg()[0]
                r = one_prefill(bm, m, ratio, ids)
                r["load"] = load
                pending.append((m, r))
                if (i + 1) % every == 0 or i == len(order) - 1:
                    plain_after = one_prefill(bm, "plain", ratio, ids)["seconds"]
                    plain_seconds.append(plain_after)
                    base = 0.5 * (plain_before + plain_after)
                    for name, res in pending:
                        row = rows[name]
                        row["ratio"].append(res["seconds"] / base)
                        model_part = res["seconds"] - res["hook"]
                        row["hook_ratio"].append(res["hook"] / model_part if model_part > 0 else float("nan"))
                        row["seconds"].append(res["seconds"])
                        row["kept_fraction"].append(res.get("kept_fraction", float("nan")))
                        row["load"].append(res["load"])
                    pending, plain_before = [], plain_after
        out = {"plain_seconds": summary(plain_seconds), "methods": {}}
        for m, row in rows.items():
            out["methods"][m] = {
                "axis": axis_of(m),
                "time_ratio": summary(row["ratio"]),
                "overhead": summary([x - 1 for x in row["ratio"]]),
                "hook_overhead": summary(row["hook_ratio"]),
                "seconds": summary(row["seconds"]),
                "kept_fraction": summary(row["kept_fraction"]),
                "load_1min": summary(row["load"]),
            }
        out["repeats"], out["plain_every"] = repeats, every
        out["wall_seconds"] = time.perf_counter() - t0
        results["contexts"][str(context)] = out
        log(f"  prefill {bm.name} {context}: {len(methods)} methods x {repeats} repeats in {out['wall_seconds']:.0f} s "
            f"(plain {out['plain_seconds']['median']:.2f} s, load {load_avg()[0]})")
    return results
