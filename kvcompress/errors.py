"""One error type for every bad input, with one-line messages that name the bad value and the valid choices."""

from __future__ import annotations

from collections.abc import Iterable


class KVCompressError(ValueError):
    """A bad input to kvcompress. The message is one line: what was wrong, and what would be valid."""


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> KVCompressError:
    """``unknown method 'foo'; valid choices: full, random, streaming``."""
    listed = ", ".join(sorted(str(c) for c in choices)) or "(none)"
    return KVCompressError(f"unknown {what} {value!r}; valid choices: {listed}")


def check_ratio(value: object, name: str = "ratio") -> float:
    """A kept fraction: a real number in (0, 1]. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise KVCompressError(f"{name}={value!r} is not a number; valid: a kept fraction in (0, 1]") from None
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise KVCompressError(f"{name}={value!r} is out of range; valid: a kept fraction in (0, 1]")
    return value


def check_non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KVCompressError(f"{name}={value!r} is invalid; valid: an integer >= 0")
    return value


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KVCompressError(f"{name}={value!r} is invalid; valid: an integer >= 1")
    return value
