"""``python -m kvcompress.run method=streaming ratio=0.1`` — compress, evaluate, measure, append a results row.

Hydra overrides (``key=value``), config groups ``method`` (one config per registered method, generated from its
dataclass), ``model`` and ``eval`` (one YAML file per option under ``configs/``), sweeps with ``-m``::

    python -m kvcompress.run method=streaming ratio=0.1
    python -m kvcompress.run method=[streaming,random] ratio=0.5     # composition (also method=streaming+random)
    python -m kvcompress.run -m method=streaming,random ratio=0.1,0.5
    python -m kvcompress.run method=streaming method.streaming.sink=8 results=out/rows.jsonl
    python -m kvcompress.run method=h2o budget=128                     # tokens kept instead of a ratio (not both)

Each evaluated configuration appends one typed row (:class:`kvcompress.results.Row`): the resolved config, the memory
block, the accuracy block, one record per sample and provenance; the evaluation runs on the one loop of
:mod:`kvcompress.eval.loop`. Bad input stops the run with a one-line ``error:`` before any computation; rows already in the
results file are never rewritten.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import kvcompress

from .api import build_pipeline, prepare
from .distributed import is_main_process
from .errors import KVCompressError, unknown_choice
from .eval.loop import evaluate
from .latency import latency_block
from .models import load_model
from .registry import available_methods, method_defaults
from .results import Row, append_row, check_writable, provenance, read_rows

CONFIG_DIR = Path(importlib.import_module("kvcompress.configs").__file__).parent
GROUPS = ("method", "model", "eval")


def group_options(group: str) -> list[str]:
    """The options of a config group: every registered method for ``method`` (generated from the registry), else the
    YAML files under ``configs/<group>/``."""
    if group == "method":
        return available_methods()
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def store_method_configs() -> None:
    """One Hydra config per registered method (group ``method``): its own parameters and their defaults, generated
    from the method's dataclass (:func:`~kvcompress.registry.method_defaults`), so ``method.<name>.<param>=`` works
    for every method, a user's included, with nothing copied by hand."""
    store = ConfigStore.instance()
    for name in available_methods():
        store.store(group="method", name=name, node={name: method_defaults(name)})


store_method_configs()


def preflight(argv: list[str]) -> list[str]:
    """Validate command-line overrides with one-line errors before Hydra sees them; rewrite ``method=a+b``."""
    from .cli import preflight as check_overrides

    return check_overrides(argv, CONFIG_DIR / "config.yaml", groups=GROUPS, options=group_options,
                           plus_lists=("method",))


def method_spec(cfg: DictConfig) -> tuple[list[str], dict[str, dict[str, Any]]]:
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if isinstance(method, str):  # method given as a plain string in a custom config
        return method.split("+"), {}
    return list(method), {name: dict(params or {}) for name, params in method.items()}


#: Config keys that do not change what a run computes (left out of the configuration key used to skip reruns).
_NOT_IDENTITY = ("results", "print_summary", "threads", "rerun")


