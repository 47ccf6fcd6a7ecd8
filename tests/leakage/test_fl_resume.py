"""``leakage fl`` resumes to the numbers of an uninterrupted run: carried client state (a lazy
worker's remembered update) and stateful defenses survive a resume, on either engine and across
a switch between them; rewrites are atomic; state.pt holds only tensors and plain data; a run
killed at random points resumes to the same records."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random

import pytest
import torch

import fl_core.server
import leakage.app.fl_cmd
import leakage.app.store
from leakage.app.cli import main
from leakage.app.fl_cmd import load_fl_config, run_fl
from leakage.app.store import load_records

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = {  # the embedded photographs, a tiny LeNet: about a second a round
    "dataset": "samples",
    "model": "lenet",
    "num_clients": 3,
    "rounds": 3,
    "algorithm": "fedavg",
    "local_steps": 2,
    "batch_size": 2,
    "lr": 0.05,
    "seed": 3,
}
# client 1 trains honestly in round 0, then resends that update in every later round: a
# resume that forgot it would compute a fresh update in round 1 or 2 instead
LAZY = {"enable": True, "type": "lazy", "mode": "stale", "ids": [1], "rounds": [1, None]}
HAVE_FLOWER = importlib.util.find_spec("flwr") is not None


def _run(out, **overrides):
    return run_fl(load_fl_config(None, **{**TINY, **overrides, "out": str(out)}))


def _numbers(records):
    """The records without their timing."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _weights(out):
    state = torch.load(out / "state.pt", weights_only=True)["model"]
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def _same_run(a, b, tol=0.0):
    assert _numbers(load_records(a / "rounds.jsonl")) == _numbers(load_records(b / "rounds.jsonl"))
    assert float((_weights(a) - _weights(b)).abs().max()) <= tol


def test_a_lazy_worker_resumes_to_the_uninterrupted_run(tmp_path):
    straight = _numbers(_run(tmp_path / "a", attack_args=LAZY))
    _run(tmp_path / "b", attack_args=LAZY, rounds=1)  # state saved after round 0's update
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert 1 in state["clients"]  # the remembered update is in the run's state
    assert _numbers(_run(tmp_path / "b", attack_args=LAZY)) == straight
    _same_run(tmp_path / "a", tmp_path / "b")
    # and it mattered: forgetting the remembered update changes the run
    state["clients"] = {}
    _run(tmp_path / "c", attack_args=LAZY, rounds=1)
    torch.save(state, tmp_path / "c" / "state.pt")
    _run(tmp_path / "c", attack_args=LAZY)
    assert float((_weights(tmp_path / "a") - _weights(tmp_path / "c")).abs().max()) > 1e-4


# Two lazy workers, two of four clients a round (seed 2 samples {1, 3}, {0, 1}, {2, 3}, {1, 2}):
# client 1 remembers its round-0 update and resends it in rounds 1 and 3; client 2 is first
# sampled in round 2, computes then, and resends that in round 3
SAMPLED = {
    "num_clients": 4,
    "clients_per_round": 2,
    "seed": 2,
    "rounds": 4,
    "attack_args": {**LAZY, "ids": [1, 2]},
}


@pytest.mark.skipif(not HAVE_FLOWER, reason='needs Flower: pip install -e ".[flower]"')
def test_lazy_workers_resume_across_the_flower_engine(tmp_path):
    """Round 0 in process, rounds 1-2 on Flower, round 3 in process (one simulation, ~25 s).

    Round 1 needs client 1's update from the in-process run on its Flower node; round 3
    needs client 2's update, computed on its node in round 2, back on the server.
    """
    _run(tmp_path / "straight", **SAMPLED)
    mixed = tmp_path / "mixed"
    _run(mixed, **{**SAMPLED, "rounds": 1})
    _run(mixed, **{**SAMPLED, "rounds": 3, "engine": "flower"})
    state = torch.load(mixed / "state.pt", weights_only=True)
    assert state["round"] == 3 and set(state["clients"]) == {1, 2}  # kept under Flower
    _run(mixed, **SAMPLED)
    _same_run(tmp_path / "straight", mixed, tol=1e-5)  # Ray actors: float tolerance


@pytest.mark.skipif(not HAVE_FLOWER, reason='needs Flower: pip install -e ".[flower]"')
@pytest.mark.slow
def test_an_interrupted_flower_run_resumes_on_flower(tmp_path):
    flower = {**SAMPLED, "engine": "flower"}
    _run(tmp_path / "straight", **flower)
    _run(tmp_path / "resumed", **{**flower, "rounds": 2})
    _run(tmp_path / "resumed", **flower)
    _same_run(tmp_path / "straight", tmp_path / "resumed", tol=1e-5)


def test_stateful_defenses_resume_to_the_uninterrupted_run(tmp_path):
    # FoolsGold keeps every client's history, centered clipping the last aggregate, CRFL
    # and weak DP draw noise from the round's generator
    for name, defenses in {
        "foolsgold": [{"foolsgold": None}, {"crfl": {"sigma": 0.001}}],
        "cclip": [{"norm_diff_clip": {"max_norm": 5.0}}, {"centered_clipping": {"tau": 1.0}}],
    }.items():
        args = {"defense_args": {"defenses": defenses}, "attack_args": LAZY}
        _run(tmp_path / f"{name}-a", **args)
        _run(tmp_path / f"{name}-b", **args, rounds=2)
        _run(tmp_path / f"{name}-b", **args)
        _same_run(tmp_path / f"{name}-a", tmp_path / f"{name}-b")


