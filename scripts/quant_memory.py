"""Peak memory while decoding with ``quant``: resident cache + at most one layer's dense K/V (+ model), measured.

    python scripts/quant_memory.py [context=8192] [steps=48] [bits=4] [threads=1] \
        [rows=paper_tables/rows/quant_memory.jsonl]      (also: python -m kvcompress.sweep quant_memory)

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

Appends the figures as one results row (:class:`kvcompress.results.Row`, task ``quant_memory``) to ``rows``;
``python -m kvcompress.tables quant_memory`` renders ``paper_tables/quant_memory.md`` from it (bounds recomputed
from the figures). Exit status 1 when a bound does not hold.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time

import torch

from kvcompress.compat import cache_arg

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import kvcompress  # noqa: E402
from kvcompress.methods.hidden.packing import SLAB_BYTES  # noqa: E402
from kvcompress.methods.hidden.quant import Quant  # noqa: E402
from kvcompress.results import Row, append_row, check_writable, provenance  # noqa: E402
from kvcompress.tables.quant_memory import bounds  # noqa: E402
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


OPTIONS = {"context": 8192, "steps": 48, "bits": 4, "threads": 1, "rows": "paper_tables/rows/quant_memory.jsonl"}


def main(argv: list[str]) -> int:
    options = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            print(f"error: unknown option {arg!r}; valid: {', '.join(f'{k}=...' for k in options)}", file=sys.stderr)
            return 2
        options[key] = type(OPTIONS[key])(value)
    rows_path = check_writable(options["rows"])
    t0 = time.perf_counter()
    torch.set_num_threads(options["threads"])
    model, _ = load()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    library = library_rss(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, options["context"]), generator=torch.Generator().manual_seed(0))
    caches = [measure(model, prompt, "quant", options["steps"], bits=options["bits"]),
              measure(model, prompt, "full", options["steps"])]
    _, checks = bounds(caches[0], caches[1], model_bytes)
    quant = Quant(bits=options["bits"])
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    run_config = {**{k: v for k, v in options.items() if k != "rows"}, "group": quant.group, "residual": quant.residual,
                  "command": " ".join(["python scripts/quant_memory.py", *argv_shown(argv)])}
    row = Row(
        config_key=hashlib.sha256(json.dumps(run_config, sort_keys=True).encode()).hexdigest()[:16],
        method="quant", task="quant_memory", model={"name": "testbed", "constructed": True, "random_init": False},
        config=run_config, ratio=None,
        accuracy={"caches": caches, "library_rss": library, "slab_bytes": SLAB_BYTES,
                  "model": {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads,
                            "head_dim": head_dim, "dtype": str(config.dtype).removeprefix("torch."),
                            "parameter_bytes": model_bytes},
                  "bounds_held": all(measured <= limit for _, measured, limit in checks)},
        timing={"total_s": round(time.perf_counter() - t0, 3)},
        provenance=provenance(0, "cpu", options["threads"]),
    )
    append_row(rows_path, row)
    from kvcompress.tables.quant_memory import render

    print(render(row.to_dict()))
    print(f"appended to {rows_path}")
    return 0 if row.accuracy["bounds_held"] else 1


def argv_shown(argv: list[str]) -> list[str]:
    """The options that change what is measured (the rows file does not)."""
    return [a for a in argv if not a.startswith("rows=")]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