def config_key(cfg: DictConfig) -> str:
    """A stable hash of everything that determines a run's results (method, params, model, eval, seed, ...)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    identity = {k: v for k, v in resolved.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one configuration end to end and append its results row. Returns the row, or None when the results
    file already holds a row for this configuration (a rerun after an interrupted sweep skips finished work;
    ``rerun=true`` forces it)."""
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    results_path = check_writable(cfg.results)
    names, params = method_spec(cfg)
    build_pipeline(names, ratio=cfg.ratio, budget=cfg.budget, params=params)  # validate before loading anything
    key = config_key(cfg)
    if not cfg.get("rerun", False) and any(r.get("config_key") == key for r in read_rows(results_path)):
        print(f"skipped: {'+'.join(names)} (ratio={cfg.ratio}) is already in {results_path} (rerun=true to redo)")
        return None
    eval_module = _eval_module(cfg.eval.name)
    if hasattr(eval_module, "validate"):
        eval_module.validate(cfg.eval)  # bad task names etc. fail before the model is loaded
    start = time.perf_counter()
    loaded = load_model(cfg.model, cfg.dtype, cfg.device)
    load_s = time.perf_counter() - start
    model = loaded.model
    # per-model set-up (head-score artifacts, low-rank bases) once, before the evaluation: messages, not timings
    prepare(model, build_pipeline(names, ratio=cfg.ratio, budget=cfg.budget, params=params),
                           loaded.tokenizer)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    contexts = list(cfg.eval.get("lengths") or []) + [cfg.eval.get("context") or 0]
    needed = max(int(c) for c in contexts) + int(cfg.eval.get("new_tokens") or 16)
    if limit is not None and needed > limit:
        raise KVCompressError(
            f"eval context of {max(int(c) for c in contexts)} tokens (+{needed - max(int(c) for c in contexts)} new) "
            f"exceeds the model's limit of {limit} positions; valid: context + new tokens <= {limit}"
        )

    def make_cache() -> kvcompress.KVCompressCache:
        # an evaluation run records what the methods decided, reconstruction errors included (off by default)
        return kvcompress.compress(model, names, ratio=cfg.ratio, budget=cfg.budget, params=params, diagnostics=True,
                                   tokenizer=loaded.tokenizer)

    task = eval_module.task(cfg.eval, seed=int(cfg.seed), tokenizer=loaded.tokenizer, model=model)
    start = time.perf_counter()
    result = evaluate(model, task, make_cache, tokenizer=loaded.tokenizer)
    eval_s = time.perf_counter() - start
    accuracy = result.accuracy
    if loaded.note:
        accuracy["note"] = loaded.note
    memory = result.memory
    lat = cfg.latency
    latency = latency_block(
        model.config,
        memory,
        hardware=lat.hardware,
        output_tokens=int(lat.output_tokens),
        target=OmegaConf.to_container(lat.deployment, resolve=True),
        efficiency=lat.efficiency,
        model_name=loaded.name,
    )
    row = Row(
        config_key=key,
        method="+".join(names),
        ratio=cfg.ratio,
        budget=cfg.budget,
        model={"name": loaded.name, "constructed": loaded.constructed, "random_init": loaded.random_init},
        task=cfg.eval.name,
        # query-aware: the question is part of what is compressed; question-agnostic: the context alone is
        query_aware=bool(accuracy.get("query_aware", cfg.eval.get("query_aware", True))),
        config=OmegaConf.to_container(cfg, resolve=True),
        memory=memory,
        accuracy=accuracy,
        latency=latency,
        method_state=result.method_state,  # what methods decided (kept layers, merged pairs, errors, ...)
        samples=result.samples,  # per sample: metadata, prediction, scores, kept fraction, differing method state
        timing={"load_s": round(load_s, 3), "eval_s": round(eval_s, 3), "samples_s": [round(s, 3) for s in result.seconds]},
        provenance=provenance(int(cfg.seed), _devices(model), int(cfg.threads)),
    ).to_dict()
    if is_main_process():  # under accelerate launch, samples were split and gathered: one row, from rank 0
        append_row(results_path, row)
        if cfg.print_summary:
            print(summary_table(row, results_path))
    return row


def _devices(model: torch.nn.Module) -> str:
    """Where the model's parameters actually are (several devices under ``model.device_map``)."""
    return ",".join(sorted({str(p.device) for p in model.parameters()}))


def _eval_module(name: str) -> Any:
    if name not in group_options("eval"):
        raise unknown_choice("eval", name, group_options("eval"))
    return importlib.import_module(f"kvcompress.eval.{name}")


def summary_table(row: dict[str, Any], results_path: Path) -> str:
    mem, acc = row["memory"], row["accuracy"]
    lines = [
        ("method", f"{row['method']}  ({'; '.join(mem['pipeline'])})"),
        ("model", row["model"]["name"] + ("  [random init: accuracy meaningless]" if row["model"]["random_init"] else "")),
        ("context tokens", str(mem["context_tokens"])),
        ("KV dense", f"{mem['dense_bytes'] / 2**20:.3f} MiB"),
        ("KV kept", f"{mem['kept_bytes'] / 2**20:.3f} MiB  (resident {mem['resident_bytes'] / 2**20:.3f} MiB)"),
        ("kept fraction", f"{mem['kept_fraction']:.4f}"),
    ]
    for key, value in acc.items():
        if key not in ("task", "note") and "@d" not in key and isinstance(value, (int, float)):
            lines.append((f"{acc.get('task', row['task'])}.{key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    if "note" in acc:
        lines.append(("note", acc["note"]))
    lines.append(("results", f"appended to {results_path}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


@hydra.main(version_base=None, config_path="pkg://kvcompress.configs", config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        run_config(cfg)
    except KVCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        args = preflight(args)
    except KVCompressError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    store_method_configs()
    _hydra_entry()


if __name__ == "__main__":
    main()
