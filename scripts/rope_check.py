"""Pre- vs post-RoPE low-rank projection of keys: the error ``lowrank`` pays for projecting post-RoPE keys.

    python scripts/rope_check.py [rows=paper_tables/rows/hidden.jsonl] [threads=1]

The same uncentered PCA is fitted on calibration keys pre-RoPE (``k_proj`` output) and post-RoPE (the cache's), then
the relative error of projecting the keys of a longer held-out prompt is taken at ranks 1/8, 1/4, 1/2, 3/4 × head_dim.
The method projects post-RoPE keys. On the testbed (``rope_theta = 1e30``) most RoPE pairs barely turn, so pre and
post cannot differ much there (calibration text → the last 2K needle prompt of the hidden-axis sweep); the same check
therefore also runs on a tiny random-init Llama (2 layers, head_dim 128) with ``rope_theta = 1e4`` (the usual value),
once as initialised and once with its key projections restricted to a random rank-32 subspace of the hidden state
(the low-rank pre-RoPE keys that Palu / ShadowKV / Loki report for trained models), plus that low-rank model at
``rope_theta = 1e30`` as the control: calibrated on 1024 random tokens, evaluated on 2048 others.

Appends one results row (:class:`kvcompress.results.Row`, task ``rope_check``) with the errors and the low-rank
calibration (source, tokens, basis bytes); ``python -m kvcompress.tables hidden`` renders it under the hidden-axis
needle table. Part of ``python -m kvcompress.sweep hidden``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import kvcompress  # noqa: E402
import kvcompress.methods.hidden.calibration as lr  # noqa: E402
from kvcompress.compat import cache_arg  # noqa: E402
from kvcompress.eval.needle import make_needle_samples  # noqa: E402
from kvcompress.results import Row, append_row, check_writable, provenance  # noqa: E402
from kvcompress.zoo.testbed import load  # noqa: E402

try:  # the model's attention modules (one home for model introspection: kvcompress.artifacts)
    from kvcompress.artifacts import attention_modules  # noqa: E402
except ImportError:  # before kvcompress.artifacts existed
    attention_modules = lr._attention_modules

RANK_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
TINY_KEY_RANK = 32
TINY_CALIBRATION, TINY_EVAL = 1024, 2048
#: The held-out testbed prompt: the hidden-axis sweep's last needle prompt (2K tokens, depth 1, second sample).
EVAL_LENGTH, EVAL_DEPTH, EVAL_SAMPLES = 2048, 1.0, 2


@torch.no_grad()
def _keys(model, ids) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-RoPE (k_proj output) and post-RoPE (cache) keys per layer, ``(H, N, D)``."""
    pre, hooks = [], []
    cfg = model.config
    for m in attention_modules(model):
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
            for m in attention_modules(model):
                u, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, key_rank, generator=g))
                m.k_proj.weight.copy_(m.k_proj.weight @ u @ u.T)
    return model


def tiny_rope_checks() -> dict[str, dict]:
    """:func:`rope_check` on tiny random-init Llamas: RoPE θ = 1e4 as initialised and with rank-32 keys, and the
    rank-32 model at θ = 1e30 (RoPE nearly off) as the control."""
    ids = lambda seed, n: torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    calib, ev = ids(0, TINY_CALIBRATION), ids(1, TINY_EVAL)
    variants = {"θ=1e4, random init": (1e4, None), f"θ=1e4, rank-{TINY_KEY_RANK} keys": (1e4, TINY_KEY_RANK),
                f"θ=1e30, rank-{TINY_KEY_RANK} keys": (1e30, TINY_KEY_RANK)}
    return {label: rope_check(tiny_rope_model(theta, rank), calib, ev) for label, (theta, rank) in variants.items()}


def main(argv: list[str]) -> int:
    options = {"rows": "paper_tables/rows/hidden.jsonl", "threads": "1"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            print(f"error: unknown option {arg!r}; valid: {', '.join(f'{k}=...' for k in options)}", file=sys.stderr)
            return 2
        options[key] = value
    rows = check_writable(options["rows"])
    threads = int(options["threads"])
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tok = load()
    bases = lr.ensure_calibrated(model, tok)
    prompt = make_needle_samples(tok, [EVAL_LENGTH], [EVAL_DEPTH], num_samples=EVAL_SAMPLES, seed=0)[-1].prompt
    checks = {"testbed (θ=1e30)": rope_check(model, lr.calibration_ids(model, tok), tok(prompt, return_tensors="pt")["input_ids"])}
    checks.update(tiny_rope_checks())
    config = {"rank_fractions": list(RANK_FRACTIONS), "tiny_key_rank": TINY_KEY_RANK, "eval_prompt":
              {"length": EVAL_LENGTH, "depth": EVAL_DEPTH, "sample": EVAL_SAMPLES - 1, "seed": 0},
              "tiny_tokens": [TINY_CALIBRATION, TINY_EVAL], "command": "python scripts/rope_check.py"}
    row = Row(
        config_key=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        method="lowrank", task="rope_check", model={"name": "testbed", "constructed": True, "random_init": False},
        config=config,
        accuracy={"checks": [{"model": label, **res} for label, res in checks.items()],  # a list: rows sort keys
                  "rank_fractions": list(RANK_FRACTIONS), "tiny_key_rank": TINY_KEY_RANK,
                  "eval_tokens_context": EVAL_LENGTH, "tiny_calibration_tokens": TINY_CALIBRATION,
                  "tiny_eval_tokens": TINY_EVAL,
                  "calibration": {"source": bases.source, "tokens": bases.tokens, "basis_bytes": bases.nbytes}},
        timing={"load_s": 0.0, "eval_s": round(time.perf_counter() - start, 3)},
        provenance=provenance(0, "cpu", threads),
    )
    append_row(rows, row)
    for label, res in checks.items():
        for name in ("pre-RoPE", "post-RoPE"):
            print(f"{label:>22} {name:>9}: " + "  ".join(f"{res[name][f'{f:g}']:.4f}" for f in RANK_FRACTIONS))
    print(f"appended to {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
