"""A results store for long sweeps: one JSON record per line, appended as each finishes.

An interrupted sweep leaves at most one cut line (no trailing newline);
:func:`load_records` skips it, so that measurement is redone, and
:func:`append_record` starts the next record on a line of its own.
:func:`rewrite_records` replaces the whole store (a resumed run dropping the
records past its saved state, a compaction) through a temporary file and
``os.replace``: an interruption leaves either the old file or the new one,
never a mix. :func:`atomic_path` and :func:`write_atomic` do the same for any
other result file.

Several processes may append to the same file at once (the drivers of disjoint
sweeps, or a parallel sweep's driver next to another): each append holds an
exclusive ``flock`` on the file while it checks for a cut line and writes its
record in one call, and each load holds a shared one, so records never
interleave and a reader never sees half of a record still being written. A
rewrite holds the exclusive lock while it replaces the file, and an append that
waited for it finds the file replaced and appends to the new one. The lock is
advisory, POSIX only (elsewhere appends go unlocked), and on network file
systems only as good as their ``flock``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; single-writer use stays safe
    fcntl = None

__all__ = ["append_record", "atomic_path", "load_records", "rewrite_records", "write_atomic"]

_COUNTER = itertools.count()
_COUNTER_LOCK = threading.Lock()


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and call, same suffix."""
    with _COUNTER_LOCK:
        n = next(_COUNTER)
    return path.with_name(f".{path.name}.{os.getpid()}-{n}.tmp{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to, moved onto ``path`` on success.

    The temporary file sits beside ``path`` (same folder, same suffix, so a
    writer that picks its format from the name still works). When the block
    ends normally it is flushed to disk and ``os.replace``-d onto ``path``; when
    it raises, it is removed and ``path`` is left as it was. A hard kill may
    leave the hidden temporary file behind, never a half-written ``path``.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        if tmp.exists():
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def _same_file(f, path: Path) -> bool:
    """Whether the open file ``f`` is still what ``path`` names (no rewrite replaced it)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _line(record: dict[str, Any]) -> str:
    """One record as its line of the store."""
    return json.dumps(record) + "\n"


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing).

    Safe under concurrent writers: the whole check-and-write happens under an
    exclusive lock on the file, released only after the line is flushed.
    """
    line = _line(record)
    path = Path(path)
    while True:
        with path.open("a+b") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if fcntl is not None and not _same_file(f, path):
                    continue  # a rewrite replaced the file while we waited: append to the new one
                f.seek(0, 2)
                cut = False
                if f.tell() > 0:
                    f.seek(-1, 2)
                    cut = f.read(1) != b"\n"
                f.write((("\n" if cut else "") + line).encode())
                f.flush()
                return
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)


def _parse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption: redone by the sweep
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record in ``path`` (none if it does not exist), in file order."""
    path = Path(path)
    for _ in range(100):
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return []
        with f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_SH)  # no append is half-written while we read
            try:
                if fcntl is not None and not _same_file(f, path):
                    continue  # replaced by a rewrite while we waited: read the new file
                return _parse(f.read().decode())
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)
    raise OSError(f"{path} keeps being replaced; cannot read it")


def rewrite_records(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by exactly ``records``, one JSON line each, atomically.

    The new content goes to a temporary file which then replaces ``path``
    (``os.replace``): an interruption at any point leaves the old file whole.
    Appends wait for the rewrite (it holds the file's exclusive lock) and then
    go to the new file.
    """
    path = Path(path)
    held = None
    try:
        if fcntl is not None and path.exists():
            held = path.open("rb")
            fcntl.flock(held, fcntl.LOCK_EX)
        with atomic_path(path) as tmp, tmp.open("w") as f:
            for record in records:
                f.write(_line(record))
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
