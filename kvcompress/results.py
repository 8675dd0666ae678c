"""Results rows: one typed record per evaluated configuration (or benchmark measurement), appended to a JSONL file.

:class:`Row` is the one schema every producer writes — ``python -m kvcompress.run``, the sweeps over it and the
benchmarks that back a table (``scripts/quant_memory.py``, ``scripts/rope_check.py``) — and
:mod:`kvcompress.tables` renders every table from. A row carries ``schema_version`` (:data:`SCHEMA_VERSION`);
rows written before the schema existed have no version and are version 1 by definition (untyped dicts, still
readable: they are version 2 rows without ``samples`` / ``timing``); version 2 rows are version 3 rows without
``methods``.

:func:`read_rows` validates line by line: lines that are not UTF-8, not JSON (e.g. the torn last line of a killed run),
not an object, of an unknown schema version, or typed rows with missing or mistyped fields are skipped and named
in one warning on stderr; every other row is read. Appends, the rerun check and concurrent runs go through
:mod:`kvcompress.results_file` (a lock, per-configuration claims and an index of finished keys).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from . import __version__
from .errors import KVCompressError
from .registry import BASELINE
from .results_file import ResultsFile
from .results_file import read_rows as _read_rows

#: The version of :class:`Row` this code writes. 1 = the untyped rows written before the schema (no version field).
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class Row:
    """One results row.

    * ``config_key``: hash of everything that determines the result (a rerun of the same configuration skips it);
    * ``method`` (``a+b`` for a composition), ``ratio``, ``budget``, ``model`` (``name``, ``constructed``,
      ``random_init``), ``task`` (the evaluation, or a benchmark's measurement), ``query_aware``;
    * ``config``: the full resolved configuration;
    * ``methods``: per composed method, what it ran with (:func:`kvcompress.api.applied`): its ``ratio`` / ``budget``
      as applied, its parameters, and ``not_applied``, the run-wide ``ratio`` / ``budget`` it does not take
      (version 3; older rows have none);
    * ``memory``: the memory report of the first sample's cache (``kvcompress.KVCompressCache.memory_report``) with
      the pipeline and the prefill cost the methods declare;
    * ``accuracy``: the task's result block (for a benchmark row: its measured figures);
    * ``latency``: Fu 2024's modelled serving cost (evaluated model, and projected onto the deployment target);
    * ``method_state``: what the methods decided for the first sample (kept layers, reconstruction errors, ...);
    * ``samples``: one record per sample, in sample order: its ``id``, metadata (length, depth, task, ...),
      prediction, reference, scores, ``kept_fraction_prefill`` (right after the prefill), ``kept_fraction`` (after
      generation), ``kept_bytes`` and the ``method_state`` entries that differ from the row's; the same records, one
      line each, go to the predictions sidecar (:func:`predictions_path`, :func:`prediction_records`);
    * ``timing``: wall seconds (``load_s`` model load, ``eval_s`` evaluation, ``samples_s`` per sample) — the only
      part of a row that is not a function of its configuration, with ``provenance``;
    * ``provenance``: package / torch / transformers versions, git commit, machine, threads, seed, timestamp.
    """

    config_key: str
    method: str
    task: str
    model: dict[str, Any]
    config: dict[str, Any]
    accuracy: dict[str, Any]
    provenance: dict[str, Any]
    ratio: float | None = None
    budget: int | None = None
    query_aware: bool | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        problem = validate_row(data)
        if problem:
            raise KVCompressError(f"not a results row: {problem}")
        if _version(data) == 1:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.name != "schema_version"})
        return cls(**data)


#: Field name -> accepted JSON types (None allowed where the field may be null).
_TYPES: dict[str, tuple[type, ...]] = {
    "config_key": (str,), "method": (str,), "task": (str,), "model": (dict,), "config": (dict,), "accuracy": (dict,),
    "provenance": (dict,), "ratio": (int, float, type(None)), "budget": (int, type(None)),
    "query_aware": (bool, type(None)), "memory": (dict,), "latency": (dict,), "method_state": (dict,),
    "methods": (list,), "samples": (list,), "timing": (dict,), "schema_version": (int,),
}  # fmt: skip
_REQUIRED = tuple(f.name for f in dataclasses.fields(Row) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]


def _version(data: dict[str, Any]) -> Any:
    return data.get("schema_version", 1)


def validate_row(data: Any) -> str | None:
    """Why ``data`` is not a readable row (one line), or None. Version-1 rows (no ``schema_version``) are untyped
    dicts and accepted as they are; typed rows (versions 2, 3) must have every required field, no unknown one, and the types
    of :class:`Row`."""
    if not isinstance(data, dict):
        return f"not a JSON object (a {type(data).__name__})"
    version = _version(data)
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        return f"schema_version {version!r} is not readable here; valid: {', '.join(map(str, READABLE_VERSIONS))}"
    if version == 1:
        return None
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        return f"schema_version {version} row lacks field(s) {', '.join(missing)}"
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        return f"schema_version {version} row has unknown field(s) {', '.join(unknown)}"
    for key, value in data.items():
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            return f"field {key!r} is a {type(value).__name__}; valid: {' or '.join(t.__name__ for t in _TYPES[key])}"
    return None


def results_file(path: str | os.PathLike[str], on_error: Callable[[str], None] | None = None) -> ResultsFile:
    """The results file at ``path`` with its lock, claims and key index (:mod:`kvcompress.results_file`)."""
    return ResultsFile(path, validate_row, on_error or _report)


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail before any computation if the results file cannot be appended to (nothing in it is touched)."""
    return results_file(path).check_writable()


def append_row(path: str | os.PathLike[str], row: Row | dict[str, Any]) -> None:
    """Append one row (:meth:`kvcompress.results_file.ResultsFile.append`: one locked, fsynced write of one line;
    a failed write leaves the file as it was and saves the row to a rescue file)."""
    data = row.to_dict() if isinstance(row, Row) else row
    results_file(path).append(data, default=json_default)


def predictions_path(results: str | os.PathLike[str]) -> Path:
    """The per-sample predictions sidecar of a results file: ``runs.jsonl`` → ``runs.predictions.jsonl``."""
    path = Path(results).expanduser()
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.predictions.jsonl")


def prediction_records(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One sidecar record per sample of ``row``: which run (``config_key``, method, ratio, budget, model, task), the
    sample (``id`` in the task's order, ``meta``), ``prediction``, ``reference``, ``score`` (the task's per-sample
    metric, named in ``metric``: the accuracy block's ``sample_metric``), the kept fraction right after the prefill
    and after generation."""
    metric = row.get("accuracy", {}).get("sample_metric", "score")
    out = []
    for index, sample in enumerate(row.get("samples") or []):
        out.append({
            "config_key": row.get("config_key"), "method": row.get("method"), "ratio": row.get("ratio"),
            "budget": row.get("budget"), "model": (row.get("model") or {}).get("name"), "task": row.get("task"),
            "id": sample.get("id", index), "meta": sample.get("meta", {}), "prediction": sample.get("prediction"),
            "reference": sample.get("reference"), "metric": metric, "score": sample.get(metric),
            "kept_fraction_prefill": sample.get("kept_fraction_prefill"), "kept_fraction": sample.get("kept_fraction"),
        })
    return out


def read_predictions(path: str | os.PathLike[str], on_error: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a predictions sidecar (bad lines skipped under one warning, as for rows)."""
    def check(data: Any) -> str | None:
        return None if isinstance(data, dict) and "config_key" in data and "score" in data else "not a prediction"

    return _read_rows(path, check, on_error or _report)


def _report(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_rows(path: str | os.PathLike[str], on_error: Callable[[str], None] | None = _report) -> list[dict[str, Any]]:
    """Rows of a results file, as dicts (streamed). Lines that are not readable rows (not UTF-8, not JSON, not an
    object, an unknown schema) are skipped and reported through ``on_error`` in ONE message naming the file and the
    lines (default: ``warning: ...`` on stderr). Blank lines are ignored; a missing file has no rows."""
    return _read_rows(path, validate_row, on_error)


def json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def jsonable(obj: Any) -> Any:
    """Plain-JSON parts of compressor state (tensors, other objects and private ``_``-prefixed keys are left out)."""
    if isinstance(obj, dict):
        items = {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
        return {k: v for k, v in items.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        items = [jsonable(v) for v in obj]
        return items if all(v is not None for v in items) else None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return None


def memory_block(cache: Any, config: Any) -> dict[str, Any]:
    """The ``memory`` block of a row: the cache's memory report, its pipeline, the scoring work the methods declare
    for the latency model's prefill term, whether any prefill compute is saved, and which parts of the cache are
    fixed-size (``fixed_size``: windows, a token budget, a codec's full-precision residual;
    :mod:`kvcompress.latency.fixed`), so the latency projection carries them as token counts."""
    from .latency.fixed import describe as fixed_size
    from .latency.profile import describe_prefill_saving

    memory = cache.memory_report()
    memory["pipeline"] = [c.describe() for c in cache.compressors] or [BASELINE]
    extra, skips = 0.0, set()
    for comp in cache.compressors:
        cost = comp.prefill_cost(config.get_text_config(), int(memory["context_tokens"]))
        extra += float(cost.get("extra_prefill_flops", 0.0))
        skips.update(cost.get("prefill_skips_kv_layers", ()))
    memory.update({
        "extra_prefill_flops": extra,
        "prefill_skips_kv_layers": sorted(skips),
        "prefill_saving": describe_prefill_saving(skips),
        "fixed_size": fixed_size(cache.compressors).to_dict(),
    })
    return memory


def _git_commit(root: Path | None = None) -> str | None:
    """The commit of the kvcompress checkout this code runs from (``root``: the folder holding the package;
    ``-dirty`` with uncommitted changes to tracked files), or None when it is not a checkout: an installed package
    inside some other git repository (a site-packages folder under a project's checkout) must not report that
    repository's commit."""
    root = root or Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / ".git").exists():
        return None  # installed (non-editable): the package folder is not the top of a kvcompress checkout
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name on Linux, else ``platform.processor()``)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def provenance(seed: int, device: str, threads: int) -> dict[str, Any]:
    return {
        "kvcompress": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} ({os.cpu_count()} cpus)",
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "device": device,
        "threads": threads,
        "seed": seed,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
