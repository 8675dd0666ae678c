"""``python -m kvcompress.methods.head detect|show model=NAME [key=value ...]``.

detect: run needle probes and write the head-score artifact (``$KVCOMPRESS_CACHE/heads/<config hash>.json``).
    options: lengths=512,1024  depths=0.1,0.3,0.5,0.7,0.9  samples=1  seed=0  template=magic_number  out=PATH
show: print the layer × head table of the artifact and write a heatmap PNG.
    options: score=retrieval|mass (default: the artifact's primary score)  png=PATH (default: next to the artifact)
    scores=PATH (an artifact file; default: the model's cached one)

``model=`` is a model config name (``configs/model/<name>.yaml``, e.g. ``testbed``) or a local model directory.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from kvcompress.errors import KVCompressError, unknown_choice

COMMANDS = ("detect", "show")
OPTIONS = {
    "detect": ("model", "lengths", "depths", "samples", "seed", "template", "out"),
    "show": ("model", "score", "png", "scores"),
}


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


def _parse(argv: list[str]) -> tuple[str, dict[str, str]]:
    if not argv or argv[0] not in COMMANDS:
        raise KVCompressError(f"usage: python -m kvcompress.methods.head {{detect|show}} model=NAME ...; got {argv[:1]}")
    cmd, opts = argv[0], {}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS[cmd]:
            raise unknown_choice(f"option for `{cmd}`", key if sep else arg, OPTIONS[cmd])
        opts[key] = value
    if "model" not in opts:
        raise KVCompressError(f"`{cmd}` needs model=NAME (a configs/model name such as testbed, or a directory)")
    return cmd, opts


def main(argv: list[str] | None = None) -> int:
    from kvcompress.methods.head.scores import artifact_path, heatmap, load_scores, save_scores, score_table

    args = sys.argv[1:] if argv is None else argv
    try:
        cmd, opts = _parse(args)
        loaded = _load(opts["model"])
        model = loaded.model
        if cmd == "detect":
            if loaded.tokenizer is None:
                raise KVCompressError(f"model {opts['model']!r} has no tokenizer; needle probes need one")
            from .detect import DEFAULT_DEPTHS, DEFAULT_LENGTHS, detect

            lengths = [int(x) for x in opts["lengths"].split(",")] if "lengths" in opts else list(DEFAULT_LENGTHS)
            depths = [float(x) for x in opts["depths"].split(",")] if "depths" in opts else list(DEFAULT_DEPTHS)
            scores = detect(
                model, loaded.tokenizer, lengths=lengths, depths=depths, samples=int(opts.get("samples", 1)),
                seed=int(opts.get("seed", 0)), template=opts.get("template", "magic_number"), model_name=loaded.name,
            )
            path = save_scores(scores, opts.get("out") or artifact_path(model))
            print(score_table(scores, kv=False))
            pr = scores["probes"]
            print(f"primary score: {scores['primary']}; correct probes {pr['correct']}/{pr['count']}; wrote {path}")
        else:
            path = Path(opts["scores"]) if "scores" in opts else artifact_path(model)
            if not path.is_file() and "scores" not in opts:
                raise KVCompressError(
                    f"no head scores for model {opts['model']!r} at {path}; run `python -m kvcompress.methods.head detect "
                    f"model={opts['model']}` first"
                )
            scores = load_scores(path, model)
            which = opts.get("score") or scores["primary"]
            if which not in ("retrieval", "mass"):
                raise unknown_choice("score", which, ("retrieval", "mass"))
            print(score_table(scores, which))
            print()
            print(score_table(scores, which, kv=True))
            png = heatmap(scores, opts.get("png") or path.with_suffix(f".{which}.png"), which)
            print(f"heatmap: {png}")
    except KVCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
