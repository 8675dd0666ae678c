"""The base of every declared constraint (:mod:`kvcompress.constraints`): what one config field accepts.

Its own module so that :mod:`kvcompress.constraints` and :mod:`kvcompress.constraints_paths` both import it
without an import cycle."""

from __future__ import annotations

from typing import Any


class Constraint:
    """What one config field accepts. :meth:`problem` returns None when ``value`` is valid, else what would be
    (the text after ``valid:``); a subclass may raise :class:`KVCompressError` itself for a fuller message (what is
    wrong; :func:`~kvcompress.constraints.check_value` puts ``key=value:`` in front)."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        """What is valid, as the text after ``valid:``."""
        raise NotImplementedError
