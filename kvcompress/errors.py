"""One error type for every bad input, with one-line messages that name the bad value and the valid choices."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class KVCompressError(ValueError):
    """A bad input to kvcompress. The message is one line: what was wrong, and what would be valid."""


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> KVCompressError:
    """``unknown method 'foo'; valid choices: full, random, streaming``."""
    listed = ", ".join(sorted(str(c) for c in choices)) or "(none)"
    return KVCompressError(f"unknown {what} {value!r}; valid choices: {listed}")


def check_ratio(value: object, name: str = "ratio") -> float:
    """A kept fraction: a real number in (0, 1]. Returns it as a float."""
    if isinstance(value, bool):
        raise KVCompressError(f"{name}={value!r} is a boolean, not a number; valid: a kept fraction in (0, 1]")
    if not isinstance(value, (int, float)):
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


def check_ratio_or_budget(ratio: float | None, budget: int | None, method: str | None = None) -> None:
    """``ratio`` (fraction kept) and ``budget`` (tokens kept) are alternatives: giving both explicitly is an error,
    never a silent choice (a results row would record the ratio while the budget decided what was kept)."""
    if ratio is not None and budget is not None:
        where = f" for method {method!r}" if method else ""
        raise KVCompressError(
            f"ratio={ratio!r} and budget={budget!r} are both given{where}; "
            "valid: one of them, ratio (fraction kept) or budget (tokens kept)"
        )


def check_budget_fields(comp: Any) -> None:
    """The same rule for a constructed compressor, where an unset ratio reads as its default 1.0: a budget together
    with any other ratio is rejected."""
    ratio = getattr(comp, "ratio", 1.0)
    check_ratio_or_budget(None if ratio == 1.0 else ratio, getattr(comp, "budget", None), comp.name)
