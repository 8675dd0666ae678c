"""Results files that cannot be blocked or duplicated (kvcompress/results_file.py): bad lines are skipped with one
warning for runs and tables, concurrent runs of one sweep write each configuration once, the rerun check reads an
index instead of the whole file, and a failed append never leaves a partial line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvcompress.results_file as rf
from kvcompress.errors import KVCompressError
from kvcompress.results import _git_commit, append_row, read_rows, results_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny-random", "eval=fidelity", "eval.samples=1", "eval.context=32", "eval.new_tokens=2",
        "print_summary=false"]
#: a 6-configuration sweep
SWEEP = ["-m", "method=streaming,random,knorm", "ratio=0.25,0.5", *FAST]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

#: the lines that used to block every later run: not an object, undecodable bytes, a torn line
BAD_LINES = [b"null\n", b"42\n", b'{"config_key": "x", "method": "\xff\xfe"}\n', b'{"config_key": "torn", "n": ']


def _row(key: str) -> dict:
    return {"config_key": key, "method": "full", "task": "needle"}  # a version-1 row: any dict


def _with_bad_lines(path: Path) -> None:
    with open(path, "ab") as f:
        for line in BAD_LINES:
            f.write(line)


def test_bad_lines_are_skipped_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, _row("a"))
    _with_bad_lines(path)
    append_row(path, _row("b"))  # starts on a fresh line after the torn one
    warnings: list[str] = []
    assert [r["config_key"] for r in read_rows(path, on_error=warnings.append)] == ["a", "b"]
    (message,) = warnings
    assert "skipped 4 unreadable line(s) 2, 3, 4, 5" in message and "not UTF-8" in message
    assert "not a JSON object (a NoneType)" in message and "\n" not in message
    assert results_file(path, on_error=lambda _: None).finished_keys() == {"a", "b"}


def test_runs_and_tables_work_with_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed rows file with a null line, a non-UTF-8 line and a torn line: tables still render, a run still
    appends, and its rerun is skipped."""
    from kvcompress.run import main as run_main
    from kvcompress.tables import main as tables_main

    rows = tmp_path / "methods.jsonl"
    shutil.copy(ROOT / "paper_tables" / "rows" / "methods.jsonl", rows)
    _with_bad_lines(rows)
    before = len(read_rows(rows, on_error=None))
    capsys.readouterr()
    assert tables_main(["methods", f"rows={rows}", f"out={tmp_path}"]) == 0
    assert (tmp_path / "methods.md").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 4 unreadable line(s)" in warnings[0]
    monkeypatch.setattr(sys, "argv", ["kvcompress.run"])
    run = ["method=streaming", "ratio=0.5", *FAST, f"results={rows}"]
    run_main(run)
    assert len(read_rows(rows, on_error=None)) == before + 1
    capsys.readouterr()
    run_main(run)
    assert "skipped: streaming" in capsys.readouterr().out
    assert len(read_rows(rows, on_error=None)) == before + 1


@pytest.mark.parametrize("runs", [2, 3])
def test_concurrent_runs_of_one_sweep_write_each_configuration_once(tmp_path: Path, runs: int) -> None:
    results = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "kvcompress.run", *SWEEP, f"results={results}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
             for _ in range(runs)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    rows = read_rows(results)
    assert len(rows) == 6 and len({r["config_key"] for r in rows}) == 6
    assert sorted((r["method"], r["ratio"]) for r in rows) == sorted(
        (m, r) for m in ("streaming", "random", "knorm") for r in (0.25, 0.5))


def test_a_claim_keeps_a_second_run_off_a_configuration(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    first, second = results_file(path), results_file(path)
    with first.claim("k1") as busy:
        assert busy is None
        with second.claim("k1") as other:
            assert other == "running"  # another open file description: what a second process sees
        with second.claim("k2") as other:
            assert other is None
        first.append(_row("k1"))
    with second.claim("k1") as other:
        assert other == "finished"
    assert not (first.claims_dir / "k1").exists()  # released and removed once the row is in


def test_the_rerun_check_reads_only_what_was_appended_since(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:  # rows written by another tool, without an index
        f.writelines(json.dumps(_row(f"k{i}")) + "\n" for i in range(2000))
    results = results_file(path)
    parsed: list[int] = []
    real = rf.parse_line
    monkeypatch.setattr(rf, "parse_line", lambda raw, validate: parsed.append(1) or real(raw, validate))
    assert len(results.finished_keys()) == 2000 and len(parsed) == 2000  # indexed once
    parsed.clear()
    assert results.has("k1999") and not results.has("k2000") and parsed == []  # then the index answers
    with open(path, "a") as f:
        f.write(json.dumps(_row("k2000")) + "\n")  # appended by a writer that does not keep the index
    assert results.has("k2000") and len(parsed) == 1  # only the new line is read
    results.append(_row("k2001"))
    parsed.clear()
    assert results.has("k2001") and parsed == []
    path.write_text(json.dumps(_row("only")) + "\n")  # shrunk / rewritten: indexed anew
    assert results.finished_keys() == {"only"}


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rows.jsonl"
    append_row(path, _row("a"))
    before = path.read_bytes()
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])  # half the line lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rf.os, "write", disk_full)
    with pytest.raises(KVCompressError) as err:
        append_row(path, _row("b"))
    monkeypatch.setattr(rf.os, "write", real_write)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "the file is unchanged" in message
    assert path.read_bytes() == before  # no partial line for later readers
    rescue = Path(message.split("the row is saved in ")[1].split(";")[0])
    assert json.loads(rescue.read_text())["config_key"] == "b"
    assert results_file(path).finished_keys() == {"a"}


def test_too_little_free_space_is_reported_before_the_computation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rf.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 1024))
    with pytest.raises(KVCompressError, match=r"only 0.0 MiB free on its disk; valid: at least 4 MiB free"):
        results_file(tmp_path / "rows.jsonl").check_writable()


def test_provenance_has_no_commit_outside_a_kvcompress_checkout(tmp_path: Path) -> None:
    """Installed into a folder inside some other git repository, the package reports no commit (not that
    repository's); from this checkout, its own."""
    outer = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    site = outer / "venv" / "site-packages"
    (site / "kvcompress").mkdir(parents=True)
    assert _git_commit(site) is None
    own = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _git_commit(ROOT).startswith(own)
