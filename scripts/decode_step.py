"""Decode-step time of the ``full`` compressed cache vs the stock ``DynamicCache`` on the tiny model.

    python scripts/decode_step.py [--context 8192] [--steps 32] [--repeats 5] [--threads 1]

Prints the median (min–max) over repeats of the mean per-step time, and the ratio full / DynamicCache. A figure,
not a test: the stock layer copies the whole layer (torch.cat) at every step, ours appends into spare capacity.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

import kvcompress
from kvcompress.compat import cache_arg
from kvcompress.models import load_model


@torch.no_grad()
def per_step_seconds(model, prompt: torch.Tensor, cache, steps: int) -> float:
    model(prompt, **cache_arg(cache), logits_to_keep=1)
    token = torch.tensor([[5]])
    start = time.perf_counter()
    for _ in range(steps):
        model(token, **cache_arg(cache))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(OmegaConf.create({"builtin": "tiny-random"})).model
    prompt = torch.randint(3, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    kvcompress.attach(model)  # same attention function for both runs
    times: dict[str, list[float]] = {"DynamicCache": [], "full": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        times["DynamicCache"].append(per_step_seconds(model, prompt, DynamicCache(), args.steps))
        times["full"].append(per_step_seconds(model, prompt, kvcompress.compress(model, "full"), args.steps))
    print(f"tiny model, context {args.context}, {args.steps} decode steps, {args.repeats} repeats, {args.threads} thread(s)")
    for name, values in times.items():
        print(f"{name:>12}: {1e3 * statistics.median(values):7.2f} ms/step  (min {1e3 * min(values):.2f}, max {1e3 * max(values):.2f})")
    ratio = statistics.median(times["full"]) / statistics.median(times["DynamicCache"])
    print(f"ratio full / DynamicCache: {ratio:.3f}  ({'met' if ratio <= 1.0 else 'NOT met'}: target <= 1.0)")


if __name__ == "__main__":
    main()
