"""Using the built testbed (:mod:`kvcompress.zoo.testbed`, which re-exports these): a greedy answer to a needle,
the binomial band that random-draw controls should land in, and the full-cache length x depth needle grid with its
Markdown page."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def answer(model, tokenizer, sample, cache=None) -> str:
    """Greedy continuation of a :class:`~kvcompress.eval.needle.NeedleSample` (``sample.new_tokens`` tokens) through
    the evaluation loop's ``model.generate`` (:func:`kvcompress.eval.loop.run_sample`); ``cache``: a compressed
    cache, None for the model's own."""
    from kvcompress.eval.loop import Sample, run_sample

    outcome, _ = run_sample(model, Sample(prompt=sample.prompt, new_tokens=sample.new_tokens), lambda: cache,
                            tokenizer=tokenizer)
    return outcome.text


def binomial_band(trials: int, p: float, tail: float = 1e-3) -> tuple[int, int]:
    """Central band ``[lo, hi]`` of successes of Binomial(``trials``, ``p``): P(X < lo) ≤ tail and P(X > hi) ≤ tail.

    For reading accuracies of random-draw controls (``random``, ``heads_random``) on the testbed, where the circuit
    says which entries a correct answer needs, so the keep probability predicts the accuracy.
    """
    pmf = [math.comb(trials, x) * p**x * (1.0 - p) ** (trials - x) for x in range(trials + 1)]
    below, lo = 0.0, 0
    while lo < trials and below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    above, hi = 0.0, trials
    while hi > 0 and above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def check_grid(
    path: str | Path | None = None,
    lengths: Sequence[int] = (256, 1024, 4096, 8192),
    depths: Sequence[float] = tuple(i / 10 for i in range(11)),
    *,
    num_distractors: int = 3,
    template: str = "magic_number",
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Full-cache exact-match accuracy on a length × depth needle grid (the needle evaluation on the evaluation loop,
    ``model.generate`` after ``from_pretrained``, ``method=full``); returns ``{"accuracy", "row", "path"}`` where
    ``row`` is a results row (:class:`kvcompress.results.Row`, as a dict) that :func:`grid_markdown` renders. The
    committed grid comes from the same evaluation through ``python -m kvcompress.sweep testbed``."""
    import kvcompress
    from kvcompress.eval.loop import evaluate
    from kvcompress.eval.needle import NeedleTask
    from kvcompress.results import Row, provenance

    from .testbed import load, testbed_path

    torch_threads = torch.get_num_threads()
    t_load = time.perf_counter()
    model, tok = load(path)
    load_seconds = time.perf_counter() - t_load
    cfg = {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths], "template": template,
           "num_distractors": num_distractors if template == "magic_number" else 0}
    t0 = time.perf_counter()
    result = evaluate(model, NeedleTask(cfg, seed, tok), lambda: kvcompress.compress(model, "full"), tokenizer=tok)
    row = Row(
        config_key="zoo-check", method="full", task="needle",
        model={"name": "testbed", "constructed": True, "random_init": False},
        config={"seed": seed, "eval": {"name": "needle", **cfg}}, accuracy=result.accuracy, memory=result.memory,
        samples=result.samples, query_aware=True,
        timing={"load_s": round(load_seconds, 3), "eval_s": round(time.perf_counter() - t0, 3),
                "samples_s": [round(s, 3) for s in result.seconds]},
        provenance=provenance(seed, "cpu", torch_threads),
    ).to_dict()
    if verbose:
        for length in cfg["lengths"]:
            cells = [s for s in result.samples if s["meta"]["length"] == length]
            marks = " ".join("1" if s["exact_match"] else "0" for s in cells)
            secs = sum(t for s, t in zip(result.samples, result.seconds) if s["meta"]["length"] == length)
            print(f"len {length:6d}: {marks}  acc={sum(s['exact_match'] for s in cells) / len(cells):.2f}  ({secs:.1f}s)",
                  flush=True)
        print(f"overall exact match: {result.accuracy['exact_match']:.3f} over {len(result.samples)} samples")
    return {"accuracy": result.accuracy["exact_match"], "row": row,
            "path": str(path if path is not None else testbed_path())}


def grid_markdown(res: dict, command: str) -> str:
    """The :func:`check_grid` result as a Markdown page (rendered by :mod:`kvcompress.tables.testbed`)."""
    from kvcompress.tables.testbed import render

    return render(res["row"], command)
