"""Needle accuracy and reconstruction error of the hidden-axis methods on the constructed testbed.

    python benchmarks/hidden_needle.py [--lengths 512 1024 2048] [--depths 9] [--samples 2] [--out paper_tables/hidden]

Methods: full, quant 8/4/2-bit (G=32, R=128), lowrank at ratio 0.5 / 0.25 (calibrated on the built-in corpus with the
testbed's tokenizer), think at ratio 0.5. Needle: ``magic_number`` with 3 distractors (``eval/needle.py``), greedy
``model.generate`` with the compressed cache, exact match. Also per method: the kept fraction of the cache bytes and
the relative Frobenius reconstruction error of K and V (mean over layers) of the last sample.

RoPE check for lowrank (``--rope``, on by default): the same uncentered PCA fitted on the calibration text to
pre-RoPE keys (``k_proj`` output) and to post-RoPE keys (the cache's), then the relative error of projecting the
keys of a needle prompt at ranks 0.5 / 0.25 × head_dim. The method projects post-RoPE keys.

Writes ``<out>.md`` and ``<out>.json``. This is the constructed testbed: it shows whether a codec keeps what a known
retrieval circuit needs, not how a learned LLM would score.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from kvcompress.compat import cache_arg

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kvcompress  # noqa: E402
import kvcompress.lowrank as lr  # noqa: E402
from kvcompress.eval.needle import make_needle_samples, score_exact_match  # noqa: E402
from kvcompress.zoo.testbed import load  # noqa: E402

METHODS = [
    ("full", "full", {}),
    ("quant 8-bit", "quant", {"bits": 8}),
    ("quant 4-bit", "quant", {"bits": 4}),
    ("quant 2-bit", "quant", {"bits": 2}),
    ("lowrank 0.5", "lowrank", {"ratio": 0.5}),
    ("lowrank 0.25", "lowrank", {"ratio": 0.25}),
    ("think 0.5", "think", {"ratio": 0.5}),
]


@torch.no_grad()
def needle(model, tok, samples, method: str, params: dict) -> dict:
    hits, cache = [], None
    for s in samples:
        enc = tok(s.prompt, return_tensors="pt")
        cache = kvcompress.compress(model, method, **params)
        out = model.generate(**enc, **cache_arg(cache), do_sample=False, pad_token_id=tok.pad_token_id,
                             max_new_tokens=s.max_new_tokens - 1)
        pred = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits.append(score_exact_match(pred, s.answer))
    report = cache.memory_report()
    errors = cache.shared.get(method, {}).get("recon_error", {})
    row = {"accuracy": sum(hits) / len(hits), "samples": len(hits), "kept_fraction": report["kept_fraction"],
           "recon_error": {str(k): v for k, v in errors.items()}}
    if errors:
        row["recon_k"] = sum(e["k"] for e in errors.values()) / len(errors)
        row["recon_v"] = sum(e["v"] for e in errors.values()) / len(errors)
    if method == "lowrank":
        row["basis_bytes"] = cache.shared["lowrank"]["basis_bytes"]
    return row


@torch.no_grad()
def _keys(model, ids) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-RoPE (k_proj output) and post-RoPE (cache) keys per layer, ``(H, N, D)``."""
    pre, hooks = [], []
    cfg = model.config
    for m in lr._attention_modules(model):
        hooks.append(m.k_proj.register_forward_hook(
            lambda mod, args, out: pre.append(out[0].view(out.shape[1], cfg.num_key_value_heads, -1).transpose(0, 1))))
    cache = kvcompress.compress(model, "full")
    try:
        model(ids, **cache_arg(cache))
    finally:
        for h in hooks:
            h.remove()
    post = [layer.keys[0, :, : layer.length] for layer in cache.layers]
    return pre, post


