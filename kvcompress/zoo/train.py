"""Learned testbed recipe: train a small Llama from scratch on synthetic retrieval data (needs a GPU to be useful).

``python -m kvcompress.zoo train [config=testbed-learned|PATH.yaml] [key=value ...]`` (Hydra overrides)

* Tokenizer: the word-level grouped-digit tokenizer of :mod:`kvcompress.zoo.tokenizer` (same as the constructed
  testbed; a digit group of up to 3 digits is one token, so 7-digit values are 3 tokens and copyable).
* Data, composed directly in token space (fast): pydoc prose sentences (pre-tokenised once) as haystack, with
  * ``needle``: 1 + k magic-number needles (k distractor keys) at random sentence boundaries, then the question of
    :mod:`kvcompress.eval.needle` and the answer;
  * ``passkey``: the Mohtashami & Jaggi passkey prompt with the noise filler;
  * ``text``: plain prose (language-model loss only).
  The loss weights answer tokens by ``answer_loss_weight`` and every other token by ``text_loss_weight``.
* Variable lengths: one length per batch, drawn from ``data.lengths``; batch size = ``tokens_per_batch // length``.
* Deterministic given ``seed``: a ``random.Random(seed)`` drives data, ``torch.manual_seed(seed)`` the init.
* Output: ``save_pretrained`` model + tokenizer in ``out_dir`` (loadable with ``model.path=<out_dir>``), and a
  ``train_log.jsonl`` with loss and needle accuracy (full cache, the needle task on :mod:`kvcompress.eval.loop`).

Compute estimate: see the config's header. Not trained in the repo (the CPU here cannot form an induction head).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "testbed-learned.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    import yaml

    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():  # installed package: the configs ship inside kvcompress.configs
        p = Path(__file__).resolve().parents[1] / "configs" / "train" / "testbed-learned.yaml"
    cfg = yaml.safe_load(p.read_text())
    for item in overrides or []:
        key, _, raw = item.partition("=")
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


class SyntheticRetrieval:
    """Token-space sample composer (needle / passkey / text), deterministic given the ``random.Random`` passed in."""

    def __init__(self, tokenizer, data_cfg: dict[str, Any]):
        from kvcompress.eval import haystack
        from kvcompress.eval.needle import KEY_WORDS, TEMPLATES

        self.tok, self.cfg = tokenizer, data_cfg
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.enc = enc
        self.sentences = [enc(" " + s) for s in haystack.pydoc_sentences()]
        self.noise = [enc(" " + s) for s in haystack.NOISE_SENTENCES]
        self.keys = list(KEY_WORDS)
        self.tpl = TEMPLATES
        self.bos = tokenizer.bos_token_id

    def _fill(self, rng: random.Random, pool: list[list[int]], n_tokens: int, sequential: bool) -> list[list[int]]:
        out, total = [], 0
        i = 0 if sequential else rng.randrange(len(pool))
        while total < n_tokens:
            s = pool[i % len(pool)]
            out.append(s)
            total += len(s)
            i += 1
        return out

    def sample(self, rng: random.Random, length: int) -> tuple[list[int], list[float]]:
        """``(ids, weights)`` of exactly ``length`` tokens; weights mark answer vs other tokens."""
        mix = self.cfg["mix"]
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        wa, wt = float(self.cfg["answer_loss_weight"]), float(self.cfg["text_loss_weight"])
        if kind == "text":
            sents = self._fill(rng, self.sentences, length, sequential=False)
            ids = [self.bos] + [t for s in sents for t in s]
            return ids[:length], [wt] * length
        if kind == "passkey":
            tpl = self.tpl["passkey"]
            value = str(rng.randint(1, 50_000))
            needles = [self.enc(" " + tpl["needle"].format(value=value))]
            question = self.enc("\n" + tpl["question"])
            intro = self.enc(tpl["intro"])
            pool, sequential = self.noise, True
        else:
            tpl = self.tpl["magic_number"]
            k = rng.choice(self.cfg["num_distractors"])
            keys = rng.sample(self.keys, k + 1)
            digits = rng.choice(self.cfg["value_digits"])
            values = [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in keys]
            value = values[0]
            needles = [self.enc(" " + tpl["needle"].format(key=kk, value=v)) for kk, v in zip(keys, values)]
            question = self.enc("\n" + tpl["question"].format(key=keys[0]))
            intro = self.enc(tpl["intro"])
            pool, sequential = self.sentences, False
        answer = self.enc(" " + value)
        budget = length - 1 - len(intro) - sum(map(len, needles)) - len(question) - len(answer)
        sents = self._fill(rng, pool, max(budget, 0), sequential) if budget > 0 else []
        while sents and sum(map(len, sents)) > budget:
            sents.pop()
        slots = sorted(rng.randint(0, len(sents)) for _ in needles)
        order = list(range(len(needles)))
        rng.shuffle(order)
        body: list[int] = []
        inserts: dict[int, list[list[int]]] = {}
        for slot, idx in zip(slots, order):
            inserts.setdefault(slot, []).append(needles[idx])
        for i in range(len(sents) + 1):
            for n in inserts.get(i, []):
                body += n
            if i < len(sents):
                body += sents[i]
        prefix = [self.bos] + intro + body + question
        ids = prefix + answer
        weights = [wt] * len(prefix) + [wa] * len(answer)
        pad = length - len(ids)
        if pad > 0:  # left-pad with filler text tokens that carry no loss
            filler = [t for s in self._fill(rng, pool, pad, sequential) for t in s][:pad]
            ids = [self.bos] + filler + ids[1:]
            weights = [0.0] + [0.0] * pad + weights[1:]
        return ids[:length], weights[:length]

    def batch(self, rng: random.Random, length: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.sample(rng, length) for _ in range(size)]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def _lr(step: int, cfg: dict[str, Any]) -> float:
    o = cfg["optim"]
    if step < o["warmup_steps"]:
        return o["lr"] * (step + 1) / o["warmup_steps"]
    frac = (step - o["warmup_steps"]) / max(1, o["steps"] - o["warmup_steps"])
    return o["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def evaluate(model, tok, cfg: dict[str, Any], device: str) -> float:
    """Needle exact match with the full cache, through the project's one evaluation loop and needle task (the
    ``eval`` lengths and depths of the recipe, seed + 1); ``device`` is the model's."""
    from kvcompress.eval.loop import evaluate as run_task
    from kvcompress.eval.needle import NeedleTask

    model.eval()
    task = NeedleTask({"lengths": list(cfg["eval"]["lengths"]), "depths": list(cfg["eval"]["depths"])},
                      seed=cfg["seed"] + 1, tokenizer=tok)
    accuracy = run_task(model, task, lambda: None, tokenizer=tok).accuracy["exact_match"]
    model.train()
    return float(accuracy)


