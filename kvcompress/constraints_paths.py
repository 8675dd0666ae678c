"""Filesystem and device constraints (re-exported by :mod:`kvcompress.constraints`): what can be known up front
about an input path (exists, readable, UTF-8 text), an output path (its folder exists or can be made, it is not a
directory), a model directory (a ``config.json`` transformers can read) and a torch device (present on this machine).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constraint_base import Constraint
from .errors import KVCompressError

__all__ = ["Device", "ExistingPath", "ModelDir", "OutputDir", "OutputFile", "available_devices"]


@dataclass(frozen=True)
class ExistingPath(Constraint):
    """An existing file (``kind="file"``), directory (``"dir"``) or either (``"any"``); ``text``: files must be
    UTF-8 text; ``suffixes``: a directory must hold at least one file with one of them."""

    kind: str = "file"
    text: bool = False
    suffixes: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return self.describe()
        path = Path(value).expanduser()
        if not path.exists():
            raise KVCompressError(f"does not exist; valid: {self.describe()}")
        if self.kind == "file" and not path.is_file() or self.kind == "dir" and not path.is_dir():
            raise KVCompressError(f"is a {'directory' if path.is_dir() else 'file'}; valid: {self.describe()}")
        if path.is_file():
            files = [path]
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in self.suffixes) if self.suffixes else []
        if path.is_dir() and self.suffixes and not files:
            return self.describe()
        for f in files if self.text else []:
            try:
                with open(f, encoding="utf-8") as handle:
                    handle.read(1 << 16)
            except UnicodeDecodeError:
                raise KVCompressError(f"{f} is not UTF-8 text; valid: {self.describe()}") from None
            except OSError as err:
                raise KVCompressError(f"{f} cannot be read ({err.strerror}); valid: {self.describe()}") from None
        return None

    def describe(self) -> str:
        what = {"file": "an existing file", "dir": "an existing directory", "any": "an existing file or directory"}
        text = " of UTF-8 text" if self.text else ""
        holds = f" (a directory: holding {'/'.join(self.suffixes)} files)" if self.suffixes else ""
        return what[self.kind] + text + holds


def _creatable_dir(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a writable directory, else None. Nothing is created."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{str(parent)!r} is a file, not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{str(parent)!r} is not writable"
            return None
    return None


@dataclass(frozen=True)
class OutputFile(Constraint):
    """A file path that can be written (appended to): not a directory, its folder existing or creatable; with
    ``suffixes``, ending in one of them (a figure's format)."""

    suffixes: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return self.describe()
        path = Path(value).expanduser()
        if self.suffixes and path.suffix.lower() not in self.suffixes:
            return self.describe()
        if path.is_dir():
            raise KVCompressError(f"a directory, not a file; valid: {self.describe()}")
        if path.exists() and not os.access(path, os.W_OK):
            raise KVCompressError(f"the file is not writable; valid: {self.describe()}")
        why = _creatable_dir(path.parent)
        if why:
            raise KVCompressError(f"cannot be written ({why}); valid: {self.describe()}")
        return None

    def describe(self) -> str:
        return "a writable file path" + (f" ending in {' | '.join(self.suffixes)}" if self.suffixes else "")


@dataclass(frozen=True)
class OutputDir(Constraint):
    """A directory that exists or can be created, writable."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return self.describe()
        why = _creatable_dir(Path(value).expanduser())
        if why:
            raise KVCompressError(f"cannot be written ({why}); valid: {self.describe()}")
        return None

    def describe(self) -> str:
        return "a writable directory (created if missing)"


@dataclass(frozen=True)
class ModelDir(Constraint):
    """A local model directory whose ``config.json`` is a JSON object naming a ``model_type`` (what
    ``AutoConfig.from_pretrained`` needs before any weight is read)."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return self.describe()
        path = Path(value).expanduser()
        if not path.exists():
            raise KVCompressError(f"does not exist; valid: {self.describe()}")
        if not path.is_dir():
            raise KVCompressError(f"is a file; valid: {self.describe()}")
        config = path / "config.json"
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KVCompressError(f"no config.json in that directory; valid: {self.describe()}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KVCompressError(f"its config.json is unreadable ({str(err).splitlines()[0]}); "
                                  f"valid: {self.describe()}") from None
        if not isinstance(data, dict) or not data.get("model_type"):
            raise KVCompressError(f"its config.json names no model_type; valid: {self.describe()}")
        return None

    def describe(self) -> str:
        return "a local model directory with a config.json (save_pretrained's layout)"


@dataclass(frozen=True)
class Device(Constraint):
    """A torch device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` (N below the GPU count), ``mps``,
    ``xpu``; an integer is a GPU index."""

    def problem(self, value: Any) -> str | None:
        import torch

        if isinstance(value, int) and not isinstance(value, bool):
            value = f"cuda:{value}"
        if not isinstance(value, str):
            return self.describe()
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            return self.describe()
        if device.type == "cpu":
            return None
        backend = getattr(torch, device.type, None)
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        if not available:
            raise KVCompressError(f"not available on this machine (no {device.type} device visible to torch); "
                                  f"valid: {self.describe()}")
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if device.index is not None and device.index >= count:
            raise KVCompressError(f"no such device ({count} {device.type} device(s) visible); "
                                  f"valid: {self.describe()}")
        return None

    def describe(self) -> str:
        return f"a device of this machine ({', '.join(available_devices())})"


def available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and hasattr(backend, "is_available") and backend.is_available():
            count = backend.device_count() if hasattr(backend, "device_count") else 1
            found += [kind] + [f"{kind}:{i}" for i in range(count)] if kind != "mps" else [kind]
    return found