def test_state_pt_holds_only_tensors_and_plain_data(tmp_path):
    _run(tmp_path / "a", attack_args=LAZY, defense_args={"type": "foolsgold"}, rounds=2)
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert state["format"] == "leakage-fl-state/2" and state["round"] == 2
    assert state["aggregator"]["__object__"] == "defenses.robust.RobustAggregator"


class _Planted:
    """Unpickling this writes a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_pt_with_pickled_objects_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, rounds=1)
    marker = tmp_path / "code-ran"
    state = torch.load(out / "state.pt", weights_only=True)
    torch.save({**state, "aggregator": _Planted(str(marker))}, out / "state.pt")
    before = (out / "rounds.jsonl").read_bytes()
    argv = ["fl", "--out", str(out), "--quiet", "--rounds", "2"]
    argv += [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k != "rounds"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds Python objects" in err[0], err
    assert not marker.exists()  # refused before anything was unpickled
    assert (out / "rounds.jsonl").read_bytes() == before  # and nothing changed


def test_an_interrupted_rewrite_of_rounds_jsonl_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(out, rounds=2)
    path = out / "rounds.jsonl"
    leakage.app.store.append_record(path, {"round": 3, "accuracy": 0.5, "seconds": 1.0})
    leakage.app.store.append_record(path, {"round": 4, "accuracy": 0.5, "seconds": 1.0})
    before = path.read_bytes()  # two records past the saved state: a resume drops them

    calls = []
    real = leakage.app.store._line

    def dies_on_the_second_line(record):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the rewrite
        return real(record)

    monkeypatch.setattr(leakage.app.store, "_line", dies_on_the_second_line)
    with pytest.raises(KeyboardInterrupt):
        _run(out, rounds=3)
    assert [r["round"] for r in calls] == [1, 2]  # it died writing the kept records
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file, whole
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp.jsonl")]
    assert [r["round"] for r in _run(out, rounds=3)] == [1, 2, 3]
    _run(tmp_path / "straight", rounds=3)
    _same_run(tmp_path / "straight", out)


class _Killed(BaseException):
    """A stand-in for SIGKILL: not an Exception, so no handler swallows it."""


_POINTS = [  # (owner, attribute): the calls a kill may land in
    (fl_core.server.Server, "run_round"),
    (leakage.app.fl_cmd, "_evaluate"),
    (leakage.app.fl_cmd, "append_record"),
    (leakage.app.fl_cmd, "write_outputs"),
    (torch, "save"),  # state.pt, written to a temporary file
    (os, "replace"),  # the temporary file moved onto state.pt, rounds.csv, ...
]


def _instrument(monkeypatch, kill_at):
    """Count calls of the kill points; raise _Killed at call number ``kill_at`` (None: never)."""
    count = [0]
    for owner, name in _POINTS:
        real = getattr(owner, name)

        def wrapped(*a, _real=real, **k):
            count[0] += 1
            if kill_at is not None and count[0] == kill_at:
                raise _Killed
            return _real(*a, **k)

        monkeypatch.setattr(owner, name, wrapped)
    return count


def test_a_run_killed_at_random_points_resumes_to_the_same_records(tmp_path, monkeypatch):
    args = {"attack_args": LAZY, "defense_args": {"type": "foolsgold"}, "rounds": 4}
    with monkeypatch.context() as m:
        count = _instrument(m, None)
        _run(tmp_path / "straight", **args)
        total = count[0]
    rng = random.Random(20240611)  # seeded: the same kill points on every run
    out = tmp_path / "killed"
    kills = sorted(rng.sample(range(1, total + 1), 6))
    done, killed = 0, 0  # a try counts its calls from 1: it dies kill_at - done calls in
    for kill_at in kills:  # each try dies at its point; the next resumes from what was left
        with monkeypatch.context() as m:
            _instrument(m, kill_at - done)
            try:
                _run(out, **args)
            except _Killed:
                killed += 1
        done = kill_at
    assert killed >= 4  # (a resumed try may redo less than the straight run had left)
    _run(out, **args)  # and the last one finishes
    _same_run(tmp_path / "straight", out)
    assert (out / "rounds.csv").exists() and (out / "accuracy.png").exists()


def test_nothing_is_written_before_the_data_and_clients_are_checked(tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["fl", "--out", str(out), "--quiet", "--set", "dataset=samples",
                 "--set", "model=lenet", "--set", "num_clients=40"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot fill 40 clients" in err[0], err
    assert not out.exists()


def test_a_pickle_is_not_what_the_state_file_loader_accepts(tmp_path):
    from leakage.app.fl_cmd import _read_state

    path = tmp_path / "state.pt"
    path.write_bytes(pickle.dumps({"round": 1}, protocol=2))
    with pytest.raises(ValueError, match="cannot be read|holds Python objects"):
        _read_state(path, "cpu")
    torch.save({"round": 1, "model": {}}, path)
    with pytest.raises(ValueError, match="not a state file of this version"):
        _read_state(path, "cpu")
    assert os.path.exists(path)
