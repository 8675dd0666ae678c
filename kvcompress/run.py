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

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import kvcompress

from .api import applied, build_pipeline, prepare
from .constraints import Boolean, Choice, Constraint, Device, Integer, Optional, OutputFile, check, fraction
from .distributed import is_main_process
from .errors import KVCompressError, unknown_choice
from .eval.loop import evaluate
from .latency import check_latency_config, latency_block
from .latency.options import RUN as LATENCY_OPTIONS
from .models import DTYPES, check_model_config, load_model, load_tokenizer
from .registry import BASELINE, SIZE_FIELDS, available_methods, get_method, method_defaults, resolve_references
from .results import Row, json_default, prediction_records, predictions_path, provenance, results_file

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

    # method=mypkg.mod:MyMethod (a user's method class): imported and registered, then named as any other method
    argv = [f"{a.partition('=')[0]}={resolve_references(a.partition('=')[2])}" if a.lstrip("+").startswith("method=")
            else a for a in argv]
    out = check_overrides(argv, CONFIG_DIR / "config.yaml", groups=GROUPS, options=group_options,
                          plus_lists=("method",))
    sized = check_method_overrides([a for a in out if not a.startswith("-") and "=" in a])
    return ["+" + a if a in sized else a for a in out]


def check_method_overrides(overrides: list[str]) -> set[str]:
    """``method=`` names at least one method, and every ``method.<name>.<param>=`` names a parameter of a method the
    run composes (else Hydra would stop with its own traceback, suggesting a ``+``): one line listing the valid
    parameters. Returns the overrides that give one method of a composition its own ``ratio`` / ``budget``
    (``method.layers.ratio=0.5``; not in the generated method config, so Hydra needs them as ``+key=``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sized: set[str] = set()
    chosen: list[list[str]] = [[BASELINE]]  # configs/config.yaml's default method
    for ov in parsed:
        if ov.key_or_group == "method" and not ov.is_delete():
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
            chosen = [[str(v)] if isinstance(v, str) else [str(x) for x in v] for v in values]
            if any(not names for names in chosen):
                raise KVCompressError("method=[] names no method; valid: a method name, a+b, or a list [a,b] "
                                      f"(methods: {', '.join(available_methods())})")
    for ov in parsed:
        parts = ov.key_or_group.split(".")
        if parts[0] != "method" or len(parts) < 2:
            continue
        name = parts[1]
        if name not in available_methods():
            raise unknown_choice("method", name, available_methods())
        missing = [names for names in chosen if name not in names]
        if missing:
            raise KVCompressError(f"{ov.input_line} sets a parameter of {name!r}, which is not in "
                                  f"method={'+'.join(missing[0])}; valid: method.<one of {', '.join(missing[0])}>.<param>")
        sizes = [f for f in SIZE_FIELDS if f in {x.name for x in dataclasses.fields(get_method(name))}]
        if len(parts) > 2 and parts[2] not in [*method_defaults(name), *sizes]:
            raise unknown_choice(f"parameter of method {name!r}", parts[2], [*method_defaults(name), *sizes])
        if len(parts) == 3 and parts[2] in sizes and not ov.is_add():
            sized.add(ov.input_line)
    return sized


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


#: what each run option accepts (kvcompress.constraints), checked before anything loads; the method's parameters
#: are checked by its dataclass, the model config by kvcompress.models.check_model_config, the eval config by its
#: module's ``validate``
CONSTRAINTS: dict[str, Constraint] = {
    "ratio": Optional(fraction()),
    "budget": Optional(Integer(min=1)),
    "seed": Integer(min=0),
    "threads": Integer(min=1),
    "device": Device(),
    "dtype": Optional(Choice(DTYPES)),
    "results": OutputFile(),
    "print_summary": Boolean(),
    "rerun": Boolean(),
    **{f"latency.{key}": constraint for key, constraint in LATENCY_OPTIONS.items()},
}


def validate(cfg: DictConfig) -> tuple[list[str], dict[str, dict[str, Any]], Any]:
    """Every check that needs no model, in one place, before anything loads: the run options (:data:`CONSTRAINTS`),
    the method and its parameters, the evaluation's config, the model config. Returns the method names, their
    parameters and the evaluation module."""
    check(cfg, CONSTRAINTS)
    check_latency_config(OmegaConf.to_container(cfg.latency, resolve=True))  # cross-field: context limit, TP, ...
    names, params = method_spec(cfg)
    build_pipeline(names, ratio=cfg.ratio, budget=cfg.budget, params=params)
    eval_module = _eval_module(cfg.eval.name)
    _validate_eval(eval_module, cfg.eval)
    check_model_config(cfg.model, cfg.dtype)
    return names, params, eval_module


def _validate_eval(module: Any, eval_cfg: Any, tokenizer: Any = None) -> None:
    """The evaluation module's ``validate(cfg[, tokenizer])``: without a tokenizer before anything loads, with it
    (loaded without the weights) for the checks that need token counts."""
    check_eval = getattr(module, "validate", None)
    if check_eval is None:
        return
    if tokenizer is None:
        check_eval(eval_cfg)
    elif "tokenizer" in inspect.signature(check_eval).parameters:
        check_eval(eval_cfg, tokenizer=tokenizer)


def run_config(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one configuration end to end and append its results row. Returns the row, or None when the results
    file already holds a row for this configuration, or another process is computing it (a rerun after an
    interrupted sweep, or the same sweep started twice, skips that work; ``rerun=true`` forces it)."""
    names, params, eval_module = validate(cfg)
    results = results_file(cfg.results)
    results.check_writable()
    key = config_key(cfg)
    with contextlib.nullcontext(None) if cfg.rerun else results.claim(key) as busy:
        if busy is not None:
            where = "is already in" if busy == "finished" else "is being computed by another run writing to"
            print(f"skipped: {'+'.join(names)} (ratio={cfg.ratio}, budget={cfg.budget}) {where} {results.path}"
                  + (" (rerun=true to redo)" if busy == "finished" else ""))
            return None
        row = compute_row(cfg, names, params, eval_module, key)
        if is_main_process():  # under accelerate launch, samples were split and gathered: one row, from rank 0
            sidecar = predictions_path(results.path)
            results.append(row, default=json_default, sidecar=(sidecar, prediction_records(row)))
            if cfg.print_summary:
                print(summary_table(row, results.path, sidecar))
    return row


