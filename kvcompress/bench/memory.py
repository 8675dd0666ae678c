"""Memory per method: resident bytes (the cache's tensors) vs ``kept_bytes`` vs the process's peak RSS.

Each model runs in a fresh subprocess started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large tensor is its own
mmap and goes back to the system when freed, so RSS tracks live tensors). For each method, in turn: RSS before,
reset the peak (``/proc/self/clear_refs`` 5), prefill ``context`` tokens + ``steps`` decode steps, then read
``VmHWM`` (peak RSS) and ``VmRSS`` with the cache still alive. Figures:

* ``resident_bytes`` / ``kept_bytes`` — the cache's own accounting (allocated incl. append headroom / used extents);
* ``storage_bytes`` — independent: the distinct storages behind every tensor the cache holds (catches views into
  larger allocations that ``resident_bytes`` would not see);
* ``rss_retained`` — RSS after minus before with the cache alive (≈ resident + allocator slack);
* ``peak_growth`` — peak RSS during prefill + decode minus RSS before (the prefill's transient activations and
  attention scratch dominate it). tracemalloc does not see torch allocations, hence RSS.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import torch

from ..compat import cache_arg
from .common import load_avg, storage_bytes


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def child(spec: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from .common import load_bench_model, make_cache, prepare, prompt_ids, quiet

    torch.set_num_threads(int(spec["threads"]))
    bm = load_bench_model(OmegaConf.create(spec["model"]))
    methods = spec["methods"]
    prepare(bm, methods)
    ids = prompt_ids(bm.model, int(spec["context"]))
    token = torch.tensor([[5]])
    # warm-up (first-call allocations would otherwise be charged to the first method)
    with quiet():
        warm = make_cache(bm.model, spec["warmup"], None)
        bm.model(ids[:, :256], **cache_arg(warm), logits_to_keep=1)
        bm.model(token, **cache_arg(warm))
    del warm
    rows = {}
    for m in methods:
        gc.collect()
        before = _status("VmRSS")
        resettable = _reset_peak()
        cache = make_cache(bm.model, m, float(spec["ratio"]))
        with quiet():
            bm.model(ids, **cache_arg(cache), logits_to_keep=1)
            for _ in range(int(spec["steps"])):
                bm.model(token, **cache_arg(cache))
        gc.collect()
        peak = _status("VmHWM")
        after = _status("VmRSS")
        row = {"kept_bytes": cache.kept_bytes(), "resident_bytes": cache.resident_bytes(),
               "dense_bytes": cache.dense_bytes(), "storage_bytes": storage_bytes(cache),
               "rss_before": before, "rss_retained": after - before, "peak_growth": peak - before,
               "peak_rss": peak, "peak_resettable": resettable, "load_1min": load_avg()[0]}
        row["kept_fraction"] = row["kept_bytes"] / row["dense_bytes"] if row["dense_bytes"] else float("nan")
        rows[m] = row
        del cache
    return {"model": bm.description, "param_bytes": bm.param_bytes, "rows": rows}


def run(model_spec: Any, cfg: Any, methods: list[str], threads: int, log) -> dict[str, Any]:
    from omegaconf import OmegaConf

    spec = {"model": OmegaConf.to_container(model_spec, resolve=True), "methods": methods,
            "context": int(cfg.context), "steps": int(cfg.steps), "ratio": float(cfg.ratio), "threads": threads,
            "warmup": str(cfg.warmup)}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "kvcompress.bench.memory", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"context": spec["context"], "steps": spec["steps"], "ratio": spec["ratio"],
                   "method": "fresh subprocess per model, MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset via clear_refs"})
    log(f"  memory {model_spec.name} {spec['context']}: {len(methods)} methods, load {load_avg()[0]}")
    return result


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
