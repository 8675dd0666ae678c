"""``paper_tables/fu2024.md`` / ``.tex``: Fu 2024's running example recomputed by :mod:`kvcompress.latency` (the
numbers come from the latency model and ``fu2024_published.yaml``, not from measured rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    from kvcompress.latency.fu2024 import write_tables

    return write_tables(out)
