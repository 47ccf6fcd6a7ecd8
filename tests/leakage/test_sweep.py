"""Parallel sweeps (leakage.app.sweep): resume, skipped cells, and the same records on any number
of workers, serially, in a process pool or on Ray; the benchmark scripts' flags."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leakage.app.store import load_records
from leakage.app.sweep import ScriptFunction, load_script, run_cells

_ROOT = Path(__file__).resolve().parents[2]
_HERE = str(Path(__file__).resolve())

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _cell(cell, *, stop_at=None, error=KeyboardInterrupt):
    """A stand-in cell: a seeded chain of matrix products (its rounding depends on the torch
    threads); ``"bad"`` raises ValueError, ``stop_at`` raises ``error`` (an interruption)."""
    if cell == "bad":
        raise ValueError("bad cell: give a number\nsecond line")
    if cell == stop_at:
        raise error()
    g = torch.Generator().manual_seed(cell)
    w = torch.randn(96, 96, generator=g) / 10
    x = torch.randn(96, 32, generator=g)
    for _ in range(20):
        x = torch.tanh(w @ x)  # (96, 32)
    return {"cell": cell, "sum": float(x.sum()), "norm": float(x.norm()),
            "threads": torch.get_num_threads()}  # fmt: skip


def _slow_cell(cell, *, marker):
    """Cells 0 and 1 finish at once; the others stay in flight until the driver is killed."""
    if cell >= 2:
        time.sleep(120)
    return {"cell": cell, "run": marker}


def _key(record):
    return record["cell"]


CELLS = [0, 1, 2, "bad", 3, 4, 5]


def _serial(store, **options):
    return run_cells(CELLS, ScriptFunction(_HERE, "_cell"), store=store, key=_key, **options)


def test_serial_sweep_stores_skips_bad_cells_and_resumes(tmp_path, caplog):
    store = tmp_path / "cells.jsonl"
    done = _serial(store)
    assert [r["cell"] for r in done] == [0, 1, 2, 3, 4, 5]  # in order, "bad" skipped
    assert load_records(store) == done and {r["threads"] for r in done} == {1}
    skips = [r.getMessage() for r in caplog.records if r.name == "leakage.app.sweep"]
    assert skips == ["skip bad: bad cell: give a number"]  # one line, the first of the message
    ran = []
    run_cells(CELLS, lambda c: ran.append(c) or _cell(c), store=store, key=_key)
    assert ran == ["bad"]  # a finished cell is never redone; a skipped one is retried


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_an_interrupted_sweep_resumes_with_only_the_missing_cells(tmp_path, error):
    store = tmp_path / "cells.jsonl"
    fn = functools.partial(_cell, stop_at=3, error=error)
    with pytest.raises(error):
        run_cells(range(6), fn, store=store, key=_key)
    assert [r["cell"] for r in load_records(store)] == [0, 1, 2]  # stored before the stop
    ran = []
    run_cells(range(6), lambda c: ran.append(c) or _cell(c), store=store, key=_key)
    assert ran == [3, 4, 5]
    assert [r["cell"] for r in load_records(store)] == list(range(6))


def test_process_pool_gives_the_serial_records(tmp_path, caplog):
    serial = _serial(tmp_path / "serial.jsonl", threads=2)
    assert {r["threads"] for r in serial} == {2} and torch.get_num_threads() == 1  # restored
    store = tmp_path / "pool.jsonl"
    pool = run_cells(CELLS, ScriptFunction(_HERE, "_cell"), store=store, key=_key, workers=2,
                     backend="process", threads=2)  # fmt: skip
    assert sorted(pool, key=_key) == serial  # bit-identical: same threads, same seeds
    assert sorted(load_records(store), key=_key) == serial
    assert [r.getMessage() for r in caplog.records if r.name == "leakage.app.sweep"] == [
        "skip bad: bad cell: give a number"
    ] * 2


def test_a_killed_parallel_driver_loses_only_the_cells_in_flight(tmp_path):
    store = tmp_path / "cells.jsonl"
    driver = (
        "import functools\n"
        "from leakage.app.sweep import ScriptFunction, run_cells\n"
        f"fn = functools.partial(ScriptFunction({_HERE!r}, '_slow_cell'), marker='first')\n"
        f"run_cells(range(6), fn, store={str(store)!r}, key=lambda r: r['cell'], workers=2,\n"
        "          backend='process')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=_ROOT, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(load_records(store)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the fast cells did not finish"
            time.sleep(0.2)
        time.sleep(0.5)  # cells 2 and 3 are in flight now
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as `kill -9` would
        proc.wait()
    assert sorted(_key(r) for r in load_records(store)) == [0, 1]
    ran = []
    run_cells(range(6), lambda c: ran.append(c) or {"cell": c, "run": "second"}, store=store,
              key=_key)  # fmt: skip
    assert ran == [2, 3, 4, 5]
    assert sorted((r["cell"], r["run"]) for r in load_records(store)) == [
        (0, "first"), (1, "first"), (2, "second"), (3, "second"), (4, "second"), (5, "second"),
    ]  # fmt: skip


@pytest.mark.filterwarnings("ignore::FutureWarning")  # Ray's tip on GPU visibility
def test_ray_gives_the_serial_records_and_stores_before_an_error(tmp_path, caplog):
    ray = pytest.importorskip("ray", reason="Ray is not installed: the process pool stands in")
    serial = _serial(tmp_path / "serial.jsonl")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        store = tmp_path / "ray.jsonl"
        got = run_cells(CELLS, ScriptFunction(_HERE, "_cell"), store=store, key=_key, workers=2,
                        backend="ray")  # fmt: skip
        assert ray.is_initialized()  # the caller's instance is left running
        assert sorted(got, key=_key) == serial
        assert sorted(load_records(store), key=_key) == serial
        assert "skip bad: bad cell: give a number" in [r.getMessage() for r in caplog.records]
        store = tmp_path / "error.jsonl"
        fn = functools.partial(ScriptFunction(_HERE, "_cell"), stop_at=2, error=RuntimeError)
        with pytest.raises(RuntimeError):  # not a ValueError: the sweep stops
            run_cells(range(6), fn, store=store, key=_key, workers=2, backend="ray")
        stored = {_key(r) for r in load_records(store)}  # 2 went out once 0 or 1 was stored
        assert stored & {0, 1} and 2 not in stored
    finally:
        ray.shutdown()


def test_bad_options_say_what_to_fix(tmp_path):
    for options, match in [
        ({"workers": 0}, "positive integer"),
        ({"backend": "dask"}, "valid: auto, ray, process"),
        ({"workers": 2, "backend": "process", "ray_address": "head:6379"}, "backend 'ray'"),
        ({"threads": 0}, "positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_cells([0], _cell, store=tmp_path / "s.jsonl", key=_key, **options)
    with pytest.raises(ValueError, match="key"):
        run_cells([0], _cell, store=tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="must give back the cell"):
        run_cells([0], lambda c: {"cell": 7}, store=tmp_path / "s.jsonl", key=_key)


@pytest.mark.parametrize("script", ["attack_suite", "privacy_utility", "reproduction"])
def test_scripts_take_the_parallel_flags(script, tmp_path, capsys):
    module = load_script(_ROOT / "benchmarks" / f"{script}.py")
    out = ["--out", str(tmp_path / "out")] + (
        ["--report-file", str(tmp_path / "R.md"), "--experiments", "fedavg"]
        if script == "reproduction"
        else []
    )
    with pytest.raises(SystemExit):
        module.main([*out, "--workers", "0"])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # parsed and handed to run_cells, which refuses them
        module.main([*out, "--workers", "2", "--threads", "1", "--backend", "process",
                     "--ray-address", "head:6379"])  # fmt: skip
    assert "a Ray address needs backend 'ray' or 'auto'" in capsys.readouterr().err


def test_attack_suite_with_two_workers_writes_the_same_cells(tmp_path, capsys):
    suite = load_script(_ROOT / "benchmarks" / "attack_suite.py")
    tiny = ["--datasets", "samples", "--batch-sizes", "1", "--threats", "fedsgd",
            "--victims", "lenet-sigmoid", "mlp-relu", "--attacks", "idlg", "analytic"]  # fmt: skip
    cells = {}
    for workers in ("1", "2"):
        out = tmp_path / workers
        assert suite.main([*tiny, "--out", str(out), "--workers", workers,
                           "--backend", "process"]) == 0  # fmt: skip
        assert "[1/2]" in capsys.readouterr().out
        records = load_records(out / "cells.jsonl")
        cells[workers] = sorted(({k: v for k, v in r.items() if k != "seconds"} for r in records),
                                key=suite.key)  # fmt: skip
        assert (out / "table.md").exists() and (out / "grid-samples.png").exists()
    assert len(cells["1"]) == 2 and cells["2"] == cells["1"]  # PSNR, loss, labels: bit-equal


def test_a_sweep_killed_at_random_points_resumes_to_the_same_records(tmp_path, monkeypatch):
    """Seeded kill points, each in a cell or in the middle of writing a record (a cut line):
    the resumed sweep ends with every cell's record exactly once, as an uninterrupted one."""
    import leakage.app.sweep

    cells = list(range(8))
    straight = run_cells(cells, _cell, store=tmp_path / "straight.jsonl", key=_key)
    store = tmp_path / "killed.jsonl"
    rng = random.Random(11)
    real_append = leakage.app.sweep.append_record
    kills = 0
    for _ in range(5):
        stored = {_key(r) for r in load_records(store)}
        victim = rng.choice([c for c in cells if c not in stored])  # a cell this try reaches
        where = rng.choice(["cell", "write"])

        def torn(path, record, _victim=victim):
            if record["cell"] == _victim:  # dies with half of the line on disk
                with open(path, "a") as f:
                    f.write(json.dumps(record)[: rng.randrange(1, 20)])
                raise KeyboardInterrupt
            real_append(path, record)

        fn = functools.partial(_cell, stop_at=victim) if where == "cell" else _cell
        with monkeypatch.context() as m:
            if where == "write":
                m.setattr(leakage.app.sweep, "append_record", torn)
            try:
                run_cells(cells, fn, store=store, key=_key)
            except KeyboardInterrupt:
                kills += 1
    assert kills == 5
    run_cells(cells, _cell, store=store, key=_key)
    assert sorted(load_records(store), key=_key) == straight  # each cell once, none torn
