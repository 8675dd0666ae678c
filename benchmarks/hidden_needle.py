"""Needle accuracy and reconstruction error of the hidden-axis methods on the constructed testbed.

    python benchmarks/hidden_needle.py [--lengths 512 1024 2048] [--depths 9] [--samples 2] [--out paper_tables/hidden]

Methods: full, quant 8/4/2-bit (G=32, R=128), lowrank at ratio 0.5 / 0.25 (calibrated on the built-in corpus with the
testbed's tokenizer), think at ratio 0.5. Needle: ``magic_number`` with 3 distractors (``eval/needle.py``), greedy
``model.generate`` with the compressed cache, exact match. Also per method: the kept fraction of the cache bytes and
the relative Frobenius reconstruction error of K and V (mean over layers) of the last sample.

RoPE check for lowrank (``--rope``, on by default): the same uncentered PCA fitted on calibration keys to pre-RoPE
keys (``k_proj`` output) and to post-RoPE keys (the cache's), then the relative error of projecting the keys of a
longer held-out prompt at ranks 1/8, 1/4, 1/2, 3/4 × head_dim. The method projects post-RoPE keys. On the testbed
(``rope_theta = 1e30``) most RoPE pairs barely turn, so pre and post cannot differ much there; the same check
therefore also runs on a tiny random-init Llama (2 layers, head_dim 128) with ``rope_theta = 1e4`` (the usual
value), once as initialised and once with its key projections restricted to a random rank-32 subspace of the
hidden state (the low-rank pre-RoPE keys that Palu / ShadowKV / Loki report for trained models), plus that
low-rank model at ``rope_theta = 1e30`` as the control: calibrated on 1024 random tokens, evaluated on 2048 others.

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
import kvcompress.methods.hidden.calibration as lr  # noqa: E402
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
        cache = kvcompress.compress(model, method, diagnostics=True, **params)
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


RANK_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
TINY_KEY_RANK = 32


def rope_check(model, calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> dict:
    """Relative error ``‖K − K B Bᵀ‖ / ‖K‖`` (all layers and KV heads) of the evaluation prompt's keys projected on the
    top-r uncentered PCA basis ``B`` of the calibration prompt's keys, pre- and post-RoPE, per r / head_dim."""
    (pre_c, post_c), (pre_e, post_e) = _keys(model, calib_ids), _keys(model, eval_ids)
    d = model.config.head_dim
    out: dict[str, dict[str, float]] = {}
    for name, cal, ev in (("pre-RoPE", pre_c, pre_e), ("post-RoPE", post_c, post_e)):
        bases = [lr._eigbasis(c)[0].double() for c in cal]
        out[name] = {}
        for frac in RANK_FRACTIONS:
            r = round(frac * d)
            num = den = 0.0
            for basis, e in zip(bases, ev):
                b, x = basis[:, :, :r], e.double()
                num += float((x - x @ b @ b.transpose(-1, -2)).pow(2).sum())
                den += float(x.pow(2).sum())
            out[name][f"{frac:g}"] = (num / den) ** 0.5
    return out


def tiny_rope_model(theta: float, key_rank: int | None = None) -> torch.nn.Module:
    """A random-init Llama (seeded) with the given ``rope_theta``; ``key_rank`` restricts every ``k_proj`` to a random
    ``key_rank``-dim subspace of the hidden state, so its pre-RoPE keys have at most that rank."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    if key_rank is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lr._attention_modules(model):
                u, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, key_rank, generator=g))
                m.k_proj.weight.copy_(m.k_proj.weight @ u @ u.T)
    return model


def tiny_rope_checks() -> dict[str, dict]:
    """:func:`rope_check` on tiny random-init Llamas: RoPE θ = 1e4 as initialised and with rank-32 keys, and the
    rank-32 model at θ = 1e30 (RoPE nearly off) as the control."""
    ids = lambda seed, n: torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    calib, ev = ids(0, 1024), ids(1, 2048)
    variants = {"θ=1e4, random init": (1e4, None), f"θ=1e4, rank-{TINY_KEY_RANK} keys": (1e4, TINY_KEY_RANK),
                f"θ=1e30, rank-{TINY_KEY_RANK} keys": (1e30, TINY_KEY_RANK)}
    return {label: rope_check(tiny_rope_model(theta, rank), calib, ev) for label, (theta, rank) in variants.items()}


ROPE_TOLERANCE = 0.005  # errors closer than this count as equal


def rope_finding(checks: dict[str, dict]) -> str:
    """The finding, worded from the numbers: per model, at which ranks post-RoPE projection is worse / better / equal
    (within ``ROPE_TOLERANCE``) than pre-RoPE, and the largest gap."""
    parts, worse_everywhere = [], []
    for label, res in checks.items():
        gaps = {f: res["post-RoPE"][f] - res["pre-RoPE"][f] for f in res["pre-RoPE"]}
        worse = [f for f, g in gaps.items() if g > ROPE_TOLERANCE]
        better = [f for f, g in gaps.items() if g < -ROPE_TOLERANCE]
        largest = max(gaps, key=lambda f: abs(gaps[f]))
        if not worse and not better:
            verdict = f"equal within {ROPE_TOLERANCE} at every rank — this model cannot tell them apart"
        elif len(worse) == len(gaps):
            verdict = "post-RoPE worse at every rank"
            worse_everywhere.append(label)
        else:
            clauses = [f"{word} at r = {', '.join(fs)}·D" for word, fs in (("worse", worse), ("better", better)) if fs]
            verdict = "post-RoPE " + ", ".join(clauses) + ", equal elsewhere"
        parts.append(f"{label}: {verdict} (largest post − pre {gaps[largest]:+.4f} at r = {largest}·D)")
    text = "; ".join(parts) + "."
    if any(label.startswith("θ=1e4") for label in worse_everywhere):
        text += (" With the usual θ = 1e4, RoPE rotates the keys' subspace into more directions, so projecting "
                 "post-RoPE keys (what `lowrank` does) costs more error at a given rank than projecting pre-RoPE keys "
                 "and re-applying RoPE at attention time would; the testbed's huge θ hides this.")
    return text


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
    rope = {}
    if args.rope:
        rope["testbed (θ=1e30)"] = rope_check(model, lr.calibration_ids(model, tok),
                                              tok(samples[-1].prompt, return_tensors="pt")["input_ids"])
        rope.update(tiny_rope_checks())
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
        fracs = list(RANK_FRACTIONS)
        lines += ["", (
            "RoPE check (lowrank projects post-RoPE keys): relative error of projecting held-out keys on the top-r "
            "PCA basis of calibration keys, all layers and KV heads. Testbed: calibration text → the last 2K needle "
            f"prompt. Tiny random-init Llamas (2 layers, head_dim 128; `rank-{TINY_KEY_RANK} keys` = k_proj "
            f"restricted to a random {TINY_KEY_RANK}-dim subspace of the hidden state, like the low-rank pre-RoPE keys "
            "of trained models; θ=1e30 is the control with RoPE mostly off): 1024 → 2048 random tokens."), "",
                  "| model | keys | " + " | ".join(f"r = {f:g}·D" for f in fracs) + " |",
                  "|---|---|" + "---|" * len(fracs)]
        for label, res in rope.items():
            for name in ("pre-RoPE", "post-RoPE"):
                lines.append(f"| {label} | {name} | " + " | ".join(f"{res[name][f'{f:g}']:.4f}" for f in fracs) + " |")
        lines += ["", "Finding (from the numbers above): " + rope_finding(rope)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
