"""A results JSONL file that concurrent runs cannot block, tear or duplicate.

* **Reading** (:func:`read_rows`) streams the file line by line: a line that is not a readable row (not UTF-8, not
  JSON — the torn last line of a killed run —, not an object, an unknown schema) is skipped, and ONE warning per
  file names every skipped line; nothing else is affected.
* **Claims** (:meth:`ResultsFile.claim`): a run takes an advisory ``flock`` on ``<results>.claims/<key>`` for as long
  as it computes a configuration. A second run of the same configuration (the same sweep started twice, or on
  several machines sharing the folder) sees the claim and skips it; the lock is released by the kernel when the
  holder exits, even killed, so a crashed run never blocks a rerun.
* **The index** ``<results>.keys`` lists the configuration key of every readable row with the byte offset it has
  read the results file up to; the rerun check reads the index and catches up only on bytes appended since (by any
  writer), so its cost does not grow with the results file. A results file that shrank or was replaced is
  re-indexed from the start.
* **Appending** (:meth:`ResultsFile.append`) happens under ``<results>.lock``: one ``write`` of the whole line,
  ``fsync``; a failed write (disk full) truncates the file back to its previous size, so readers never see a partial
  line, and the row is saved to a rescue file whose path the error names.

Locks are POSIX advisory locks (``fcntl.flock``): they coordinate kvcompress processes on one machine and on
network filesystems that support ``flock``; they are skipped, with nothing else changed, where ``fcntl`` does not
exist (Windows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import KVCompressError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: free space below which a run stops before computing (a row with per-sample records is tens of KiB)
MIN_FREE_BYTES = 4 * 2**20


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, end offset, raw line)`` of every complete line from byte ``start`` on (numbers count from
    the file's start only when ``start`` is 0). A last line without its newline is yielded too (a torn line)."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, number = start, 0
        for raw in f:
            number += 1
            offset += len(raw)
            yield number, offset, raw


def parse_line(raw: bytes, validate: Callable[[Any], str | None]) -> tuple[dict[str, Any] | None, str | None]:
    """``(row, None)`` for a readable row, ``(None, problem)`` otherwise; ``(None, None)`` for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 (byte {err.start})"
    if not text.strip():
        return None, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        torn = "" if text.endswith("\n") else "; a torn line from a killed run?"
        return None, f"not JSON ({err.msg} at column {err.colno}{torn})"
    problem = validate(data)
    return (None, problem) if problem else (data, None)


def read_rows(path: str | os.PathLike[str], validate: Callable[[Any], str | None],
              on_error: Callable[[str], None] | None = _warn) -> list[dict[str, Any]]:
    """Every readable row of ``path`` (streamed). Unreadable lines are skipped and reported through ``on_error`` in
    ONE message naming the file and the lines (the first few problems spelled out)."""
    p = Path(path)
    rows: list[dict[str, Any]] = []
    if not p.exists():
        return rows
    bad: list[tuple[int, str]] = []
    for number, _, raw in iter_lines(p):
        data, problem = parse_line(raw, validate)
        if problem:
            bad.append((number, problem))
        elif data is not None:
            rows.append(data)
    if bad and on_error is not None:
        on_error(skipped_message(p, bad))
    return rows


