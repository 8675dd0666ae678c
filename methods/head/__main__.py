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
from kvcompress.errors import KVCompressError, unknown_choice

SCORES = ("retrieval", "mass")


def _load(model_name: str):
    from omegaconf import OmegaConf

    from kvcompress.models import load_model

    config_dir = Path(importlib.import_module("kvcompress.configs").__file__).parent / "model"
    cfg_file = config_dir / f"{model_name}.yaml"
    if cfg_file.is_file():
        cfg = OmegaConf.load(cfg_file)
    elif Path(model_name).expanduser().is_dir():
        cfg = OmegaConf.create({"name": Path(model_name).name, "path": model_name})
    else:
        raise unknown_choice("model", model_name, sorted(p.stem for p in config_dir.glob("*.yaml")) + ["<directory>"])
    return load_model(cfg)


def detect_command(cfg: Any) -> int:
    from kvcompress.methods.head.scores import artifact_path, save_scores, score_table

    from .detect import detect

    lengths = [int(x) for x in cfg.lengths]
    depths = [float(x) for x in cfg.depths]
    loaded = _load(str(cfg.model))
    if loaded.tokenizer is None:
        raise KVCompressError(f"model {cfg.model!r} has no tokenizer; needle probes need one")
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

    if cfg.score is not None and cfg.score not in SCORES:
        raise unknown_choice("score", cfg.score, SCORES)
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


COMMANDS = {
    "detect": Command("head/detect", detect_command, """Run needle probes on a model and write its head-score
        artifact (retrieval score per layer x head from decode-step copy events, attention mass as a fallback), which
        the `heads` / `adaptive_heads` methods read; model=NAME is a configs/model name (e.g. testbed) or a local
        model directory."""),
    "show": Command("head/show", show_command, """Print a model's head scores as a layer x head and a layer x KV-head
        table and write a heatmap PNG (the artifact written by `detect`, or scores=PATH)."""),
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
