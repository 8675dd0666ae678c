"""Peak memory while decoding with ``quant``: resident cache + at most one layer's dense K/V (+ model), measured.

    python benchmarks/quant_memory.py [--context 8192] [--steps 48] [--bits 4] [--threads 1] \
        [--out paper_tables/quant_memory.md]

Method: the process's resident set (``VmRSS``/``VmHWM`` of /proc/self/status, Linux). The script re-executes itself
with ``MALLOC_MMAP_THRESHOLD_=65536`` so every large tensor is its own mmap and is returned to the system when freed
(RSS then tracks live tensors closely). After the prefill it records the RSS, resets the peak (``clear_refs`` 5),
runs ``--steps`` decode steps (crossing at least one flush of a whole group into the quantized store) and reads the
peak. The transient during decoding (peak − RSS before decoding) is compared with one layer's dense K/V at the final
context length plus the attention scratch that the ``full`` cache's decode needs as well (scores, softmax): the bound holds if attention dequantizes one block at a time, and fails for any whole-cache
dequantized copy (which would be ``layers ×`` that). The same is printed for the ``full`` cache as a reference.
Model: the constructed testbed (3 layers, 2 KV heads, head_dim 128, fp32).

Bounds checked (all three must hold; the script exits 1 otherwise), each side measured:

1. the issue's bound, **above the process baseline**: peak RSS while decoding with ``quant`` − baseline ≤ model
   parameters + resident cache + one layer's dense fp32 K/V. RSS always includes the interpreter, torch and the
   other libraries, and after a long prefill some heap the allocator keeps; the baseline is what the process holds
   besides the model and the cache after the same prefill: RSS before decoding with the ``full`` cache − its resident
   cache − the model's parameter bytes. (The library baseline alone — RSS after a 16-token forward, minus the
   parameters — is reported too.)
2. decode transient (peak − RSS right before decoding) ≤ one layer's dense K/V + the transient of the ``full``
   cache's own decode (attention scores/softmax, which any cache needs).
3. the attention workspace — a per-cache buffer that an encoded block's keys, then values, are dequantized into,
   reused across steps, reported as ``workspace_bytes`` by ``cache.memory_report()`` — is at most one layer's dense
   fp32 K/V.

``--out`` writes the figures as Markdown (default ``paper_tables/quant_memory.md``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

from kvcompress.compat import cache_arg

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import kvcompress  # noqa: E402
from kvcompress.bench.common import machine  # noqa: E402
from kvcompress.methods.hidden.packing import SLAB_BYTES  # noqa: E402
from kvcompress.methods.hidden.quant import Quant  # noqa: E402
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
COLUMNS = ("resident cache", "dense cache", "one layer dense K/V", "workspace", "RSS before decode", "peak RSS",
           "transient")


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
    report = cache.memory_report()
    cfg = model.config
    n = cache.layers[0].logical
    one_layer = 2 * cfg.num_key_value_heads * n * cfg.head_dim * 4  # keys + values, fp32, batch 1
    return {"method": method, "context": n, "rss_before_decode": before, "peak_rss": peak, "transient": peak - before,
            "resident_cache": cache.resident_bytes(), "kept_bytes": cache.kept_bytes(), "dense_cache": cache.dense_bytes(),
            "one_layer_dense_kv": one_layer, "workspace": report["workspace_bytes"],
            "encoded_tokens": sum(s.count for s in cache.layers[0].segments if s.codec is not None)}


def library_rss(model) -> int:
    """RSS of the interpreter + torch + libraries: after a 16-token full-cache forward (kernels' pages mapped), minus
    the model's parameters."""
    with torch.no_grad():
        model(torch.arange(3, 19).view(1, -1), **cache_arg(kvcompress.compress(model, "full")))
    gc.collect()
    return _status("VmRSS") - sum(p.numel() * p.element_size() for p in model.parameters())


def bounds(q: dict, f: dict, model_bytes: int) -> tuple[int, list[tuple[str, int, int]]]:
    """The process baseline and (name, measured, limit) of the three checked bounds (see the module docstring)."""
    baseline = f["rss_before_decode"] - f["resident_cache"] - model_bytes
    one = q["one_layer_dense_kv"]
    return baseline, [
        ("peak RSS (quant) − baseline ≤ model + resident cache + one layer's dense K/V", q["peak_rss"] - baseline,
         model_bytes + q["resident_cache"] + one),
        ("decode transient ≤ one layer's dense K/V + full cache's decode transient", q["transient"],
         one + f["transient"]),
        ("workspace_bytes ≤ one layer's dense fp32 K/V", q["workspace"], one),
    ]


def markdown(rows: list[dict], checks: list[tuple[str, int, int]], model_bytes: int, baseline: int, library: int,
             args, seconds: float, config) -> str:
    q = rows[0]
    mi = machine()
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    quant = Quant(bits=args.bits)
    # Workspace: one encoded block's keys *or* values in fp32 (half of the layer's encoded K/V) + the unpack slab.
    block = q["one_layer_dense_kv"] * q["encoded_tokens"] / q["context"] / 2
    packed_keys = block * args.bits / 32
    predicted = block + min(packed_keys, SLAB_BYTES)
    over = q["peak_rss"] - baseline - model_bytes - q["resident_cache"]
    lines = [
        "# Peak memory while decoding with `quant` (KIVI layout) on the constructed testbed",
        "",
        (f"Context {q['context']} tokens (random token ids), {args.steps} decode steps after a warm-up step, "
         f"`quant bits={args.bits}` (G={quant.group}, R={quant.residual}) vs the `full` cache; testbed model ({layers} "
         f"layers, {config.num_key_value_heads} KV heads, head_dim {head_dim}, {str(config.dtype).removeprefix('torch.')}, "
         f"{model_bytes * MB:.2f} MiB of parameters). Memory = the process's resident set "
         "(VmRSS; peak = VmHWM after resetting it before decoding), with `MALLOC_MMAP_THRESHOLD_=65536` so freed "
         "tensors leave the RSS. **RSS includes the Python/torch baseline**: interpreter, torch and libraries "
         f"{library * MB:.1f} MiB (RSS after a 16-token forward, minus the parameters); the baseline used below adds "
         f"what the allocator keeps after the {q['context']}-token prefill: {baseline * MB:.1f} MiB = RSS before "
         "decoding with the `full` cache − its resident cache − the parameters."),
        "",
        "| cache | " + " | ".join(f"{c} (MiB)" for c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for r in rows:
        name = f"quant {args.bits}-bit" if r["method"] == "quant" else r["method"]
        lines.append(f"| {name} | {r['resident_cache'] * MB:.2f} | {r['dense_cache'] * MB:.2f} | "
                     f"{r['one_layer_dense_kv'] * MB:.2f} | {r['workspace'] * MB:.2f} | "
                     f"{r['rss_before_decode'] * MB:.1f} | {r['peak_rss'] * MB:.1f} | {r['transient'] * MB:.2f} |")
    lines += ["", "Bounds checked for `quant` (measured vs limit):", "",
              "| bound | measured (MiB) | limit (MiB) | held |", "|---|---|---|---|"]
    for name, measured, limit in checks:
        lines.append(f"| {name} | {measured * MB:.2f} | {limit * MB:.2f} | {'yes' if measured <= limit else 'NO'} |")
    lines += [
        "",
        (f"Above baseline + model + resident cache, decoding with `quant` peaks {over * MB:.2f} MiB higher, mostly the "
         f"attention workspace ({q['workspace'] * MB:.2f} MiB, allocated once and reused) plus the per-step transient "
         f"({q['transient'] * MB:.2f} MiB; the `full` cache's decode needs {rows[1]['transient'] * MB:.2f} MiB), "
         f"against {q['one_layer_dense_kv'] * MB:.2f} MiB allowed for one layer's dense K/V. The attention dequantizes "
         "an encoded block's keys, takes the scores, then its values into the same fp32 buffer, so the workspace "
         "holds half of one layer's encoded K/V plus a byte slab for unpacking (the packed keys, at most "
         f"{SLAB_BYTES / 1024:.0f} KiB): {q['one_layer_dense_kv'] * MB:.2f} × {q['encoded_tokens']}/{q['context']} / 2 + "
         f"{min(packed_keys, SLAB_BYTES) * MB:.2f} = {predicted * MB:.2f} MiB (measured {q['workspace'] * MB:.2f})."),
        "",
        (f"For scale: a whole-cache dequantized copy would be {layers * q['one_layer_dense_kv'] * MB:.2f} MiB "
         f"({layers} layers × one layer's dense K/V). The attention reconstructs encoded blocks one at a time into "
         "the per-cache reusable workspace (`workspace_bytes` in `cache.memory_report()`, not counted as cache data)."),
        "",
        (f"Generated by `{' '.join(['python benchmarks/quant_memory.py', *sys.argv[1:]])}` in {seconds:.1f} s on "
         f"{mi['cpu']} ({mi['logical_cpus']} cores visible, {mi['torch_threads']} torch thread(s)); torch {mi['torch']}."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "paper_tables" / "quant_memory.md")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, _ = load()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    library = library_rss(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    rows = [measure(model, prompt, "quant", args.steps, bits=args.bits),
            measure(model, prompt, "full", args.steps)]
    baseline, checks = bounds(rows[0], rows[1], model_bytes)
    text = markdown(rows, checks, model_bytes, baseline, library, args, time.perf_counter() - t0, model.config)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all(measured <= limit for _, measured, limit in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
