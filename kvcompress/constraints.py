"""Declared constraints on configuration fields: the one validation mechanism of every CLI and config-taking API.

A tool declares, beside its config, what each field accepts (dotted keys, ``*`` for every key of a mapping)::

    CONSTRAINTS = {"threads": Integer(min=1), "device": Device(), "eval.depths": Optional(ListOf(Number(0, 1)))}

and :func:`check` validates a composed config against it before any work, raising :class:`KVCompressError` with one
line that names the key, the bad value and what is valid: ``threads=0 is invalid; valid: an integer >= 1``.
A constraint only judges one value; rules between fields (a context too short for a template's fixed text) are the
tool's own ``validate``, which runs right after, still before anything expensive.

Filesystem constraints check what can be known up front: an input file exists and is readable (UTF-8 text when it
must be), an output path can be created (its folder exists or can be made, it is not a directory), a model
directory holds a ``config.json`` transformers can read (:mod:`kvcompress.constraints_paths`, re-exported here;
the base class :class:`Constraint` lives in :mod:`kvcompress.constraint_base`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .constraint_base import Constraint
from .constraints_paths import Device, ExistingPath, ModelDir, OutputDir, OutputFile, available_devices
from .errors import KVCompressError, unknown_choice

__all__ = [
    "AnyOf", "Boolean", "Call", "Choice", "Constraint", "Device", "Dict", "ExistingPath", "FileName", "Integer", "ListOf",
    "ModelDir", "Number", "Optional", "OutputDir", "OutputFile", "Text", "available_devices", "check", "check_value",
    "fraction",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer(Constraint):
    """An integer (not a boolean, not ``2.0``) within ``[min, max]``."""

    min: int | None = None
    max: int | None = None

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        return None if ok else self.describe()

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return f"an integer <= {self.max}" if self.max is not None else "an integer"


@dataclass(frozen=True)
class Number(Constraint):
    """A finite real number (not a boolean) within the bounds; ``open_min`` / ``open_max`` exclude them."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def problem(self, value: Any) -> str | None:
        if not _is_number(value) or not math.isfinite(value):
            return self.describe()
        if self.min is not None and (value < self.min or (self.open_min and value == self.min)):
            return self.describe()
        if self.max is not None and (value > self.max or (self.open_max and value == self.max)):
            return self.describe()
        return None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"a number in {'(' if self.open_min else '['}{self.min:g}, {self.max:g}{')' if self.open_max else ']'}"
        if self.min is not None:
            return f"a number {'>' if self.open_min else '>='} {self.min:g}"
        if self.max is not None:
            return f"a number {'<' if self.open_max else '<='} {self.max:g}"
        return "a number"


def fraction(what: str = "a kept fraction") -> Number:
    """A fraction in (0, 1] (a kept ratio)."""
    return _Fraction(0.0, 1.0, open_min=True, what=what)


@dataclass(frozen=True)
class _Fraction(Number):
    what: str = "a kept fraction"

    def describe(self) -> str:
        return f"{self.what} in (0, 1]"


@dataclass(frozen=True)
class Boolean(Constraint):
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else self.describe()

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text(Constraint):
    """A non-empty string (a name, a template)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, str) and value.strip() else self.describe()

    def describe(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class FileName(Constraint):
    """A file's base name: non-empty, no folder separator, not ``.`` or ``..``."""

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, str) and value.strip() and value not in (".", "..")
        return None if ok and "/" not in value and os.sep not in value else self.describe()

    def describe(self) -> str:
        return "a file name without a folder (e.g. methods)"


@dataclass(frozen=True)
class Choice(Constraint):
    """One of ``options`` (an iterable, or a callable returning one: read when checked, e.g. the files of a
    config folder). Reported as ``unknown <key> 'x'; valid choices: a, b``."""

    options: Iterable[Any] | Callable[[], Iterable[Any]]

    def choices(self) -> list[Any]:
        return list(self.options() if callable(self.options) else self.options)

    def problem(self, value: Any) -> str | None:
        try:
            return None if value in self.choices() else self.describe()
        except TypeError:  # unhashable (a list or a mapping given for a name)
            return self.describe()

    def describe(self) -> str:
        return "one of " + ", ".join(sorted(str(c) for c in self.choices()))


