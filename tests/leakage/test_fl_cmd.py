"""``leakage fl CONFIG``: runs from YAML with attacks and defenses, resumes, rejects bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from leakage.app.cli import main
from leakage.app.fl_cmd import load_fl_config, run_fl

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BASE = {  # the embedded photographs, a tiny LeNet, 4 clients: seconds per run
    "dataset": "samples",
    "model": "lenet",
    "num_clients": 4,
    "rounds": 3,
    "algorithm": "fedavg",
    "local_steps": 2,
    "batch_size": 2,
    "lr": 0.05,
}


def _config(tmp_path, name="run.yaml", **extra):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return path


def test_a_run_writes_records_and_resumes_to_the_same_numbers(tmp_path, capsys):
    attack = {"enable": True, "type": "byzantine", "mode": "flip", "ids": [1]}
    defense = {"enable": True, "type": "median"}
    cfg = _config(tmp_path, attack_args=attack, defense_args=defense)
    straight = run_fl(load_fl_config(cfg, out=str(tmp_path / "a")))
    assert [r["round"] for r in straight] == [1, 2, 3]
    assert all(0 <= r["accuracy"] <= 1 for r in straight)
    assert (tmp_path / "a" / "rounds.csv").exists() and (tmp_path / "a" / "accuracy.png").exists()

    # two rounds, then the same config asked for three: continues from the saved state
    run_fl(load_fl_config(cfg, out=str(tmp_path / "b"), rounds=2))
    resumed = run_fl(load_fl_config(cfg, out=str(tmp_path / "b")))
    assert [r["round"] for r in resumed] == [1, 2, 3]
    assert [r["accuracy"] for r in resumed] == [r["accuracy"] for r in straight]
    lines = (tmp_path / "b" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]

    # a different setting in the same folder is refused
    other = _config(tmp_path, "other.yaml", lr=0.1)
    with pytest.raises(ValueError, match="other settings"):
        run_fl(load_fl_config(other, out=str(tmp_path / "b")))
    capsys.readouterr()


def _weights(out):
    state = torch.load(out / "state.pt", weights_only=True)["model"]
    return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_batched_and_looped_clients_give_the_same_run_and_resume_each_other(algorithm, tmp_path):
    cfg = _config(tmp_path, algorithm=algorithm, momentum=0.5)
    loop = run_fl(load_fl_config(cfg, out=str(tmp_path / "loop"), batched=False))
    batched = run_fl(load_fl_config(cfg, out=str(tmp_path / "vmap"), batched=True))
    assert (_weights(tmp_path / "loop") - _weights(tmp_path / "vmap")).abs().max() < 1e-5
    assert [r["accuracy"] for r in loop] == [r["accuracy"] for r in batched]
    # how the clients are computed is not a setting: a loop run resumes batched
    run_fl(load_fl_config(cfg, out=str(tmp_path / "mixed"), batched=False, rounds=2))
    run_fl(load_fl_config(cfg, out=str(tmp_path / "mixed"), batched=True))
    assert (_weights(tmp_path / "loop") - _weights(tmp_path / "mixed")).abs().max() < 1e-5


def test_the_attack_moves_the_model_and_krum_undoes_it(tmp_path):
    def weights(**extra):
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run_fl(load_fl_config(_config(tmp_path, **extra), out=str(out), rounds=1))
        state = torch.load(out / "state.pt", weights_only=True)["model"]
        return torch.cat([v.flatten() for k, v in state.items() if v.is_floating_point()])

    byzantine = {"type": "byzantine", "mode": "random", "ids": [0]}
    clean = weights()
    attacked = weights(attack_args=byzantine)
    defended = weights(attack_args=byzantine, defense_args={"defenses": [{"krum": {"f": 0}}]})
    disabled = weights(
        attack_args={**byzantine, "enable": False},
        defense_args={"enable": False, "type": "krum", "f": 0},
    )
    assert torch.equal(disabled, clean)
    # one client sending U[-1, 1) weights drags the mean far; Krum keeps an honest update
    assert (attacked - clean).norm() > 10 * (defended - clean).norm()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"learning_rate": 0.1}, "unknown config key(s) learning_rate"),
        ({"attack_args": {"type": "sybil", "ids": [0]}}, "unknown adversary"),
        ({"attack_args": {"type": "byzantine", "mode": "zero"}}, "exactly one of fraction or ids"),
        ({"defense_args": {"type": "krum"}}, "defense krum needs f"),
        ({"defense_args": {"f": 1}}, "no type or defenses"),
        ({"partition": "shards"}, "valid: iid, dirichlet"),
        ({"clients_per_round": 9}, "clients_per_round must be in [1, 4]"),
        ({"attack_args": "byzantine"}, "attack_args must be a mapping"),
        ({"device": "gpu0"}, "device 'gpu0': use cpu, cuda or cuda:N"),
        ({"defense_args": {"type": "krum", "f": 1}}, "krum needs n >= 2f + 3 (n=4, f=1)"),
        ({"defense_args": {"type": "bulyan", "f": 1}}, "bulyan needs n >= 4f + 3 (n=4, f=1)"),
        ({"engine": "spark"}, "unknown engine 'spark'; valid: local, flower"),
        ({"batched": "maybe"}, "batched must be auto, true, false or compiled"),
        pytest.param(
            {"device": "cuda"},
            "no CUDA device here; use cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_configs_are_one_line_errors(extra, message, tmp_path, capsys):
    cfg = _config(tmp_path, **extra)
    code = main(["fl", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_flags_lay_attack_defense_and_keys_over_the_file(tmp_path, capsys):
    cfg = _config(tmp_path, attack_args={"type": "byzantine", "mode": "zero", "ids": [0]})
    out = tmp_path / "flags"
    code = main(["fl", str(cfg), "--out", str(out), "--quiet", "--rounds", "1",
                 "--set", "lr=0.02", "--attack", "byzantine:mode=random,ids=[0,2]",
                 "--defense", "krum:f=0"])  # fmt: skip
    assert code == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["lr"] == 0.02
    assert stored["attack_args"] == {"enable": True, "type": "byzantine", "mode": "random",
                                     "ids": [0, 2]}  # fmt: skip
    assert stored["defense_args"] == {"defenses": [{"krum": {"f": 0}}]}

    # 'none' switches the file's blocks off; no file at all works from the defaults
    args = ["fl", "--set", "dataset=samples", "--set", "model=lenet", "--set", "num_clients=2",
            "--set", "local_steps=1", "--rounds", "1", "--attack", "none", "--defense", "none",
            "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "bare")]) == 0
    stored = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert stored["attack_args"] == {"enable": False} and stored["defense_args"] == {
        "enable": False
    }
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attack", "sybil:ids=[0]"], "unknown adversary"),
        (["--attack", "byzantine:mode=zero"], "exactly one of fraction or ids"),
        (["--attack", "byzantine:mode"], "--attack 'byzantine:mode': write name:key=value"),
        (["--defense", "krum"], "defense krum needs f"),
        (["--defense", "multi_krum:f=0,m=5"], "multi_krum needs m <= n (n=4, m=5)"),
        (["--defense", ":f=1"], "the name is missing"),
        (["--set", "lr"], "--set 'lr': write KEY=VALUE"),
        (["--set", "learning_rate=1"], "unknown config key(s) learning_rate"),
        (["--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
        # checked up front: types, ranges and whole numbers, naming the key
        (["--set", "num_clients=abc"], "num_clients must be a whole number >= 1; got 'abc'"),
        (["--set", "lr=abc"], "lr must be a finite number > 0; got 'abc'"),
        (["--set", "alpha=abc"], "alpha must be a finite number > 0; got 'abc'"),
        (["--set", "clients_per_round=abc"], "clients_per_round must be a whole number"),
        (["--set", "eval_every=abc"], "eval_every must be a whole number >= 1; got 'abc'"),
        (["--set", "seed=abc"], "seed must be a whole number in [0, "),
        (["--set", "rounds=1.5"], "rounds must be a whole number >= 1; got 1.5"),
        (["--rounds", "0"], "rounds must be a whole number >= 1; got 0"),
        (["--set", "lr=1e-4", "--set", "momentum=nan"], "momentum must be a finite number"),
        (
            ["--attack", "byzantine:mode=random,fraction=0.1,rounds=5"],
            "attack_args: rounds must be [start, stop] (stop null for forever); got 5",
        ),
        (
            ["--attack", "model_replacement:fraction=0.5,gamma=abc"],
            "attack_args: gamma must be a finite number; got 'abc'",
        ),
        (["--attack", "label_flip:fraction=1.5"], "attack_args: fraction must be a finite number"),
        (["--attack", "lazy:ids=[0,0]"], "attack_args: ids [0, 0] contain duplicates"),
        (["--attack", "lazy:ids=[0],rounds=[2,1]"], "attack_args: rounds stop must be"),
        (["--attack", "model_replacement:ids=[0],gamma=2,trigger=x"], "cannot be set"),
        (
            ["--set", "model=resnet20", "--defense", "dpsgd:noise_multiplier=1,max_grad_norm=1"],
            "dpsgd cannot train model resnet20: its BatchNorm layers",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    code = main(["fl", str(_config(tmp_path)), "--out", str(tmp_path / "o"), "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_run_started_before_a_new_key_still_resumes(tmp_path, capsys):
    """config.json written before ``weight_decay`` existed: the key counts as its default."""
    cfg = _config(tmp_path)
    out = tmp_path / "old"
    run_fl(load_fl_config(cfg, out=str(out), rounds=1))
    stored = json.loads((out / "config.json").read_text())
    del stored["weight_decay"]
    (out / "config.json").write_text(json.dumps(stored))
    assert [r["round"] for r in run_fl(load_fl_config(cfg, out=str(out), rounds=2))] == [1, 2]
    with pytest.raises(ValueError, match=r"other settings \(weight_decay\)"):
        run_fl(load_fl_config(cfg, out=str(out), weight_decay=0.1))
    capsys.readouterr()


def test_engine_flag_and_key_choose_where_rounds_run(tmp_path):
    import argparse

    from leakage.app.fl_cmd import add_fl_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_fl_parser(parser.add_subparsers(dest="command"))
    cfg = _config(tmp_path, engine="flower", batched=True)
    assert config_from_args(parser.parse_args(["fl", str(cfg)])).engine == "flower"
    local = config_from_args(parser.parse_args(["fl", str(cfg), "--engine", "local"]))
    assert (local.engine, local.batched) == ("local", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["fl", str(cfg), "--engine", "spark"])
