"""``python -m kvcompress.zoo build [--out DIR]`` / ``check`` / ``path`` / ``train``.

* ``build``  — build the **constructed** testbed (tokenizer + weights + ``kvcompress_testbed.json``) into DIR, or
  into the cache directory used by :func:`kvcompress.zoo.testbed_path` when DIR is omitted.
* ``check``  — full-cache needle grid through ``model.generate`` after ``AutoModelForCausalLM.from_pretrained``:
  ``python -m kvcompress.zoo check --lengths 256,1024,4096,8192 [--out paper_tables/testbed.md]`` (``--out`` writes
  the grid as Markdown: per length × depth results, timing, machine).
* ``path``   — print the testbed directory (building it if needed).
* ``train``  — the learned-testbed recipe (GPU):
  ``python -m kvcompress.zoo train --config configs/train/testbed-learned.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m kvcompress.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the constructed testbed")
    b.add_argument("--out", default=None, help="output directory (default: the cache directory)")
    c = sub.add_parser("check", help="full-cache needle grid")
    c.add_argument("--path", default=None, help="testbed directory (default: build/cached)")
    c.add_argument("--lengths", default="256,1024,4096,8192")
    c.add_argument("--depths", default=",".join(str(i / 10) for i in range(11)))
    c.add_argument("--distractors", type=int, default=3)
    c.add_argument("--template", default="magic_number", choices=["magic_number", "passkey", "kamradt"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default=None, help="write the grid as Markdown to this file (e.g. paper_tables/testbed.md)")
    sub.add_parser("path", help="print the testbed directory")
    t = sub.add_parser("train", help="learned-testbed recipe (needs a GPU for useful runs)")
    t.add_argument("--config", default=None)
    t.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        from .testbed import build, testbed_path

        t0 = time.perf_counter()
        out = build(args.out) if args.out else testbed_path(rebuild=True)
        print(f"built constructed testbed in {time.perf_counter() - t0:.2f}s -> {out}")
        return 0
    if args.cmd == "path":
        from .testbed import testbed_path

        print(testbed_path())
        return 0
    if args.cmd == "check":
        import torch

        from .testbed import check_grid, grid_markdown

        torch.set_num_threads(args.threads)
        res = check_grid(
            args.path,
            lengths=[int(x) for x in args.lengths.split(",")],
            depths=[float(x) for x in args.depths.split(",")],
            num_distractors=args.distractors,
            template=args.template,
            seed=args.seed,
        )
        if args.out:
            command = "python -m kvcompress.zoo " + " ".join(argv if argv is not None else sys.argv[1:])
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(grid_markdown(res, command))
            print(f"wrote {out}")
        return 0 if res["accuracy"] == 1.0 else 1
    if args.cmd == "train":
        from .train import main as train_main

        return train_main(args.config, args.overrides)
    return 2


if __name__ == "__main__":
    sys.exit(main())