def rope_check(model, tok, prompt: str) -> dict:
    calib = lr.calibration_ids(model, tok)
    eval_ids = tok(prompt, return_tensors="pt")["input_ids"]
    (pre_c, post_c), (pre_e, post_e) = _keys(model, calib), _keys(model, eval_ids)
    d = model.config.head_dim
    out = {}
    for name, cal, ev in (("pre-RoPE", pre_c, pre_e), ("post-RoPE", post_c, post_e)):
        for ratio in (0.5, 0.25):
            r = round(ratio * d)
            num = den = 0.0
            for c, e in zip(cal, ev):
                basis, _ = lr._eigbasis(c)
                b = basis[:, :, :r].double()
                x = e.double()
                num += float((x - x @ b @ b.transpose(-1, -2)).pow(2).sum())
                den += float(x.pow(2).sum())
            out[f"{name} r={ratio:g}"] = (num / den) ** 0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depths", type=int, default=9, help="evenly spaced depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=2, help="samples per (length, depth) cell")
    parser.add_argument("--out", default="paper_tables/hidden")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-rope", dest="rope", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load()
    bases = lr.ensure_calibrated(model, tok)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    samples = make_needle_samples(tok, args.lengths, depths, num_samples=args.samples, seed=0)
    rows = {}
    for label, method, params in METHODS:
        t0 = time.perf_counter()
        rows[label] = {"method": method, "params": params, **needle(model, tok, samples, method, params)}
        rows[label]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{label:>13}: acc {rows[label]['accuracy']:.3f}  kept {rows[label]['kept_fraction']:.3f}  "
              f"({rows[label]['seconds']}s)", flush=True)
    rope = rope_check(model, tok, samples[-1].prompt) if args.rope else {}
    result = {"model": "testbed (constructed)", "lengths": args.lengths, "depths": depths, "samples_per_cell": args.samples,
              "needle": "magic_number, 3 distractors", "rows": rows, "rope_check": rope,
              "lowrank_basis_bytes": bases.nbytes, "calibration": {"source": bases.source, "tokens": bases.tokens}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    full = rows["full"]["accuracy"]
    lines = [
        "# Hidden axis on the constructed testbed: needle accuracy, bytes, reconstruction error",
        "",
        f"Testbed (constructed 3-layer Llama, head_dim 128, fp32 cache); needle `magic_number` with 3 distractors; "
        f"contexts {', '.join(map(str, args.lengths))} tokens × {len(depths)} depths × {args.samples} samples "
        f"= {len(samples)} prompts per method; greedy generation with the compressed cache; exact match.",
        "Kept = cache bytes held / dense fp32 cache bytes (last prompt, 2K context, decode tokens included). "
        "Recon = relative Frobenius error ‖X − X̂‖/‖X‖ of the encoded keys / values, mean over layers (last prompt).",
        "",
        "| method | needle acc. | Δ vs full (points) | kept bytes | recon K | recon V |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        rk = f"{r['recon_k']:.4f}" if "recon_k" in r else "–"
        rv = f"{r['recon_v']:.4f}" if "recon_v" in r else "–"
        lines.append(f"| {label} | {r['accuracy']:.3f} | {100 * (r['accuracy'] - full):+.1f} | "
                     f"{r['kept_fraction']:.3f} | {rk} | {rv} |")
    lines += [
        "",
        "quant: KIVI layout, G=32, R=128, fp16 scales/minima. lowrank: uncentered PCA bases per (layer, KV head), "
        f"calibrated on {bases.tokens} tokens of the built-in corpus (source `{bases.source}`); "
        f"the bases are model-side ({bases.nbytes / 2**20:.2f} MiB, not counted as cache bytes). "
        "think: key channels pruned in RoPE pairs (values untouched), window 32.",
    ]
    if rope:
        lines += ["", "RoPE check (relative error of projecting a 2K needle prompt's keys on bases fitted to the calibration "
                  "text's keys, all layers):", "", "| keys | r = 0.5·D | r = 0.25·D |", "|---|---|---|"]
        for name in ("pre-RoPE", "post-RoPE"):
            lines.append(f"| {name} | {rope[f'{name} r=0.5']:.4f} | {rope[f'{name} r=0.25']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
