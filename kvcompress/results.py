"""Results rows: one JSON object per evaluated configuration, appended to a JSONL file, with provenance."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers

from . import __version__
from .errors import KVCompressError


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


def append_row(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one row as a single ``write`` of one line, flushed and fsynced: a crash leaves earlier rows intact.

    A writer killed mid-``write`` can leave a torn last line without its newline; the new row then starts on a fresh
    line, so the torn line stays one unreadable line (skipped by :func:`read_rows`) and this row stays readable."""
    line = (json.dumps(row, sort_keys=True, default=_json_default) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # append mode: the write goes to the end whatever the read position
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a results file; a torn last line (a killed run) is skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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


def provenance(seed: int, device: str, threads: int) -> dict[str, Any]:
    return {
        "kvcompress": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} ({os.cpu_count()} cpus)",
        "device": device,
        "threads": threads,
        "seed": seed,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
