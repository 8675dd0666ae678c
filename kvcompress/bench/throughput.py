"""Evaluation throughput: needle samples per minute on the default model (the constructed testbed), through
``eval.needle.run`` (``model.generate``, the same path as ``python -m kvcompress.run``). Methods interleaved
within each repeat; median over repeats with min–max."""

from __future__ import annotations

import time
from typing import Any

from .common import BenchModel, load_avg, make_cache, quiet, summary
from .decode import parse_variant


def run(bm: BenchModel, cfg: Any, log) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from kvcompress.eval import needle

    eval_cfg = OmegaConf.create({"lengths": list(cfg.lengths), "depths": list(cfg.depths) if cfg.get("depths") else None,
                                 "samples": int(cfg.get("samples", 1))})
    variants = list(cfg.methods)
    per_min: dict[str, list[float]] = {v: [] for v in variants}
    loads: dict[str, list[float]] = {v: [] for v in variants}
    accuracy: dict[str, float] = {}
    n_samples = 0
    for rep in range(int(cfg.repeats) + 1):  # first pass warms up
        for v in variants if rep % 2 == 0 else list(reversed(variants)):
            method, ratio = parse_variant(v)
            load = load_avg()[0]
            start = time.perf_counter()
            with quiet():
                res = needle.run(bm.model, lambda: make_cache(bm.model, method, ratio), eval_cfg, seed=0,
                                 tokenizer=bm.tokenizer)
            seconds = time.perf_counter() - start
            n_samples = res["samples"]
            accuracy[v] = res["exact_match"]
            if rep:
                per_min[v].append(60 * res["samples"] / seconds)
                loads[v].append(load)
    out = {"lengths": list(cfg.lengths), "samples_per_run": n_samples,
           "methods": {v: {"samples_per_min": summary(per_min[v]), "exact_match": accuracy[v],
                           "load_1min": summary(loads[v])} for v in variants}}
    log(f"  throughput {bm.name}: " + ", ".join(f"{v} {out['methods'][v]['samples_per_min']['median']:.0f}/min"
                                                 for v in variants))
    return out
