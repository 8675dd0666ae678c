"""Peak memory while decoding with ``quant``: resident cache + at most one layer's dense K/V (+ model), measured.

    python benchmarks/quant_memory.py [--context 8192] [--steps 48] [--bits 4] [--threads 1]

Method: the process's resident set (``VmRSS``/``VmHWM`` of /proc/self/status, Linux). The script re-executes itself
with ``MALLOC_MMAP_THRESHOLD_=65536`` so every large tensor is its own mmap and is returned to the system when freed
(RSS then tracks live tensors closely). After the prefill it records the RSS, resets the peak (``clear_refs`` 5),
runs ``--steps`` decode steps (crossing at least one flush of a whole group into the quantized store) and reads the
peak. The transient during decoding (peak − RSS before decoding) is compared with one layer's dense K/V at the final
context length plus the attention scratch that the ``full`` cache's decode needs as well (scores, softmax): the bound holds if attention dequantizes one block at a time, and fails for any whole-cache
dequantized copy (which would be ``layers ×`` that). The same is printed for the ``full`` cache as a reference.
Model: the constructed testbed (3 layers, 2 KV heads, head_dim 128, fp32).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

from kvcompress.compat import cache_arg

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import kvcompress  # noqa: E402
from kvcompress.zoo.testbed import load  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


MB = 1 / 2**20


@torch.no_grad()
def measure(model, prompt: torch.Tensor, method: str, steps: int, **params) -> dict:
    cache = kvcompress.compress(model, method, **params)
    model(prompt, **cache_arg(cache), logits_to_keep=1)
    gc.collect()
    token = torch.tensor([[5]])
    model(token, **cache_arg(cache))  # warm-up step (first-call allocations)
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    for _ in range(steps):
        model(token, **cache_arg(cache))
    peak = _status("VmHWM")
    cfg = model.config
    n = cache.layers[0].logical
    one_layer = 2 * cfg.num_key_value_heads * n * cfg.head_dim * 4  # keys + values, fp32, batch 1
    return {"method": method, "context": n, "rss_before_decode": before, "peak_rss": peak, "transient": peak - before,
            "resident_cache": cache.resident_bytes(), "kept_bytes": cache.kept_bytes(), "dense_cache": cache.dense_bytes(),
            "one_layer_dense_kv": one_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(3, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    rows = [measure(model, prompt, "quant", args.steps, bits=args.bits),
            measure(model, prompt, "full", args.steps)]
    print(f"testbed model ({model_bytes * MB:.1f} MiB of parameters), context {args.context}, {args.steps} decode steps, "
          f"MALLOC_MMAP_THRESHOLD_=65536")
    for r in rows:
        bound = r["resident_cache"] + r["one_layer_dense_kv"] + model_bytes
        print(f"{r['method']:>6}: resident cache {r['resident_cache'] * MB:7.2f} MiB (dense {r['dense_cache'] * MB:.2f}), "
              f"one layer dense K/V {r['one_layer_dense_kv'] * MB:.2f} MiB, model {model_bytes * MB:.2f} MiB")
        print(f"        RSS before decode {r['rss_before_decode'] * MB:.1f} MiB, peak during decode {r['peak_rss'] * MB:.1f} MiB, "
              f"transient {r['transient'] * MB:.2f} MiB "
              f"({'<=' if r['transient'] <= r['one_layer_dense_kv'] else '>'} one layer dense K/V; "
              f"resident + one layer + model = {bound * MB:.1f} MiB)")
    q, f = rows
    ok = q["transient"] <= q["one_layer_dense_kv"] + f["transient"]
    print(f"quant bound (decode transient <= one layer's dense K/V + the attention scratch the full cache needs too, "
          f"{f['transient'] * MB:.2f} MiB): {'met' if ok else 'NOT met'}; "
          f"a whole-cache dequantized copy would be {model.config.num_hidden_layers * q['one_layer_dense_kv'] * MB:.2f} MiB")

if __name__ == "__main__":
    main()
