"""Retrieval-head detection with needle probes and decode-step attention (see :mod:`kvcompress.methods.head.scores`).

Each probe is decoded greedily by hand: the prompt minus its last token is prefilled, then every step feeds one
token (q_len = 1), so even the first answer token comes from a decode step whose attention the cache's observers
see. The cache is ``kvcompress.compress(model, "full")`` (nothing dropped), so the observed probabilities are the
model's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from kvcompress.artifacts import config_hash, weights_fingerprint
from kvcompress.artifacts import text_config as _text_config
from kvcompress.compat import cache_arg
from kvcompress.methods.head.scores import FORMAT, FORMAT_VERSION

DEFAULT_LENGTHS = (512, 1024)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def _probe(model, input_ids: torch.Tensor, new_tokens: int, span: tuple[int, int]):
    """Greedy-decode ``new_tokens`` tokens; per step and layer the top-1 position and needle mass of every query
    head. Returns (generated ids, top1 [steps, layers, q_heads], mass [steps, layers, q_heads])."""
    import kvcompress

    cache = kvcompress.compress(model, "full")
    text = _text_config(model)
    n_layers, n_heads = text.num_hidden_layers, text.num_attention_heads
    device = next(model.parameters()).device
    # filled by the observer from the attention probabilities: on their device (no copy to the host per layer)
    step_top = torch.zeros(n_layers, n_heads, dtype=torch.long, device=device)
    step_mass = torch.zeros(n_layers, n_heads, device=device)
    a, b = span

    def observer(layer_idx: int, probs: torch.Tensor, view) -> None:
        p = probs[0]  # (q_heads, n)
        step_top[layer_idx] = p.argmax(-1)
        step_mass[layer_idx] = p[:, a:b].sum(-1)

    ids = input_ids.view(1, -1).to(device)
    model(ids[:, :-1], **cache_arg(cache), use_cache=True)
    cache.observers.append(observer)
    token = ids[:, -1:]
    generated: list[int] = []
    tops, masses = [], []
    for _ in range(new_tokens):
        out = model(token, **cache_arg(cache), use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        generated.append(nxt)
        tops.append(step_top.clone())
        masses.append(step_mass.clone())
        token = torch.tensor([[nxt]], device=device)
    return generated, torch.stack(tops), torch.stack(masses)


def detect(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 1,
    template: str = "magic_number",
    num_distractors: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Score every (layer, query head) and KV head with needle probes; returns the artifact dict (see the package
    docstring for the scores), identified by the model's config hash and weights fingerprint. ``lengths`` ×
    ``depths`` × ``samples`` probes of the needle generator."""
    from kvcompress.eval.needle import make_needle_samples, score_prefix_match

    text = _text_config(model)
    n_layers, n_heads = text.num_hidden_layers, text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv
    probes = make_needle_samples(
        tokenizer, list(lengths), list(depths), template=template, num_distractors=num_distractors, seed=seed,
        num_samples=samples,
    )
    device = next(model.parameters()).device
    # accumulated on the model's device (the probe's statistics live there); read back once at the end
    retrieval = torch.zeros(n_layers, n_heads, dtype=torch.float64, device=device)
    mass = torch.zeros(n_layers, n_heads, dtype=torch.float64, device=device)
    correct = 0
    started = time.perf_counter()
    iterator: Any = probes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(probes, desc="heads: needle probes", unit="probe")
    was_training = model.training
    model.eval()
    for s in iterator:
        ids = torch.tensor(tokenizer(s.prompt)["input_ids"], device=device)
        answer_ids = tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]
        n_answer = max(1, len(answer_ids))
        steps = max(1, s.max_new_tokens - 1)
        gen, top, msum = _probe(model, ids, steps, s.needle_token_span)
        a, b = s.needle_token_span
        pred = tokenizer.decode(gen, skip_special_tokens=True)
        ok = score_prefix_match(pred, s.answer) > 0  # the probe decodes the answer + 1 tokens only
        # the answer's decode steps: the first n_answer steps (copy events and mass)
        mass += msum[:n_answer].double().mean(0)
        if ok:
            correct += 1
            top = top[:n_answer]
            gen_t = torch.tensor(gen[:n_answer], device=device).view(-1, 1, 1)
            inside = (top >= a) & (top < b)  # the needle lies in the prompt, so top indexes prompt tokens here
            holds = ids[top.clamp(max=len(ids) - 1)] == gen_t
            copies = (inside & holds).sum(0).double()
            retrieval += copies / n_answer
        if progress and hasattr(iterator, "set_postfix"):
            iterator.set_postfix(correct=f"{correct}/{len(probes)}")
    if was_training:
        model.train()
    retrieval /= max(1, correct)
    mass /= max(1, len(probes))
    retrieval_kv = retrieval.view(n_layers, n_kv, group).amax(-1)
    mass_kv = mass.view(n_layers, n_kv, group).amax(-1)
    primary = "retrieval" if correct > 0 and bool((retrieval > 0).any()) else "mass"

    def rnd(t: torch.Tensor) -> list:
        return [[round(float(v), 6) for v in row] for row in t.tolist()]  # one read-back per table

    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config_hash": config_hash(model),
        "weights": weights_fingerprint(model),
        "model": model_name or getattr(text, "_name_or_path", "") or text.model_type,
        "num_layers": n_layers,
        "num_heads": n_heads,
        "num_kv_heads": n_kv,
        "primary": primary,
        "retrieval": rnd(retrieval),
        "mass": rnd(mass),
        "retrieval_kv": rnd(retrieval_kv),
        "mass_kv": rnd(mass_kv),
        "probes": {
            "template": template, "lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "count": len(probes), "correct": correct, "seconds": round(time.perf_counter() - started, 1),
        },
        "definition": "retrieval: Wu et al. 2024 copy events (top-1 decode-step attention inside the needle on the "
        "generated token) per answer token, mean over correctly answered probes; mass: mean decode-step attention "
        "on the needle over the answer steps of all probes; KV heads: max over their query heads",
    }
