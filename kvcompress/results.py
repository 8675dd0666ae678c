"""Results rows: one typed record per evaluated configuration (or benchmark measurement), appended to a JSONL file.

:class:`Row` is the one schema every producer writes — ``python -m kvcompress.run``, the sweeps over it and the
benchmarks that back a table (``scripts/quant_memory.py``, ``scripts/rope_check.py``) — and
:mod:`kvcompress.tables` renders every table from. A row carries ``schema_version`` (:data:`SCHEMA_VERSION`);
rows written before the schema existed have no version and are version 1 by definition (untyped dicts, still
readable: they are version 2 rows without ``samples`` / ``timing``).

:func:`read_rows` validates line by line: a line that is not a JSON object (e.g. the torn last line of a killed run),
a row of an unknown schema version, or a version-2 row with missing or mistyped fields is reported as one line on
stderr naming the file and the line, and skipped; every other row is read.
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

#: The version of :class:`Row` this code writes. 1 = the untyped rows written before the schema (no version field).
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Row:
    """One results row.

    * ``config_key``: hash of everything that determines the result (a rerun of the same configuration skips it);
    * ``method`` (``a+b`` for a composition), ``ratio``, ``budget``, ``model`` (``name``, ``constructed``,
      ``random_init``), ``task`` (the evaluation, or a benchmark's measurement), ``query_aware``;
    * ``config``: the full resolved configuration;
    * ``memory``: the memory report of the first sample's cache (``kvcompress.KVCompressCache.memory_report``) with
      the pipeline and the prefill cost the methods declare;
    * ``accuracy``: the task's result block (for a benchmark row: its measured figures);
    * ``latency``: Fu 2024's modelled serving cost (evaluated model, and projected onto the deployment target);
    * ``method_state``: what the methods decided for the first sample (kept layers, reconstruction errors, ...);
    * ``samples``: one record per sample, in sample order: its metadata (length, depth, task, ...), prediction,
      scores, ``kept_fraction``, ``kept_bytes`` and the ``method_state`` entries that differ from the row's;
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
    "samples": (list,), "timing": (dict,), "schema_version": (int,),
}  # fmt: skip
_REQUIRED = tuple(f.name for f in dataclasses.fields(Row) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]


def _version(data: dict[str, Any]) -> Any:
    return data.get("schema_version", 1)


def validate_row(data: Any) -> str | None:
    """Why ``data`` is not a readable row (one line), or None. Version-1 rows (no ``schema_version``) are untyped
    dicts and accepted as they are; version-2 rows must have every required field, no unknown one, and the types
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


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail before any computation if the results file cannot be appended to (nothing in it is touched)."""
    target = Path(path).expanduser()
    blocker = next((a for a in target.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise KVCompressError(f"results path {str(path)!r} is not writable ({str(blocker)!r} is a file, not a "
                              "directory); valid: a writable file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise KVCompressError(f"results path {str(path)!r} is not writable ({err.strerror}); valid: a writable file path") from None
    return target


def append_row(path: str | os.PathLike[str], row: Row | dict[str, Any]) -> None:
    """Append one row as a single ``write`` of one line, flushed and fsynced: a crash leaves earlier rows intact.

    A writer killed mid-``write`` can leave a torn last line without its newline; the new row then starts on a fresh
    line, so the torn line stays one unreadable line (reported and skipped by :func:`read_rows`) and this row stays
    readable."""
    data = row.to_dict() if isinstance(row, Row) else row
    line = (json.dumps(data, sort_keys=True, default=_json_default) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # append mode: the write goes to the end whatever the read position
        f.flush()
        os.fsync(f.fileno())


def _report(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def read_rows(path: str | os.PathLike[str], on_error: Callable[[str], None] | None = _report) -> list[dict[str, Any]]:
    """Rows of a results file, as dicts. A line that is not a readable row is reported through ``on_error`` (one
    line naming the file and the line; default: ``error: ...`` on stderr) and skipped; the others are read.
    Blank lines are ignored; a missing file has no rows."""
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return rows
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            problem: str | None = f"not JSON ({err.msg} at column {err.colno}; a torn line from a killed run?)"
        else:
            problem = validate_row(data)
        if problem:
            if on_error is not None:
                on_error(f"{p}, line {number}: {problem}; line skipped")
            continue
        rows.append(data)
    return rows


def _json_default(obj: Any) -> Any:
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
    for the latency model's prefill term, and whether any prefill compute is saved."""
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
    })
    return memory


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
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
