"""Needle accuracy of layer-axis compression on the constructed testbed: ``layers`` (each importance score) against
the random-layer control, and ``share`` (MiniCache), vs the kept fraction.

    python benchmarks/layers_needle.py [--lengths 512 1024 2048] [--depths 0.1 0.3 0.5 0.7 0.9] [--seeds 12]

Runs the needle probes (``magic_number`` template, 3 distractors, query-aware: the question is part of the
compressed prompt) through ``model.generate`` with each compressed cache and writes ``paper_tables/layers.md`` and
``paper_tables/layers.json``. The testbed is a constructed 3-layer model (hand-set weights): layer 1 holds the
retrieval head, layer 0 the previous-token heads (which only need the last two tokens while decoding), layer 2 is
filler. The numbers show whether a layer score finds the layer a known retrieval circuit needs, not how a learned
LLM would score.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import kvcompress  # noqa: E402
from kvcompress.eval.needle import make_needle_samples, score_exact_match  # noqa: E402
from kvcompress.zoo.testbed import RETRIEVAL_KV_HEADS, answer, load, testbed_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("lazy", "cosine", "first", "last", "every_k")
RETRIEVAL_LAYER = RETRIEVAL_KV_HEADS[0][0]  # the testbed's ground truth


def evaluate(model, tok, samples, method: str, **params) -> dict:
    hits, fractions, kept, savings = [], [], Counter(), set()
    for s in samples:
        cache = kvcompress.compress(model, method, **params)
        hits.append(score_exact_match(answer(model, tok, s, cache), s.answer))
        fractions.append(cache.memory_report()["kept_fraction"])
        shared = cache.shared.get(method, {})
        if "kept_layers" in shared:
            kept[str(shared["kept_layers"][0])] += 1
        if "merged_pairs" in shared:
            kept[str(shared["merged_pairs"])] += 1
        savings.add(shared.get("prefill_saving", "memory-only"))  # what the method itself declares
    return {
        "accuracy": sum(hits) / len(hits),
        "kept_fraction": sum(fractions) / len(fractions),
        "choices": dict(kept),
        "prefill_saving": ", ".join(sorted(savings)),
    }


def reading(rows: list[dict], num_layers: int, retrieval_layer: int) -> str:
    """What the rows show, derived from them: which single-layer choices kept the retrieval layer and how they scored,
    and how `share` compares with the same-memory random-token control."""
    single = [r for r in rows if r["method"] == "layers" and r["ratio"] == 1 / num_layers and "per_seed" not in r]
    hit = [r for r in single if all(retrieval_layer in json.loads(k) for k in r["choices"])]
    miss = [r for r in single if r not in hit]
    name = lambda r: r["setting"].split(",")[0].removeprefix("score=")  # noqa: E731
    parts = [
        f"With one kept layer, the scores that kept layer {retrieval_layer} (the retrieval layer) in every sample — "
        + (", ".join(f"`{name(r)}` ({100 * r['accuracy']:.0f}%)" for r in hit) or "none")
        + "; the others — " + (", ".join(f"`{name(r)}` ({100 * r['accuracy']:.0f}%)" for r in miss) or "none") + "."
    ]
    shares = [r for r in rows if r["method"] == "share"]
    controls = {r["control_of"]: r for r in rows if "control_of" in r}
    better = [r for r in shares if r["accuracy"] > controls[r["setting"]]["accuracy"]]
    parts.append(f"`share` beats random token eviction at the same kept fraction in {len(better)} of {len(shares)} settings.")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--layer-fractions", type=int, nargs="+", default=[1, 2], help="full layers kept (of 3)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=32, help="recent tokens kept by dropped layers")
    ap.add_argument("--retain", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.05])
    ap.add_argument("--seeds", type=int, default=12, help="random-layer control draws to average")
    ap.add_argument("--out", type=Path, default=ROOT / "paper_tables" / "layers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load(testbed_path())
    num_layers = model.config.num_hidden_layers
    samples = make_needle_samples(tok, args.lengths, args.depths, num_distractors=3)
    rows = [{"method": "full", "setting": "-", **evaluate(model, tok, samples, "full")}]
    window = {"sink": args.sink, "window": args.window}
    for kept in args.layer_fractions:
        ratio = kept / num_layers
        for score in SCORES:
            r = evaluate(model, tok, samples, "layers", ratio=ratio, score=score, **window)
            rows.append({"method": "layers", "setting": f"score={score}, {kept}/{num_layers} layers", "ratio": ratio, **r})
        per_seed = [evaluate(model, tok, samples, "layers", ratio=ratio, score="random", seed=s, **window) for s in range(args.seeds)]
        choices: Counter = Counter()
        for r in per_seed:
            choices.update(r["choices"])
        rows.append({
            "method": "layers", "setting": f"score=random (control), {kept}/{num_layers} layers", "ratio": ratio,
            "accuracy": sum(r["accuracy"] for r in per_seed) / len(per_seed),
            "kept_fraction": sum(r["kept_fraction"] for r in per_seed) / len(per_seed),
            "per_seed": [r["accuracy"] for r in per_seed], "choices": dict(choices), "prefill_saving": "memory-only",
        })
    for start in (num_layers // 2, 0):
        for retain in args.retain:
            setting = f"start={start}, retain={retain:g}, t=0.6"
            r = evaluate(model, tok, samples, "share", start=start, retain=retain)
            rows.append({"method": "share", "setting": setting, **r})
            # Same-memory control: uniform random token eviction keeping share's measured kept fraction.
            c = evaluate(model, tok, samples, "random", ratio=min(1.0, r["kept_fraction"]))
            rows.append({"method": "random (control)", "setting": f"ratio = share's kept fraction ({setting})",
                         "control_of": setting, **c})
    result = {
        "model": "testbed (constructed: hand-set weights, not trained; 3 layers x 2 KV heads)",
        "task": "needle magic_number, 3 distractors, exact match, question inside the compressed prompt",
        "lengths": args.lengths, "depths": args.depths, "samples": len(samples), **window,
        "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Layer-axis compression: needle accuracy on the constructed testbed",
        "",
        "Model: constructed testbed (3 layers x 2 KV heads; hand-set weights, not trained). Ground truth: the retrieval "
        "(induction) head is in layer 1; layer 0's previous-token heads only need the last two tokens while decoding; "
        "layer 2 is filler. The numbers show whether a layer score finds the layer a known circuit needs, not how a "
        "learned LLM would score.",
        f"Task: needle `magic_number`, 3 distractors, exact match, question inside the compressed prompt; lengths "
        f"{args.lengths}, depths {args.depths} ({len(samples)} samples per row).",
        f"`layers`: full context in k of 3 layers (ratio = k/3), the others keep {args.sink} sink + {args.window} recent "
        f"tokens. Random-layer control: mean over {args.seeds} seeds. `share` (MiniCache): pairs from `start` (default "
        "L//2 = 1: pair (1, 2); start=0: pair (0, 1), layer 2 alone), SLERP t = 0.6, `retain` = fraction of tokens kept "
        "unmerged. Kept fraction = kept bytes / dense bytes (measured from stored tensors) at the end of generation.",
        "Prefill saving (as each method declares it in `cache.shared`): "
        + "; ".join(sorted({f"{r['method']}: {r['prefill_saving']}" for r in rows if r["method"] in ("layers", "share")}))
        + ". `random (control)` rows: uniform random token eviction at the kept fraction of the `share` row above.",
        "",
        "| method | setting | needle accuracy (%) | kept fraction | layers kept / pairs merged (samples) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        choices = ", ".join(f"{k}: {v}" for k, v in sorted(r["choices"].items())) or "—"
        if "per_seed" in r:
            choices += "; per seed: " + " ".join(f"{100 * a:.0f}" for a in r["per_seed"])
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['accuracy']:.1f} | {r['kept_fraction']:.3f} | {choices} |")
    lines += [
        "",
        "Reading: " + reading(rows, num_layers, RETRIEVAL_LAYER),
        "",
        f"Generated by `python benchmarks/layers_needle.py` in {result['seconds']} s (CPU, 1 thread)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