def skipped_message(path: Path, bad: list[tuple[int, str]]) -> str:
    numbers = ", ".join(str(n) for n, _ in bad[:20]) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
    details = "; ".join(f"line {n}: {why}" for n, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return f"{path}: skipped {len(bad)} unreadable line(s) {numbers} ({details})"


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path`` (created if missing); yields False when ``blocking`` is False and
    another process holds it."""
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        yield True
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _append_bytes(path: Path, payload: bytes) -> None:
    """Append ``payload`` (whole lines) to ``path`` in one ``write``, fsynced; on a failed write the file is truncated
    back to its size before (readers never see a partial line) and the ``OSError`` propagates. A torn last line
    left by a killed writer is closed first, so the payload starts on a fresh line."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            payload = b"\n" + payload
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


class ResultsFile:
    """One results file with its lock, claims folder and key index (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], validate: Callable[[Any], str | None],
                 on_error: Callable[[str], None] | None = _warn):
        self.path = Path(path).expanduser()
        self.validate = validate
        self.on_error = on_error
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.index_path = self.path.with_name(self.path.name + ".keys")
        self.claims_dir = self.path.with_name(self.path.name + ".claims")

    # -- before the computation ---------------------------------------------------------------------------------
    def check_writable(self) -> Path:
        """Fail before any computation if rows cannot be appended (nothing in the file is touched): the folder is
        created, the file opened for appending, and at least :data:`MIN_FREE_BYTES` must be free."""
        target = self.path
        blocker = next((a for a in target.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            raise KVCompressError(f"results path {str(target)!r} is not writable ({str(blocker)!r} is a file, not a "
                                  "directory); valid: a writable file path")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise KVCompressError(f"results path {str(target)!r} is not writable ({err.strerror}); valid: a writable "
                                  "file path") from None
        free = shutil.disk_usage(target.parent).free
        if free < MIN_FREE_BYTES:
            raise KVCompressError(f"results path {str(target)!r}: only {free / 2**20:.1f} MiB free on its disk; "
                                  f"valid: at least {MIN_FREE_BYTES // 2**20} MiB free")
        return target

    def finished_keys(self) -> set[str]:
        """The configuration keys of every readable row (from the index, caught up on what was appended since)."""
        with self._locked():
            return self._catch_up()

    def has(self, key: str) -> bool:
        return key in self.finished_keys()

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[str | None]:
        """Claim configuration ``key`` for this process while the block runs. Yields None when the claim is held
        (compute, then :meth:`append`), else why not: ``"finished"`` (a row exists) or ``"running"`` (another process
        holds the claim)."""
        if self.has(key):
            yield "finished"
            return
        try:
            self.claims_dir.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only folder: no claims (the append would fail anyway, reported by check_writable)
            yield None
            return
        claim_path = self.claims_dir / key
        with _flock(claim_path, blocking=False) as held:
            if not held:
                yield "running"
                return
            if self.has(key):  # finished by another process between the check and the claim
                yield "finished"
                return
            try:
                yield None
            finally:
                with contextlib.suppress(OSError):
                    claim_path.unlink()

    # -- after the computation ----------------------------------------------------------------------------------
    def append(self, data: dict[str, Any], default: Callable[[Any], Any] | None = None,
               sidecar: tuple[Path, list[dict[str, Any]]] | None = None) -> None:
        """Append one row as one line, under the file lock: a single ``write``, flushed and fsynced. A failed write
        (disk full) truncates the file back to its size before, saves the row to a rescue file and raises
        :class:`KVCompressError` naming it. A torn last line left by a killed writer stays one unreadable line: the
        new row starts on a fresh line. ``sidecar``: ``(path, records)`` appended (one line each, one write) under the
        same lock right after the row; if that write fails the sidecar is left as it was and a warning says so (the
        row is kept)."""
        line = (json.dumps(data, sort_keys=True, default=default) + "\n").encode("utf-8")
        with self._locked():
            self._catch_up()
            try:
                _append_bytes(self.path, line)
            except OSError as err:
                rescue = self._rescue(line)
                raise KVCompressError(
                    f"could not append the row to {self.path} ({err.strerror or err}); the file is unchanged and "
                    f"the row is saved in {rescue}; valid: free space, then append that line to the results file"
                ) from None
            key = data.get("config_key")
            if isinstance(key, str):
                self._index_append([key], os.path.getsize(self.path))
            if sidecar is not None and sidecar[1]:
                path, records = sidecar
                payload = b"".join((json.dumps(r, sort_keys=True, default=default) + "\n").encode("utf-8")
                                   for r in records)
                try:
                    _append_bytes(path, payload)
                except OSError as err:
                    (self.on_error or _warn)(f"could not append {len(records)} records to {path} "
                                             f"({err.strerror or err}); it is unchanged (the row holds them too)")

    def _rescue(self, line: bytes) -> str:
        for folder in (self.path.parent, Path(tempfile.gettempdir()), Path.home()):
            try:
                handle, name = tempfile.mkstemp(prefix=f"{self.path.name}.rescue-", suffix=".json", dir=folder)
                with os.fdopen(handle, "wb") as f:
                    f.write(line)
                return name
            except OSError:
                continue
        print(line.decode("utf-8"), file=sys.stdout)  # last resort: the row on stdout
        return "stdout (no folder had room)"

    # -- the index ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_flock(self.lock_path))
            except OSError:  # a read-only folder: nothing can be written there, and reading needs no lock
                pass
            yield

    def _read_index(self) -> tuple[set[str], int, int | None]:
        """``(keys, offset read up to, inode of the results file indexed)``; empty when the index is missing or
        unreadable."""
        keys: set[str] = set()
        offset, inode = 0, None
        try:
            with open(self.index_path, encoding="utf-8") as f:
                header = f.readline().split()
                if len(header) != 2 or header[0] != "inode":
                    return set(), 0, None
                inode = int(header[1])
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0] == "offset":
                        offset = int(parts[1])
                    elif len(parts) == 1:
                        keys.add(parts[0])
        except (OSError, ValueError, UnicodeDecodeError):
            return set(), 0, None
        return keys, offset, inode

    def _catch_up(self) -> set[str]:
        """Bring the index up to date with the results file (call under the lock); returns every key."""
        if not self.path.exists():
            return set()
        stat = self.path.stat()
        keys, offset, inode = self._read_index()
        if inode != stat.st_ino or offset > stat.st_size:  # replaced, truncated, edited, or never indexed
            keys, offset = set(), 0
            self._index_reset(stat.st_ino)
        if offset == stat.st_size:
            return keys
        new: list[str] = []
        bad: list[tuple[int, str]] = []
        end = offset
        for number, line_end, raw in iter_lines(self.path, offset):
            if not raw.endswith(b"\n"):
                break  # an incomplete last line: read again once it is complete (or superseded by a new line)
            end = line_end
            data, problem = parse_line(raw, self.validate)
            if data is not None and isinstance(data.get("config_key"), str):
                new.append(data["config_key"])
            elif problem and offset == 0:
                bad.append((number, problem))
        if bad and self.on_error is not None:
            self.on_error(skipped_message(self.path, bad))
        self._index_append(new, end)
        return keys | set(new)

    def _index_reset(self, inode: int) -> None:
        with contextlib.suppress(OSError):
            tmp = self.index_path.with_name(f".{self.index_path.name}.{os.getpid()}.tmp")
            tmp.write_text(f"inode {inode}\n", encoding="utf-8")
            os.replace(tmp, self.index_path)

    def _index_append(self, keys: list[str], offset: int) -> None:
        with contextlib.suppress(OSError):
            if not self.index_path.exists():
                self._index_reset(self.path.stat().st_ino)
            with open(self.index_path, "a", encoding="utf-8") as f:
                f.write("".join(f"{k}\n" for k in keys) + f"offset {offset}\n")

