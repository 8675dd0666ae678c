"""Results rows: the typed row (schema_version), and reading a file with bad lines: one line per problem naming the
file and the line, never a traceback, the other rows still read; rows written before the schema stay readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.results import SCHEMA_VERSION, Row, append_row, read_rows, validate_row


def _row(**changes) -> Row:
    row = Row(config_key="k1", method="streaming", task="needle", model={"name": "testbed"}, config={"seed": 0},
              accuracy={"exact_match": 1.0}, provenance={"seed": 0}, ratio=0.5)
    for key, value in changes.items():
        setattr(row, key, value)
    return row


def test_row_round_trips_with_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, _row())
    (data,) = read_rows(path)
    assert data["schema_version"] == SCHEMA_VERSION == 3
    assert Row.from_dict(data) == _row()
    assert set(data) == {f for f in Row.__dataclass_fields__}


def test_bad_lines_are_skipped_and_named_in_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, _row(config_key="a"))
    legacy = {"config_key": "old", "method": "full", "task": "needle", "memory": {"kept_fraction": 1.0}}
    lines = [
        json.dumps([1, 2]),  # line 2: not an object
        json.dumps({**_row(config_key="v9").to_dict(), "schema_version": 9}),  # line 3: another schema version
        json.dumps({k: v for k, v in _row(config_key="x").to_dict().items() if k != "accuracy"}),  # 4: missing field
        json.dumps({**_row(config_key="y").to_dict(), "ratio": "half"}),  # line 5: mistyped
        json.dumps(legacy),  # line 6: written before the schema (version 1): readable
        '{"config_key": "torn", "n": ',  # line 7: a torn line
    ]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    append_row(path, _row(config_key="b"))
    errors: list[str] = []
    rows = read_rows(path, on_error=errors.append)
    assert [r["config_key"] for r in rows] == ["a", "old", "b"]
    (message,) = errors
    assert "\n" not in message and message.startswith(f"{path}: skipped 5 unreadable line(s) 2, 3, 4, 5, 7 (")
    assert "line 2: not a JSON object" in message and "line 3: schema_version 9" in message
    assert "line 4: " in message and "accuracy" in message
    # from the command line: one `warning:` line on stderr, no traceback
    script = f"from kvcompress.results import read_rows; print(len(read_rows({str(path)!r})))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "3" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"warning: {message}"]


def test_validate_row() -> None:
    assert validate_row(_row().to_dict()) is None
    assert validate_row({"anything": 1}) is None  # version 1: untyped
    assert "unknown field" in validate_row({**_row().to_dict(), "extra": 1})
    assert "schema_version True" in validate_row({**_row().to_dict(), "schema_version": True})
    with pytest.raises(KVCompressError, match="not a results row"):
        Row.from_dict({**_row().to_dict(), "samples": {}})
    assert Row.from_dict({"config_key": "k", "method": "m", "task": "t", "model": {}, "config": {}, "accuracy": {},
                          "provenance": {}}).schema_version == SCHEMA_VERSION