def compute_row(cfg: DictConfig, names: list[str], params: dict[str, dict[str, Any]], eval_module: Any,
                key: str) -> dict[str, Any]:
    """Load the model, evaluate the configuration and return its results row (:class:`~kvcompress.results.Row`)."""
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    tokenizer = load_tokenizer(cfg.model)  # without the weights: the checks that count tokens come first
    if tokenizer is None and getattr(eval_module, "NEEDS_TOKENIZER", True):
        raise KVCompressError(f"eval={cfg.eval.name} needs the model's tokenizer and model {cfg.model.name!r} has "
                              "none; valid: eval=fidelity (token ids), or a model with a tokenizer (model=testbed, "
                              "model.path=DIR)")
    _validate_eval(eval_module, cfg.eval, tokenizer)
    start = time.perf_counter()
    loaded = load_model(cfg.model, cfg.dtype, cfg.device)
    load_s = time.perf_counter() - start
    model = loaded.model
    # per-model set-up (head-score artifacts, low-rank bases) once, before the evaluation: messages, not timings
    pipeline = build_pipeline(names, ratio=cfg.ratio, budget=cfg.budget, params=params)
    prepare(model, pipeline, loaded.tokenizer)
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
    accuracy.setdefault("sample_metric", task.primary)  # each sample's score in the predictions sidecar
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
        convention=lat.get("convention", "exact"),
        model_name=loaded.name,
        serving=OmegaConf.to_container(lat.serving, resolve=True) if lat.get("serving") is not None else None,
    )
    return Row(
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
        methods=applied(pipeline, cfg.ratio, cfg.budget),  # per method: ratio / budget as applied, parameters
        method_state=result.method_state,  # what methods decided (kept layers, merged pairs, errors, ...)
        samples=result.samples,  # per sample: metadata, prediction, scores, kept fraction, differing method state
        timing={"load_s": round(load_s, 3), "eval_s": round(eval_s, 3), "samples_s": [round(s, 3) for s in result.seconds]},
        provenance=provenance(int(cfg.seed), _devices(model), int(cfg.threads)),
    ).to_dict()


