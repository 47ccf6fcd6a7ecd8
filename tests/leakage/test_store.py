"""The sweeps' results store: records survive an interruption, only a cut line is lost,
concurrent writers neither interleave nor lose records, and rewrites are atomic."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import leakage.app.store
from leakage.app.store import (
    append_record,
    atomic_path,
    load_records,
    rewrite_records,
    write_atomic,
)

try:
    import fcntl
except ImportError:
    fcntl = None

_STORE = Path(leakage.app.store.__file__)


def test_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "records.jsonl"
    assert load_records(path) == []
    append_record(path, {"a": 1, "psnr": 12.5})
    append_record(path, {"a": 2, "labels": [1, 2]})
    assert load_records(path) == [{"a": 1, "psnr": 12.5}, {"a": 2, "labels": [1, 2]}]


def test_a_cut_line_is_skipped_and_the_next_record_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"a": 2, "ps')  # interrupted mid-write: no newline
    append_record(path, {"a": 3})
    assert load_records(path) == [{"a": 1}, {"a": 3}]
    assert path.read_text().splitlines()[-1] == '{"a": 3}'


_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("store", sys.argv[1])
store = importlib.util.module_from_spec(spec)
spec.loader.exec_module(store)  # the module alone: no torch to import, so the writers overlap
path, writer, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    store.append_record(path, {"writer": writer, "i": i, "pad": "x" * ((i * 7919) % 20000)})
"""


def test_concurrent_writers_leave_every_record_intact(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"cut": tr')  # an earlier interruption: one cut line, repaired once
    writers, n = 4, 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(_STORE), str(path), str(w), str(n)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    records = load_records(path)
    assert sorted((r["writer"], r["i"]) for r in records) == [
        (w, i) for w in range(writers) for i in range(n)
    ]  # each exactly once, none torn: a torn line would not parse and go missing
    assert all(r["pad"] == "x" * ((r["i"] * 7919) % 20000) for r in records)
    lines = path.read_text().splitlines()
    assert lines[0] == '{"cut": tr' and len([x for x in lines if x]) == writers * n + 1


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX only")
def test_an_append_waits_for_a_held_lock(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, {"a": 1})
    with path.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another writer in the middle of its append
        writer = threading.Thread(target=append_record, args=(path, {"a": 2}))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and path.read_text() == '{"a": 1}\n'  # it waits its turn
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(10)
    assert load_records(path) == [{"a": 1}, {"a": 2}]


def test_an_interrupted_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    for i in range(3):
        append_record(path, {"a": i})
    before = path.read_bytes()
    calls = []
    real = leakage.app.store._line

    def dies_on_the_second_line(record):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the rewrite
        return real(record)

    monkeypatch.setattr(leakage.app.store, "_line", dies_on_the_second_line)
    with pytest.raises(KeyboardInterrupt):
        rewrite_records(path, [{"a": 0}, {"a": 1}])
    assert len(calls) == 2 and path.read_bytes() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]  # no temporary left
    monkeypatch.undo()
    rewrite_records(path, [{"a": 0}, {"a": 1}])
    assert load_records(path) == [{"a": 0}, {"a": 1}]


def test_a_failed_replace_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomic(path, "old\n")

    def fails(*_):
        raise OSError("disk full")

    monkeypatch.setattr(leakage.app.store.os, "replace", fails)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new\n")
    with pytest.raises(OSError, match="disk full"):
        rewrite_records(path, [{"a": 1}])
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_path_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    with atomic_path(tmp_path / "figure.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and not tmp.exists()
        tmp.write_bytes(b"png")
    assert (tmp_path / "figure.png").read_bytes() == b"png"


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX only")
def test_an_append_waiting_for_a_rewrite_lands_in_the_new_file(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, {"a": 1})
    with path.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a rewrite in progress holds the old file's lock
        writer = threading.Thread(target=append_record, args=(path, {"a": 2}))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()
        new = tmp_path / "new.jsonl"
        new.write_text('{"a": 0}\n')
        os.replace(new, path)  # the rewrite lands
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(10)
    assert load_records(path) == [{"a": 0}, {"a": 2}]  # not lost in the replaced file
