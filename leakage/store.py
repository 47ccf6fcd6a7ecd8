"""A results store for long sweeps: one JSON record per line, appended as each finishes.

An interrupted sweep leaves at most one cut line (no trailing newline);
:func:`load_records` skips it, so that measurement is redone, and
:func:`append_record` starts the next record on a line of its own.

Several processes may append to the same file at once (the drivers of disjoint
sweeps, or a parallel sweep's driver next to another): each append holds an
exclusive ``flock`` on the file while it checks for a cut line and writes its
record in one call, and each load holds a shared one, so records never
interleave and a reader never sees half of a record still being written. The
lock is advisory, POSIX only (elsewhere appends go unlocked), and on network
file systems only as good as their ``flock``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; single-writer use stays safe
    fcntl = None

__all__ = ["append_record", "load_records"]


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing).

    Safe under concurrent writers: the whole check-and-write happens under an
    exclusive lock on the file, released only after the line is flushed.
    """
    line = json.dumps(record) + "\n"
    with Path(path).open("a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0, 2)
            cut = False
            if f.tell() > 0:
                f.seek(-1, 2)
                cut = f.read(1) != b"\n"
            f.write((("\n" if cut else "") + line).encode())
            f.flush()
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record in ``path`` (none if it does not exist), in file order."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open("rb") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_SH)  # no append is half-written while we read
        try:
            text = f.read().decode()
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: redone by the sweep
            continue
    return out
