"""``python -m kvcompress.methods.head detect|show model=NAME [key=value ...]`` (Hydra overrides, like ``run``).

detect: run needle probes and write the head-score artifact (``$KVCOMPRESS_CACHE/heads/<config hash>.json``).
    options (``configs/head/detect.yaml``): lengths=[512,1024]  depths=[0.1,0.3,0.5,0.7,0.9]  samples=1  seed=0
    template=magic_number  out=PATH
show: print the layer × head table of the artifact and write a heatmap PNG.
    options (``configs/head/show.yaml``): score=retrieval|mass (default: the artifact's primary score)
    png=PATH (default: next to the artifact)  scores=PATH (an artifact file; default: the model's cached one)

``model=`` is a model config name (``configs/model/<name>.yaml``, e.g. ``testbed``) or a local model directory.
``--help`` after a command prints its options and their defaults.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from kvcompress.cli import Command, fail
from kvcompress.cli import main as cli_main
from kvcompress.constraints import Call, Choice, ExistingPath, Integer, ListOf, Number, Optional, OutputFile
from kvcompress.errors import KVCompressError, unknown_choice
from kvcompress.eval.needle import TEMPLATES

SCORES = ("retrieval", "mass")


def _model_config(model_name: str) -> Any:
    """The model config ``model=`` names: a config under ``configs/model/`` or a local model directory."""
    from omegaconf import OmegaConf

    config_dir = Path(importlib.import_module("kvcompress.configs").__file__).parent / "model"
    cfg_file = config_dir / f"{model_name}.yaml"
    if cfg_file.is_file():
        cfg = OmegaConf.load(cfg_file)
        if cfg.get("builtin") is None and cfg.get("path") is None:  # a latency-only preset (no weights)
            raise KVCompressError(f"model={model_name!r} is a latency preset without weights; valid: a model with "
                                  "weights (testbed, tiny-random, or a local model directory)")
        return cfg
    if Path(model_name).expanduser().is_dir():
        return OmegaConf.create({"name": Path(model_name).name, "path": model_name})
    raise unknown_choice("model", model_name, sorted(p.stem for p in config_dir.glob("*.yaml")) + ["<directory>"])


def _check_model(model_name: str) -> None:
    from kvcompress.models import check_model_config

    check_model_config(_model_config(str(model_name)))


def _load(model_name: str):
    from kvcompress.models import load_model

    return load_model(_model_config(model_name))


def validate_detect(cfg: Any) -> None:
    """Before the model loads: every length holds the needle template's fixed text (with the model's tokenizer)."""
    from kvcompress.eval.needle import minimum_length
    from kvcompress.models import load_tokenizer

    tokenizer = load_tokenizer(_model_config(str(cfg.model)))
    if tokenizer is None:
        raise KVCompressError(f"model {cfg.model!r} has no tokenizer; valid: a model with one (needle probes are text)")
    need = minimum_length(tokenizer, str(cfg.template))
    if min(int(x) for x in cfg.lengths) < need:
        raise KVCompressError(f"lengths={list(cfg.lengths)}: {min(cfg.lengths)} tokens cannot hold the "
                              f"{cfg.template!r} template's fixed text; valid: lengths >= {need}")


def detect_command(cfg: Any) -> int:
    from kvcompress.methods.head.scores import artifact_path, save_scores, score_table

    from .detect import detect

    lengths = [int(x) for x in cfg.lengths]
    depths = [float(x) for x in cfg.depths]
    loaded = _load(str(cfg.model))
    scores = detect(
        loaded.model, loaded.tokenizer, lengths=lengths, depths=depths, samples=int(cfg.samples), seed=int(cfg.seed),
        template=str(cfg.template), model_name=loaded.name,
    )
    path = save_scores(scores, cfg.out or artifact_path(loaded.model))
    print(score_table(scores, kv=False))
    pr = scores["probes"]
    print(f"primary score: {scores['primary']}; correct probes {pr['correct']}/{pr['count']}; wrote {path}")
    return 0


def show_command(cfg: Any) -> int:
    from kvcompress.methods.head.scores import artifact_path, heatmap, load_scores, score_table

    if cfg.scores:
        load_scores(cfg.scores)  # the file's own checks, before the model loads
    loaded = _load(str(cfg.model))
    model = loaded.model
    path = Path(cfg.scores) if cfg.scores else artifact_path(model)
    if not path.is_file() and not cfg.scores:
        raise KVCompressError(
            f"no head scores for model {cfg.model!r} at {path}; run `python -m kvcompress.methods.head detect "
            f"model={cfg.model}` first"
        )
    scores = load_scores(path, model)
    which = cfg.score or scores["primary"]
    if which not in SCORES:
        raise unknown_choice("score", which, SCORES)
    print(score_table(scores, which))
    print()
    print(score_table(scores, which, kv=True))
    png = heatmap(scores, cfg.png or path.with_suffix(f".{which}.png"), which)
    print(f"heatmap: {png}")
    return 0


#: what each option accepts (kvcompress.constraints), checked before any model loads
DETECT = {
    "model": Call(_check_model, "a configs/model name with weights, or a local model directory"),
    "lengths": ListOf(Integer(min=1)),
    "depths": ListOf(Number(0.0, 1.0)),
    "samples": Integer(min=1),
    "seed": Integer(min=0),
    "template": Choice(TEMPLATES),
    "out": Optional(OutputFile(suffixes=(".json",))),
}
SHOW = {
    "model": DETECT["model"],
    "score": Optional(Choice(SCORES)),
    "png": Optional(OutputFile(suffixes=(".png", ".pdf", ".svg"))),
    "scores": Optional(ExistingPath("file", text=True)),
}

COMMANDS = {
    "detect": Command("head/detect", detect_command, """Run needle probes on a model and write its head-score
        artifact (retrieval score per layer x head from decode-step copy events, attention mass as a fallback), which
        the `heads` / `adaptive_heads` methods read; model=NAME is a configs/model name (e.g. testbed) or a local
        model directory.""", constraints=DETECT, validate=validate_detect),
    "show": Command("head/show", show_command, """Print a model's head scores as a layer x head and a layer x KV-head
        table and write a heatmap PNG (the artifact written by `detect`, or scores=PATH).""", constraints=SHOW),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a bad input, with a one-line message on stderr)."""
    try:
        status = cli_main("python -m kvcompress.methods.head", COMMANDS, sys.argv[1:] if argv is None else argv)
    except KVCompressError as err:
        return fail(err)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
