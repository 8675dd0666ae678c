"""The method registry: methods register by name, and every module under :mod:`kvcompress.methods` is discovered.

A method's axis is the folder it lives in (``methods/layer/``, ``head/``, ``token/``, ``hidden/``; the baseline
``full`` at the top has none): :func:`discover` imports every module there once and checks that each registered
class declares its folder's axis. Methods registered from a user's own module (``@register`` on import) are used
the same way, wherever the module lives; the CLIs find them as plugins (:func:`load_plugins`):

* ``method=mypkg.mymod:MyMethod`` (a ``Compressor`` dataclass; registered under its ``name`` on first use);
* modules named in ``$KVCOMPRESS_PLUGINS`` (comma-separated), imported by :func:`discover`;
* the entry-point group ``kvcompress.methods`` of installed distributions (``[project.entry-points."kvcompress.methods"]
  mine = "mypkg.mymod"``), imported by :func:`discover`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
from importlib.metadata import entry_points
from typing import Any

from .compressor import Axis, Compressor
from .errors import KVCompressError, check_ratio_or_budget, unknown_choice

REGISTRY: dict[str, type[Compressor]] = {}
#: the uncompressed baseline's name (``methods/full.py``), for runners that need a default
BASELINE = "full"
#: fields every runner sets itself (top-level ``ratio=`` / ``budget=``), left out of a method's own configuration
SIZE_FIELDS = ("ratio", "budget")
#: entry-point group and environment variable naming modules that register methods (plugins)
PLUGIN_GROUP, PLUGIN_ENV = "kvcompress.methods", "KVCOMPRESS_PLUGINS"
#: ``module:Class`` — a method class given by where it lives
REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_discovered = False


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a method available by its ``name`` (CLI, ``compress()``, the shared test matrix)."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice ({REGISTRY[cls.name].__qualname__})")
    REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import every module under :mod:`kvcompress.methods` (once) and check each method's axis against its folder."""
    global _discovered
    if _discovered:
        return
    import kvcompress.methods as root

    for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
    _discovered = True
    load_plugins()
    for cls in REGISTRY.values():
        check_axis(cls)


def _import(module: str, source: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of a user's module is one line naming it
        raise KVCompressError(f"plugin module {module!r} ({source}) cannot be imported ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); valid: an importable module on "
                              "sys.path / PYTHONPATH that registers methods with @kvcompress.register") from None


def load_plugins() -> None:
    """Import the modules of the ``kvcompress.methods`` entry points and of ``$KVCOMPRESS_PLUGINS``: their
    ``@register`` classes become methods like the built-in ones."""
    for point in entry_points(group=PLUGIN_GROUP):
        _import(point.value.partition(":")[0], f"entry point {point.name!r}")
    for module in os.environ.get(PLUGIN_ENV, "").split(","):
        if module.strip():
            _import(module.strip(), f"${PLUGIN_ENV}")


def resolve_reference(reference: str) -> str:
    """``"mypkg.mymod:MyMethod"`` → the method's registered name (the class is registered on first use)."""
    discover()
    module, _, attr = reference.partition(":")
    cls = getattr(_import(module, f"method={reference}"), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Compressor) and dataclasses.is_dataclass(cls) and cls.name):
        raise KVCompressError(f"method={reference!r}: {module} has no method class {attr!r}; valid: a Compressor "
                              "dataclass with a `name` (see kvcompress.compressor)")
    if REGISTRY.get(cls.name) is not cls:
        register(cls)
    return cls.name


def resolve_references(text: str) -> str:
    """Every ``module:Class`` in ``text`` (a ``method=`` value: ``snapkv+mymod:Mine``) replaced by its name."""
    return REFERENCE.sub(lambda m: resolve_reference(m.group(0)), text)


def check_axis(cls: type[Compressor]) -> None:
    """A built-in method's axis must be its folder's (``kvcompress.methods.<axis>.<module>``; none at the top)."""
    parts = cls.__module__.split(".")
    if parts[:2] != ["kvcompress", "methods"]:
        return  # a user's method: no folder convention
    folder = parts[2] if len(parts) > 3 else None
    expected = Axis(folder) if folder is not None else None
    if cls.axis is not expected:
        raise TypeError(f"{cls.__qualname__} ({cls.__module__}) declares axis {cls.axis} but lives in the "
                        f"{folder or 'top'} folder of kvcompress.methods")


def available_methods() -> list[str]:
    discover()
    return sorted(REGISTRY)


def get_method(name: str) -> type[Compressor]:
    discover()
    if REFERENCE.fullmatch(name):
        name = resolve_reference(name)
    if name not in REGISTRY:
        raise unknown_choice("method", name, REGISTRY)
    return REGISTRY[name]


def method_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_method(name))}


def method_defaults(name: str) -> dict[str, Any]:
    """A method's own parameters and their defaults (its dataclass fields, ``ratio``/``budget`` aside): what the run
    CLI offers as ``method.<name>.<param>`` — generated, never copied by hand."""
    out = {}
    for f in dataclasses.fields(get_method(name)):
        if f.name in SIZE_FIELDS or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def make_compressor(name: str, **params: Any) -> Compressor:
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise KVCompressError(f"unknown parameter {unknown[0]!r} for method {name!r}; valid: {valid}")
    check_ratio_or_budget(params.get("ratio"), params.get("budget"), name)
    return cls(**params)


AXIS_ROWS = ("layer", "head", "token", "hidden", None)


def method_table() -> str:
    """The README's method table, generated from the registry: one row per method (axis, name, what it keeps, paper,
    its own parameters' defaults), axes in composition order."""
    rows = ["| axis | method | what it keeps | paper | defaults |", "|---|---|---|---|---|"]
    order = {axis: i for i, axis in enumerate(AXIS_ROWS)}
    methods = sorted(available_methods(), key=lambda n: (order[_axis_name(n)] if _axis_name(n) else -1, n))
    for name in methods:
        cls = get_method(name)
        sizes = [f for f in SIZE_FIELDS if f in method_fields(name)]
        defaults = ", ".join([f"`{k}={v}`" for k, v in method_defaults(name).items()] or ["—"])
        axis = _axis_name(name) or "—"
        rows.append(f"| {axis} | `{name}`{' (' + ' / '.join(sizes) + ')' if sizes else ''} | {cls.summary or '—'} | "
                    f"{cls.paper or '—'} | {defaults} |")
    return "\n".join(rows)


def _axis_name(name: str) -> str | None:
    axis = get_method(name).axis
    return axis.value if axis is not None else None


README_START = "<!-- methods-table: generated from the registry by `python -m kvcompress.methods readme`; a test keeps it in sync -->"
README_END = "<!-- /methods-table -->"


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the block between the method-table markers replaced by :func:`method_table`."""
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n" + method_table() + "\n" + text[end:]

