"""The machine's streaming-copy memory bandwidth, measured in the same run as the decode timings.

Two streams over a large fp32 buffer (default 256 MiB, far beyond any cache level), with the configured torch thread
count: ``copy`` = ``dst.copy_(src)``, bytes = read + write = 2 × buffer; ``read`` = ``src.sum()``, bytes = 1 × buffer
(a decode step only reads the cache, so this is its roofline). Interleaved; median over repeats with min–max.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .common import MiB, load_avg, summary


def measure(size_mib: int = 256, repeats: int = 7) -> dict[str, Any]:
    n = size_mib * MiB // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    copy, read, loads = [], [], []
    for _ in range(repeats):
        loads.append(load_avg()[0])
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * n * 4 / (time.perf_counter() - start))
        start = time.perf_counter()
        src.sum()
        read.append(n * 4 / (time.perf_counter() - start))
    return {"buffer_bytes": n * 4, "threads": torch.get_num_threads(), "samples_copy": copy, "samples_read": read,
            "loads": loads, "bandwidth_GBps": summary(copy, 1e-9), "read_GBps": summary(read, 1e-9),
            "load_1min": summary(loads)}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Pool two measurements of the same run (e.g. before and after the decode part)."""
    copy, read, loads = a["samples_copy"] + b["samples_copy"], a["samples_read"] + b["samples_read"], a["loads"] + b["loads"]
    return {**a, "samples_copy": copy, "samples_read": read, "loads": loads, "bandwidth_GBps": summary(copy, 1e-9),
            "read_GBps": summary(read, 1e-9), "load_1min": summary(loads), "measured": "before and after the decode part"}
