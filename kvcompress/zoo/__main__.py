"""``python -m kvcompress.zoo build|check|path|train [key=value ...]`` (Hydra overrides, like ``kvcompress.run``).

* ``build``  — build the **constructed** testbed (tokenizer + weights + ``kvcompress_testbed.json``) into ``out=DIR``,
  or into the cache directory used by :func:`kvcompress.zoo.testbed_path` when ``out`` is not given.
* ``check``  — full-cache needle grid through ``model.generate`` after ``AutoModelForCausalLM.from_pretrained``:
  ``python -m kvcompress.zoo check lengths=[256,1024,4096,8192] [out=paper_tables/testbed.md]`` (``out`` writes
  the grid as Markdown: per length × depth results, timing, machine).
* ``path``   — print the testbed directory (building it if needed).
* ``train``  — the learned-testbed recipe (GPU): ``python -m kvcompress.zoo train [config=testbed-learned|PATH.yaml]
  [optim.steps=100 ...]`` (``configs/train/``).

Each command's options and their defaults: ``configs/zoo/<command>.yaml`` (``train``: ``configs/train/``), printed by
``python -m kvcompress.zoo COMMAND --help``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import Command, fail
from ..cli import main as cli_main
from ..constraints import AnyOf, Choice, Device, Integer, ListOf, ModelDir, Number, Optional, OutputDir, OutputFile
from ..errors import KVCompressError

TEMPLATES = ("magic_number", "passkey", "kamradt")


def build_command(cfg: Any) -> int:
    from .testbed import build, testbed_path

    t0 = time.perf_counter()
    out = build(cfg.out) if cfg.out else testbed_path(rebuild=True)
    print(f"built constructed testbed in {time.perf_counter() - t0:.2f}s -> {out}")
    return 0


def path_command(cfg: Any) -> int:
    from .testbed import testbed_path

    print(testbed_path())
    return 0


#: what each option accepts (kvcompress.constraints), checked before the testbed is built or loaded
BUILD = {"out": Optional(OutputDir())}
CHECK = {
    "path": Optional(ModelDir()),
    "lengths": ListOf(Integer(min=1)),
    "depths": ListOf(Number(0.0, 1.0)),
    "distractors": Integer(min=0),
    "template": Choice(TEMPLATES),
    "seed": Integer(min=0),
    "threads": Integer(min=1),
    "out": Optional(OutputFile()),
}

TRAIN = {
    "seed": Integer(min=0),
    "out_dir": OutputDir(),
    "device": AnyOf((Choice(("auto",)), Device())),
    "dtype": Choice(("bfloat16", "float16", "float32")),
    "data.lengths": ListOf(Integer(min=16)),
    "data.tokens_per_batch": Integer(min=1),
    "data.mix.*": Number(min=0.0),
    "data.num_distractors": ListOf(Integer(min=0)),
    "data.value_digits": ListOf(Integer(min=1, max=12)),
    "data.answer_loss_weight": Number(min=0.0),
    "data.text_loss_weight": Number(min=0.0),
    "optim.steps": Integer(min=1),
    "optim.lr": Number(min=0.0, open_min=True),
    "optim.warmup_steps": Integer(min=0),
    "optim.weight_decay": Number(min=0.0),
    "optim.betas": ListOf(Number(0.0, 1.0, open_max=True), min_len=2),
    "optim.grad_clip": Number(min=0.0),
    "eval.every": Integer(min=1),
    "eval.lengths": ListOf(Integer(min=1)),
    "eval.depths": ListOf(Number(0.0, 1.0)),
}


def validate_check(cfg: Any) -> None:
    """Rules between options, before the model loads: distractors only with ``magic_number``, and every length
    holding the template's fixed text (counted with the testbed's tokenizer)."""
    from transformers import AutoTokenizer

    from kvcompress.eval.needle import minimum_length

    if cfg.distractors and cfg.template != "magic_number":
        raise KVCompressError(f"distractors={cfg.distractors} with template {cfg.template!r}, which has one fixed key; "
                              "valid: distractors=0, or template=magic_number")
    from .testbed import testbed_path

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.path or testbed_path()))
    need = minimum_length(tokenizer, str(cfg.template), int(cfg.distractors) if cfg.template == "magic_number" else 0)
    if min(int(x) for x in cfg.lengths) < need:
        raise KVCompressError(f"lengths={list(cfg.lengths)}: {min(cfg.lengths)} tokens cannot hold the "
                              f"{cfg.template!r} template's fixed text; valid: lengths >= {need}")


def check_command(cfg: Any, argv: list[str]) -> int:
    import torch

    from .testbed import check_grid, grid_markdown

    torch.set_num_threads(int(cfg.threads))
    res = check_grid(
        cfg.path,
        lengths=[int(x) for x in cfg.lengths],
        depths=[float(x) for x in cfg.depths],
        num_distractors=int(cfg.distractors),
        template=str(cfg.template),
        seed=int(cfg.seed),
    )
    if cfg.out:
        command = "python -m kvcompress.zoo " + " ".join(argv)
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(grid_markdown(res, command))
        print(f"wrote {out}")
    return 0 if res["accuracy"] == 1.0 else 1


def train_command(cfg: Any) -> int:
    from omegaconf import OmegaConf

    from .train import train

    out = train(OmegaConf.to_container(cfg, resolve=True))
    print(f"trained learned testbed -> {out}")
    return 0


def commands(argv: list[str]) -> dict[str, Command]:
    return {
        "build": Command("zoo/build", build_command, """Build the constructed testbed (a 3-layer Llama whose weights
            are set by hand to implement a retrieval circuit: tokenizer, weights and kvcompress_testbed.json) into
            out=DIR, or into the cache directory (rebuilt) when out is not given.""", constraints=BUILD),
        "check": Command("zoo/check", lambda cfg: check_command(cfg, argv), """Full-cache needle grid of the testbed
            (length x depth, exact match) through model.generate after AutoModelForCausalLM.from_pretrained; out=FILE
            writes it as Markdown with timing and machine (paper_tables/testbed.md). Exit status 1 unless every
            prompt is answered.""", constraints=CHECK, validate=validate_check),
        "path": Command("zoo/path", path_command, """Print the testbed directory (building it if needed)."""),
        "train": Command("train/testbed-learned", train_command, """The learned-testbed recipe: train a small Llama
            from scratch on synthetic retrieval data (needs a GPU to be useful); config=NAME picks a config under
            configs/train/ (or config=PATH.yaml), key=value overrides any of its entries (optim.steps=100).""",
                         choose="train", constraints=TRAIN),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a bad input, with a one-line message on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = cli_main("python -m kvcompress.zoo", commands(args), args)
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
