"""The machine's streaming-copy memory bandwidth, measured in the same run as the decode timings.

``dst.copy_(src)`` of a large fp32 buffer (default 256 MiB, far beyond any cache level), with the configured
torch thread count; bytes moved = read + write = 2 × buffer. Median over repeats with min–max.
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
    rates, loads = [], []
    for _ in range(repeats):
        loads.append(load_avg()[0])
        start = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - start
        rates.append(2 * n * 4 / seconds)
    return {"buffer_bytes": n * 4, "bytes_per_copy": 2 * n * 4, "threads": torch.get_num_threads(),
            "bandwidth_GBps": summary(rates, 1e-9), "load_1min": summary(loads)}