def _devices(model: torch.nn.Module) -> str:
    """Where the model's parameters actually are (several devices under ``model.device_map``)."""
    return ",".join(sorted({str(p.device) for p in model.parameters()}))


def _eval_module(name: str) -> Any:
    if name not in group_options("eval"):
        raise unknown_choice("eval", name, group_options("eval"))
    return importlib.import_module(f"kvcompress.eval.{name}")


def summary_table(row: dict[str, Any], results_path: Path, predictions: Path | None = None) -> str:
    mem, acc = row["memory"], row["accuracy"]
    lines = [
        ("method", f"{row['method']}  ({'; '.join(mem['pipeline'])})"),
        *[("not applied", f"{', '.join(f'{k}={row[k]}' for k in m['not_applied'])} (not a parameter of {m['name']})")
          for m in row.get("methods", []) if m["not_applied"]],
        ("model", row["model"]["name"] + ("  [random init: accuracy meaningless]" if row["model"]["random_init"] else "")),
        ("context tokens", str(mem["context_tokens"])),
        ("KV dense", f"{mem['dense_bytes'] / 2**20:.3f} MiB"),
        ("KV kept", f"{mem['kept_bytes'] / 2**20:.3f} MiB  (resident {mem['resident_bytes'] / 2**20:.3f} MiB)"),
        ("kept fraction", f"{_num(mem.get('kept_fraction_prefill'), 4)} after prefill, {_num(mem['kept_fraction'], 4)} "
                          "after generation"),
    ]
    for key, value in acc.items():
        if key not in ("task", "note") and "@d" not in key and isinstance(value, (int, float)):
            lines.append((f"{acc.get('task', row['task'])}.{key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    if "note" in acc:
        lines.append(("note", acc["note"]))
    lines += serving_lines(row.get("latency") or {})
    lines.append(("results", f"appended to {results_path}"))
    if predictions is not None and row.get("samples"):
        lines.append(("predictions", f"{len(row['samples'])} samples appended to {predictions}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _num(value: Any, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def serving_lines(latency: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table's modelled serving cost (the row's latency block): per entry, where it is modelled, then
    users that fit, decode ms/token, prefill s and session throughput, uncompressed → compressed, and whether it
    fits."""
    lines = []
    for key in ("evaluated", "deployment"):
        d = latency.get(key)
        if not d:
            continue
        base = d["baseline"]
        where = (f"{d['model']} @ {d['context']:,} tok + {d['output_tokens']} out on {d['tp']} × {d['hardware']}"
                 f" ({d['convention']}, {d['serving']['weight_dtype']} weights, {d['serving']['kv_dtype']} KV)")
        if key == "deployment":
            where += f", projected from {d['projected_from']['model']}"
        ratio = d["ratio"].get("concurrency")
        users = f"{_num(base['users_fit'], 2)} → {_num(d['users_fit'], 2)}" + (
            f" (×{ratio:.2f})" if ratio is not None and math.isfinite(ratio) else "")
        tps = ("does not fit" if d["session_throughput_tok_s"] is None
               else f"{_num(base['session_throughput_tok_s'], 1)} → {_num(d['session_throughput_tok_s'], 1)} tok/s")
        lines += [
            (f"serving ({key})", where),
            ("  users that fit", users),
            ("  decode", f"{_num(base['decode_ms_per_token'], 2)} → {_num(d['decode_ms_per_token'], 2)} ms/token"),
            ("  prefill", f"{_num(base['prefill_s'], 3)} → {_num(d['prefill_s'], 3)} s  ({d['prefill_saving']})"),
            ("  throughput, 1 user", tps),
            ("  fits", d["fit"]),
        ]
    return lines


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
