"""Token scorers on the tiny model: compression overhead at 4K and peak memory at 16K.

    python scripts/token_overhead.py [--methods snapkv,knorm,tova,h2o,expected_attention]
                                        [--overhead-context 4096] [--peak-context 16384] [--repeats 3] [--threads 1]

Overhead: the time spent in compression during the prefill (materialising the layer view, scoring, selecting and
storing the kept entries, i.e. the whole ``KVCompressCache._prefill`` hook, every layer) divided by the rest of the
prefill forward (the model's own work). Median over repeats, ratio=0.25, batch 1. Targets: ≤ 5% for snapkv, knorm,
tova; ≤ 20% for h2o and expected_attention.

Peak memory: each method runs a 16K prefill+compression in a fresh subprocess; the figure is the growth of the
process's peak RSS during that prefill (``ru_maxrss`` after minus the RSS before), next to ``full`` (no compression)
and to the size of one dense S×S float32 attention matrix (one head) and of the layer's (all query heads).
A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from omegaconf import OmegaConf

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.models import load_model


def _model():
    return load_model(OmegaConf.create({"builtin": "tiny-random", "name": "tiny-random"}), dtype="float32").model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def overhead(model, method: str, context: int, repeats: int) -> dict:
    prompt = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ratios = []
    for _ in range(repeats + 1):  # the first run warms up
        cache = kvcompress.compress(model, method, ratio=0.25)
        spent = [0.0]
        original = cache._prefill

        def timed(*args, **kwargs):
            start = time.perf_counter()
            original(*args, **kwargs)
            spent[0] += time.perf_counter() - start

        cache._prefill = timed
        start = time.perf_counter()
        model(prompt, **cache_arg(cache), logits_to_keep=1)
        total = time.perf_counter() - start
        ratios.append((spent[0], total - spent[0]))
    ratios = ratios[1:]
    med = statistics.median(c / m for c, m in ratios)
    return {"method": method, "context": context, "compress_s": statistics.median(c for c, _ in ratios),
            "model_s": statistics.median(m for _, m in ratios), "overhead": med}


@torch.no_grad()
def peak_child(method: str, context: int) -> dict:
    model = _model()
    prompt = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = kvcompress.compress(model, method, ratio=0.25) if method != "full" else kvcompress.compress(model, "full")
    before = _rss_bytes()
    start = time.perf_counter()
    model(prompt, **cache_arg(cache), logits_to_keep=1)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "context": context, "peak_growth_bytes": peak - before, "seconds": seconds,
            "kept_bytes": cache.kept_bytes(), "dense_bytes": cache.dense_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="snapkv,knorm,tova,h2o,expected_attention")
    parser.add_argument("--overhead-context", type=int, default=4096)
    parser.add_argument("--peak-context", type=int, default=16384)
    parser.add_argument("--peak-methods", default="full,snapkv,h2o,tova")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-peak", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(peak_child(args.child[0], int(args.child[1]))))
        return

    model = _model()
    limits = {"snapkv": 0.05, "knorm": 0.05, "tova": 0.05, "h2o": 0.20, "expected_attention": 0.20}
    print(f"compression overhead at {args.overhead_context} tokens (tiny-random, ratio=0.25, {args.threads} thread(s))")
    for method in args.methods.split(","):
        r = overhead(model, method, args.overhead_context, args.repeats)
        limit = limits.get(method)
        flag = "" if limit is None else ("  ok" if r["overhead"] <= limit else f"  OVER the {limit:.0%} target")
        print(f"  {method:20s} compress {r['compress_s'] * 1e3:8.1f} ms  model prefill {r['model_s'] * 1e3:8.1f} ms"
              f"  overhead {r['overhead']:6.1%}{flag}")
    if args.skip_peak:
        return
    s = args.peak_context
    heads = model.config.num_attention_heads
    print(f"\npeak memory growth during a {s}-token prefill + compression (fresh process each)")
    print(f"  dense S×S float32 attention: {s * s * 4 / 2**30:.2f} GiB per head, {heads * s * s * 4 / 2**30:.2f} GiB "
          f"for the layer's {heads} query heads")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    for method in args.peak_methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", method, str(s)],
                             capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {method:20s} peak growth {r['peak_growth_bytes'] / 2**20:8.1f} MiB  "
              f"({r['peak_growth_bytes'] / (s * s * 4):.3f} of one S×S head)  prefill {r['seconds']:6.1f} s  "
              f"kept {r['kept_bytes'] / 2**20:.1f} / dense {r['dense_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