@dataclass(frozen=True)
class Optional(Constraint):
    """``null`` or what ``inner`` accepts."""

    inner: Constraint

    def problem(self, value: Any) -> str | None:
        return None if value is None or self.inner.problem(value) is None else self.describe()

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"


@dataclass(frozen=True)
class AnyOf(Constraint):
    """What any of ``options`` accepts."""

    options: tuple[Constraint, ...]

    def problem(self, value: Any) -> str | None:
        specific: KVCompressError | None = None  # an option's own message (a path that does not exist)
        for option in self.options:
            try:
                if option.problem(value) is None:
                    return None
            except KVCompressError as err:
                specific = specific or err
        if specific is not None:
            raise specific
        return self.describe()

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.options)


@dataclass(frozen=True)
class ListOf(Constraint):
    """A list (``min_len`` elements at least) whose every element ``inner`` accepts."""

    inner: Constraint
    min_len: int = 1

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) < self.min_len:
            return self.describe()
        return None if all(self.inner.problem(v) is None for v in value) else self.describe()

    def describe(self) -> str:
        size = "a non-empty list" if self.min_len == 1 else ("a list" if self.min_len == 0 else
                                                              f"a list of >= {self.min_len} elements")
        return f"{size}, each {self.inner.describe()}"


@dataclass(frozen=True)
class Dict(Constraint):
    """A mapping (its entries are checked by ``key.*`` constraints)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, Mapping) else self.describe()

    def describe(self) -> str:
        return "a mapping {key: value}"


@dataclass(frozen=True)
class Call(Constraint):
    """Valid when ``check(value)`` returns without raising :class:`KVCompressError` (whose one-line message is
    then the error): the constraint for values a loader already validates (a hardware preset, an efficiency)."""

    check: Callable[[Any], Any]
    description: str = "a valid value"

    def problem(self, value: Any) -> str | None:
        self.check(value)  # raises its own KVCompressError
        return None

    def describe(self) -> str:
        return self.description




# -- checking ----------------------------------------------------------------------------------------------------
_ABSENT = object()


def _lookup(cfg: Any, dotted: str) -> list[tuple[str, Any]]:
    """``(full key, value)`` of every field ``dotted`` names in ``cfg`` (``*`` matches each key of a mapping);
    fields absent from ``cfg`` are not listed."""
    found: list[tuple[str, Any]] = [("", cfg)]
    for part in dotted.split("."):
        nxt = []
        for prefix, node in found:
            if not isinstance(node, Mapping) and not hasattr(node, "keys"):
                continue
            keys = list(node.keys()) if part == "*" else [part]
            for k in keys:
                value = node.get(k, _ABSENT) if hasattr(node, "get") else _ABSENT
                if value is not _ABSENT:
                    nxt.append((f"{prefix}.{k}" if prefix else str(k), value))
        found = nxt
    return found


def check_value(key: str, value: Any, constraint: Constraint) -> None:
    """Raise :class:`KVCompressError` (one line: the key, the value, what is valid) when ``constraint`` rejects
    ``value``."""
    inner = constraint.inner if isinstance(constraint, Optional) and value is not None else constraint
    if isinstance(inner, Choice):
        if inner.problem(value) is not None:
            raise unknown_choice(key, value, [str(c) for c in inner.choices()])
        return
    if isinstance(inner, ListOf) and isinstance(value, (list, tuple)) and len(value) >= inner.min_len:
        for i, element in enumerate(value):  # name the element that is wrong
            check_value(f"{key}[{i}]", element, inner.inner)
        return
    try:
        problem = constraint.problem(value)
    except KVCompressError as err:  # a constraint's own, fuller message: said of this key
        text = str(err)
        raise KVCompressError(text if text.startswith(f"{key}=") else f"{key}={_show(value)}: {text}") from None
    if problem is not None:
        raise KVCompressError(f"{key}={_show(value)} is invalid; valid: {problem}")


def check(cfg: Any, constraints: Mapping[str, Constraint], prefix: str = "") -> None:
    """Validate every field of ``cfg`` that ``constraints`` names (dotted keys; ``*`` for each key of a mapping);
    ``prefix`` is prepended to the keys in messages (``eval.``). Raises on the first bad value."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    for dotted, constraint in constraints.items():
        for key, value in _lookup(cfg, dotted):
            check_value(prefix + key, value, constraint)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = json.dumps(value, default=str) if isinstance(value, (list, dict, tuple)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."