def train(cfg: dict[str, Any]) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import build_tokenizer

    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = cfg.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    m = dict(cfg["model"])
    rope_theta = m.pop("rope_theta", 10000.0)
    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **m,
    )
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    data = SyntheticRetrieval(tok, cfg["data"])
    o = cfg["optim"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o["lr"], betas=tuple(o["betas"]),
    )
    amp = device == "cuda" and cfg.get("dtype") == "bfloat16"
    log = (out / "train_log.jsonl").open("a")
    t0 = time.perf_counter()
    model.train()
    for step in range(int(o["steps"])):
        length = rng.choice(cfg["data"]["lengths"])
        size = max(1, int(cfg["data"]["tokens_per_batch"]) // length)
        ids, w = data.batch(rng, length, size)
        ids, w = ids.to(device), w.to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(ids[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        weights = w[:, 1:]
        loss = (nll * weights).sum() / weights.sum().clamp(min=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        row: dict[str, Any] = {"step": step, "loss": loss.item(), "length": length, "time_s": time.perf_counter() - t0}
        every = int(cfg["eval"]["every"])
        if every and ((step + 1) % every == 0 or step + 1 == int(o["steps"])):
            row["needle_acc"] = evaluate(model, tok, cfg, device)
            model.save_pretrained(str(out))
        log.write(json.dumps(row) + "\n")
        log.flush()
    log.close()
    model.save_pretrained(str(out))
    (out / "kvcompress_testbed.json").write_text(
        json.dumps({"constructed": False, "learned": True, "recipe": "kvcompress.zoo.train", "config": cfg}, indent=2)
    )
    return out


def main(config: str | None = None, overrides: list[str] | None = None) -> int:
    cfg = load_config(config, overrides)
    out = train(cfg)
    print(f"trained learned testbed -> {out}")
    return 0
