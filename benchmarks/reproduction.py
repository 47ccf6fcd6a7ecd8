"""Re-derive the source experiments on FedAvg and Byzantine robustness; write REPRODUCTION.md.

Each experiment is a set of ``leakage fl`` runs (see :mod:`leakage.app.fl_cmd`),
each in its own folder under ``--out`` and resumable there, plus, for the
FedAvg study, a centralised baseline; ``--workers N`` runs N of them at once
(Ray, or a process pool; ``--ray-address`` for a cluster; see
:mod:`leakage.app.sweep`). ``benchmarks/REPRODUCTION.md`` puts every
source claim (the studies' reported settings and numbers, kept in ``CLAIMS``) next to the lab's
number, whichever way it falls. Each run's compact record (final accuracy, accuracy per
evaluated round, seconds, device, its full settings) is written, as the run finishes, to the
committed ``benchmarks/results/reproduction/<experiment>.json``; the report is rebuilt from
those records alone, so ``--report`` works on a fresh checkout, and a record whose settings
differ from the run's current ones (a default changed since) is left out as stale.

    python benchmarks/reproduction.py --experiments fedavg robust_one_round
    python benchmarks/reproduction.py --report          # the report only, from the records
    python benchmarks/reproduction.py --quick           # a few rounds of each: smoke test
    python benchmarks/reproduction.py --workers 2       # two runs at once

Experiments (``EXPERIMENTS``):

* ``fedavg``: Fashion-MNIST, the 3-layer sigmoid CNN, 20 rounds, 10 clients per
  round out of M = 100 / 20 / 10, local SGD 500 iterations, batch 20, lr 0.01,
  momentum 0.9, IID and Dirichlet(0.9); centralised SGD with the same step
  count as one FL round's client (500 x 20 rounds).
* ``robust_one_round``: Fashion-MNIST, M = 20 IID, Byzantine clients train on
  y -> 9 - y; each client 500 SGD iterations with batches of 10% of its data,
  lr 0.01, momentum 0.9; one aggregation by the mean (FedAvg) or the
  coordinate-wise median, at Byzantine ratios 0 / 0.1 / 0.2 / 0.4.
* ``robust_gd``: the same clients scaled to 150 images each (CPU), rounds of one
  full-batch gradient step per client, server lr 1; mean, coordinate-wise
  median and trimmed mean (beta = ratio).
* ``label_flip_krum``: 4 IID Fashion-MNIST clients, 25% / 50% of them train on
  y -> 9 - y; FedAvg's mean against Krum (f = 0, the only f that n = 4 admits).
* ``fedmlsecurity``: CIFAR-10, Dirichlet(0.5), 10 clients all participating,
  10% malicious, a small ReLU CNN in place of ResNet-20 (CPU), 10,000 training
  images; Exp 1 attacks on FedAvg, Exp 2 defenses without attack, Exp 3
  defenses against random-mode Byzantine, Exp 4 m-Krum against every attack.

The first two experiments have numeric claims (``CLAIMS``); the others have
qualitative ones (``VERDICTS``), each checked by a stated criterion on the
final accuracies, and reported as held, not held, or pending.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import inspect
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leakage.app.fl_cmd import FLConfig, run_fl
from leakage.app.store import append_record, atomic_path, load_records, write_atomic
from leakage.app.sweep import ScriptFunction, add_parallel_args, parallel_options, run_cells

DATA = {"dataset": "fashion-mnist", "model": "cnn", "activation": "sigmoid"}
FEDAVG_LOCAL = {"algorithm": "fedavg", "local_steps": 500, "batch_size": 20, "lr": 0.01,
                "momentum": 0.9}  # fmt: skip
RATIOS = (0.0, 0.1, 0.2, 0.4)


def fedavg_runs() -> dict[str, dict[str, Any]]:
    """ECE 273 study: Fashion-MNIST, 3-layer sigmoid CNN, 20 rounds of 10 clients out of M,
    local SGD 500 iterations (batch 20, lr 0.01, momentum 0.9), IID or Dirichlet(0.9);
    centralised: the same SGD for 20 x 500 steps on all the data."""
    runs = {}
    for m in (100, 20, 10):
        for part in ("iid", "dirichlet"):
            runs[f"M{m}-{part}"] = {
                **DATA, **FEDAVG_LOCAL, "num_clients": m, "clients_per_round": 10,
                "partition": part, "alpha": 0.9, "rounds": 20,
            }  # fmt: skip
    return runs


def robust_one_round_runs() -> dict[str, dict[str, Any]]:
    """One-round robust aggregation: M = 20 IID clients, Byzantine ones train on y -> 9 - y,
    500 SGD iterations with batches of 10% of a client's data (lr 0.01, momentum 0.9), one
    aggregation by the mean (FedAvg) or the coordinate-wise median."""
    runs = {}
    for ratio in RATIOS:
        for rule in ("mean", "median"):
            attack = (
                {"enable": True, "type": "label_flip", "fraction": ratio, "seed": 0}
                if ratio > 0
                else {}
            )
            runs[f"{rule}-ratio{ratio:g}"] = {
                **DATA, "algorithm": "fedavg", "local_steps": 500, "batch_size": 300,
                "lr": 0.01, "momentum": 0.9, "num_clients": 20, "partition": "iid", "rounds": 1,
                "attack_args": attack, "defense_args": {"defenses": [{rule: None}]},
            }  # fmt: skip
    return runs


def _label_flip(ratio: float) -> dict[str, Any]:
    return {"enable": True, "type": "label_flip", "fraction": ratio, "seed": 0} if ratio else {}


GD_ROUNDS = 500
GD_PER_CLIENT = 150


def _gd_runs(per_client: int | None) -> dict[str, dict[str, Any]]:
    runs = {}
    for ratio in RATIOS:
        rules = {"mean": {"mean": None}, "median": {"median": None}}
        if ratio > 0:  # beta = 0 is the mean
            rules["trimmed_mean"] = {"trimmed_mean": {"beta": ratio}}
        for rule, defense in rules.items():
            runs[f"{rule}-ratio{ratio:g}"] = {
                **DATA, "algorithm": "fedsgd", "batch_size": None, "server_lr": 1.0,
                "num_clients": 20, "partition": "iid", "rounds": GD_ROUNDS,
                "train_limit": None if per_client is None else 20 * per_client, "eval_every": 25,
                "attack_args": _label_flip(ratio), "defense_args": {"defenses": [defense]},
            }  # fmt: skip
    return runs


def robust_gd_runs() -> dict[str, dict[str, Any]]:
    """Gradient-descent robust aggregation: the one-round study's M = 20 IID clients (Byzantine
    ones train on y -> 9 - y), scaled for CPU to 150 Fashion-MNIST images each (3,000 in all);
    500 rounds in which every client sends one full-batch gradient, aggregated by the mean, the
    coordinate-wise median or the trimmed mean (beta = the Byzantine ratio), server lr 1.
    The source used all 60,000 images (3.5 CPU-hours per run here; see robust_gd_full)."""
    return _gd_runs(GD_PER_CLIENT)


def robust_gd_full_runs() -> dict[str, dict[str, Any]]:
    """The gradient-descent study at the source's scale: all 60,000 Fashion-MNIST images over
    the 20 clients (3,000 each), 500 full-batch rounds, lr 1. About 3.5 hours per run on one
    CPU core, so run it where a GPU is: `--experiments robust_gd_full --device cuda`."""
    return _gd_runs(None)


def robust_gd_scale_runs() -> dict[str, dict[str, Any]]:
    """A scale check of robust_gd: the coordinate-wise median at Byzantine ratio 0.1 with 600
    images per client (12,000 in all, four times robust_gd's), otherwise the same. At 150 images
    per client the robust rules never leave the sigmoid network's initial plateau; this run asks
    whether more data per client (less noisy client gradients, as in the source's 3,000) lets
    the median out. About 30 minutes on one core."""
    return {"median-ratio0.1": _gd_runs(600)["median-ratio0.1"]}


def label_flip_krum_runs() -> dict[str, dict[str, Any]]:
    """Label flipping on 4 clients: Fashion-MNIST split IID over 4 clients, 20 FedAvg rounds of
    100 local SGD steps (batch 20, lr 0.01, momentum 0.9, the sigmoid CNN); 0, 1 or 2 clients
    (0 / 25 / 50%) train on y -> 9 - y; aggregation by the mean (FedAvg) or Krum with f = 0
    (n = 4 admits no larger f under n >= 2f + 3)."""
    runs = {}
    for ratio in (0.0, 0.25, 0.5):
        for rule, defense in (("mean", {"mean": None}), ("krum", {"krum": {"f": 0}})):
            runs[f"{rule}-flip{int(100 * ratio)}"] = {
                **DATA, **FEDAVG_LOCAL, "local_steps": 100, "num_clients": 4,
                "partition": "iid", "rounds": 20, "attack_args": _label_flip(ratio),
                "defense_args": {"defenses": [defense]},
            }  # fmt: skip
    return runs


FEDML_ATTACKS = {
    "none": {},
    "byz-random": {"type": "byzantine", "mode": "random"},
    "byz-zero": {"type": "byzantine", "mode": "zero"},
    "byz-flip": {"type": "byzantine", "mode": "flip"},
    "label-flip": {"type": "label_flip", "source": [3, 2], "target": [9, 1]},
}
FEDML_DEFENSES = {
    "multi_krum": {"multi_krum": {"f": 1, "m": 5}},
    "krum": {"krum": {"f": 1}},
    "median": {"median": None},
    "trimmed_mean": {"trimmed_mean": {"beta": 0.1}},
    "geometric_median": {"geometric_median": None},
    "bulyan": {"bulyan": {"f": 1}},
    "foolsgold": {"foolsgold": None},
    "centered_clipping": {"centered_clipping": {"tau": 10.0}},  # Karimireddy et al.: tau 10, l 1
}


def fedmlsecurity_runs() -> dict[str, dict[str, Any]]:
    """FedMLSecurity Exp 1-4, CPU-sized: CIFAR-10 (10,000 training images, 2,000 test images),
    Dirichlet(0.5) over 10 clients all participating, 30 rounds of 100 local SGD steps (batch 10,
    lr 0.03, weight decay 0.001: one local epoch of an average client), one client (10%)
    malicious. Substitution: the lab's small ReLU CNN (35k parameters) for ResNet-20, and 30
    rounds on a fifth of the data for 100 rounds on all of it. Exp 1: each attack against
    FedAvg; Exp 2: each defense without attack; Exp 3: each defense against random-mode
    Byzantine; Exp 4: m-Krum (f = 1, m = 5) against every attack. Runs are named
    `<aggregation>-<attack>`."""
    base = {
        "dataset": "cifar10", "model": "cnn", "activation": "relu", "train_limit": 10000,
        "test_limit": 2000, "num_clients": 10, "partition": "dirichlet", "alpha": 0.5,
        "algorithm": "fedavg", "local_steps": 100, "batch_size": 10, "lr": 0.03,
        "weight_decay": 0.001, "rounds": 30,
    }  # fmt: skip
    pairs = [("fedavg", a) for a in FEDML_ATTACKS]  # Exp 1 (and the clean baseline)
    pairs += [(d, a) for d in FEDML_DEFENSES for a in ("none", "byz-random")]  # Exp 2, 3
    pairs += [("multi_krum", a) for a in ("byz-zero", "byz-flip", "label-flip")]  # Exp 4
    runs = {}
    for defense, attack in pairs:
        attack_args = {"enable": True, **FEDML_ATTACKS[attack], "fraction": 0.1, "seed": 0}
        runs[f"{defense}-{attack}"] = {
            **base,
            "attack_args": attack_args if attack != "none" else {},
            "defense_args": {"defenses": [FEDML_DEFENSES[defense]]} if defense != "fedavg" else {},
        }
    return runs


EXPERIMENTS = {
    "fedavg": fedavg_runs,
    "robust_one_round": robust_one_round_runs,
    "robust_gd": robust_gd_runs,
    "robust_gd_scale": robust_gd_scale_runs,
    "robust_gd_full": robust_gd_full_runs,
    "label_flip_krum": label_flip_krum_runs,
    "fedmlsecurity": fedmlsecurity_runs,
}

CLAIMS = {  # the source studies' reported numbers (see each experiment's docstring entry)
    "fedavg": {
        "centralized": 0.8774,
        "M100-iid": 0.8632,
        "M20-iid": 0.8675,
        "M10-iid": 0.8617,
        "M100-dirichlet": 0.8421,
        "M20-dirichlet": 0.8315,
        "M10-dirichlet": 0.8629,
    },  # fmt: skip
    "robust_one_round": {
        "mean-ratio0": 0.7291,
        "mean-ratio0.1": 0.7141,
        "mean-ratio0.2": 0.6101,
        "mean-ratio0.4": 0.4081,
        "median-ratio0": 0.7262,
        "median-ratio0.1": 0.7266,
        "median-ratio0.2": 0.7237,
        "median-ratio0.4": 0.7037,
    },  # fmt: skip
}


Accuracies = dict[str, float | None]  # run name -> final test accuracy (None: not finished)


@dataclass(frozen=True)
class Verdict:
    """A qualitative source claim and the criterion by which the lab's numbers decide it.

    ``check(acc)`` returns ``(held, evidence)``, or ``None`` while a run it needs is unfinished.
    """

    claim: str
    criterion: str
    check: Callable[[Accuracies], tuple[bool, str] | None]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _stays_within(rule: str, ratios: Sequence[float], base: str, tol: float):
    """Check: ``rule`` at each ratio is within ``tol`` of the run ``base``."""

    def check(acc: Accuracies) -> tuple[bool, str] | None:
        names = [f"{rule}-ratio{r:g}" for r in ratios]
        if acc.get(base) is None or any(acc.get(n) is None for n in names):
            return None
        drops = [acc[base] - acc[n] for n in names]
        shown = ", ".join(f"{r:g}: {_pct(acc[n])}" for r, n in zip(ratios, names))
        return max(drops) <= tol, f"{shown}; {base} {_pct(acc[base])}"

    return check


def _mean_breaks(acc: Accuracies) -> tuple[bool, str] | None:
    names = [f"mean-ratio{r:g}" for r in RATIOS]
    if any(acc.get(n) is None for n in names):
        return None
    drop = acc["mean-ratio0"] - acc["mean-ratio0.4"]
    shown = ", ".join(f"{r:g}: {_pct(acc[n])}" for r, n in zip(RATIOS, names))
    return drop > 0.10, f"mean at {shown}; drop at 0.4 {100 * drop:.2f} pts"


def _flip_hurts(pct: int):
    def check(acc: Accuracies) -> tuple[bool, str] | None:
        clean, hit = acc.get("mean-flip0"), acc.get(f"mean-flip{pct}")
        if clean is None or hit is None:
            return None
        return hit < clean - 0.02, f"FedAvg clean {_pct(clean)}, {pct}% flipped {_pct(hit)}"

    return check


def _krum_restores(pct: int):
    def check(acc: Accuracies) -> tuple[bool, str] | None:
        clean, krum = acc.get("mean-flip0"), acc.get(f"krum-flip{pct}")
        if clean is None or krum is None:
            return None
        return krum >= clean - 0.02, f"FedAvg clean {_pct(clean)}, Krum {pct}% flipped {_pct(krum)}"

    return check


def _random_hurts_most(acc: Accuracies) -> tuple[bool, str] | None:
    names = [f"fedavg-{a}" for a in FEDML_ATTACKS if a != "none"]
    if any(acc.get(n) is None for n in names):
        return None
    worst = min(names, key=lambda n: acc[n])
    shown = ", ".join(f"{n.removeprefix('fedavg-')} {_pct(acc[n])}" for n in names)
    return worst == "fedavg-byz-random", f"FedAvg under {shown}"


def _defenses_cost(acc: Accuracies) -> tuple[bool, str] | None:
    names = [f"{d}-none" for d in FEDML_DEFENSES]
    if acc.get("fedavg-none") is None or any(acc.get(n) is None for n in names):
        return None
    costs = {n.removesuffix("-none"): 100 * (acc["fedavg-none"] - acc[n]) for n in names}
    paying = sum(c > 0 for c in costs.values())
    shown = ", ".join(f"{d} {c:+.2f}" for d, c in costs.items())
    return paying == len(costs), (
        f"{paying} of {len(costs)} defenses below FedAvg's clean {_pct(acc['fedavg-none'])}; "
        f"cost in pts: {shown}"
    )


def _mkrum_neutralizes(acc: Accuracies) -> tuple[bool, str] | None:
    need = ("multi_krum-none", "multi_krum-byz-random", "fedavg-none", "fedavg-byz-random")
    if any(acc.get(n) is None for n in need):
        return None
    clean, hit = acc["multi_krum-none"], acc["multi_krum-byz-random"]
    return hit >= clean - 0.02, (
        f"m-Krum clean {_pct(clean)}, under random Byzantine {_pct(hit)} "
        f"(FedAvg {_pct(acc['fedavg-none'])} -> {_pct(acc['fedavg-byz-random'])})"
    )


VERDICTS: dict[str, list[Verdict]] = {  # the source studies' claims; the issue
    "robust_gd": [
        Verdict("The median stays stable as the Byzantine ratio grows",
                "median within 5 pts of its ratio-0 accuracy at every ratio",
                _stays_within("median", RATIOS, "median-ratio0", 0.05)),
        Verdict("The trimmed mean (beta = ratio) stays stable as the ratio grows",
                "trimmed mean within 5 pts of the clean mean at ratios 0.1, 0.2, 0.4",
                _stays_within("trimmed_mean", RATIOS[1:], "mean-ratio0", 0.05)),
        Verdict("The mean does not stay stable",
                "mean more than 10 pts below its clean accuracy at ratio 0.4", _mean_breaks),
    ],
    "label_flip_krum": [
        Verdict("FedAvg loses accuracy with 25% of clients flipping labels",
                "FedAvg more than 2 pts below its clean accuracy", _flip_hurts(25)),
        Verdict("FedAvg loses accuracy with 50% of clients flipping labels",
                "FedAvg more than 2 pts below its clean accuracy", _flip_hurts(50)),
        Verdict("Krum restores the clean accuracy at 25%",
                "Krum within 2 pts of FedAvg's clean accuracy", _krum_restores(25)),
        Verdict("Krum restores the clean accuracy at 50%",
                "Krum within 2 pts of FedAvg's clean accuracy", _krum_restores(50)),
    ],
    "fedmlsecurity": [
        Verdict("Exp 1: random-mode Byzantine hurts FedAvg most",
                "FedAvg's accuracy is lowest under random mode of the four attacks",
                _random_hurts_most),
        Verdict("Exp 2: defenses cost accuracy without an attack",
                "every defense below FedAvg's clean accuracy", _defenses_cost),
        Verdict("Exp 3: m-Krum (m = 5) neutralizes random-mode Byzantine",
                "m-Krum under attack within 2 pts of m-Krum without attack", _mkrum_neutralizes),
    ],
}  # fmt: skip
VERDICTS["robust_gd_full"] = VERDICTS["robust_gd"]


def _quick(run: dict[str, Any]) -> dict[str, Any]:
    """A smoke version: few rounds and steps, small data."""
    return {**run, "rounds": min(run["rounds"], 2), "local_steps": 5, "train_limit": 2000,
            "test_limit": 500}  # fmt: skip


def run_one(cell: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """One run (or the FedAvg study's centralised baseline), resumed in its own folder: its
    final accuracy (``None``: the baseline had finished before). Run by
    :func:`leakage.app.sweep.run_cells`, in this process or in a worker."""
    name, run_name = cell
    start = time.perf_counter()
    if run_name == "centralized":
        accuracy = centralized(args)
    else:
        accuracy = run_fl(run_config(name, run_name, args))[-1]["accuracy"]
    return {"run": f"{name}/{run_name}", "accuracy": accuracy,
            "seconds": time.perf_counter() - start}  # fmt: skip


def run_config(name: str, run_name: str, args: argparse.Namespace) -> FLConfig:
    """The ``leakage fl`` config of one of the experiment's runs, in its folder under ``--out``."""
    values = EXPERIMENTS[name]()[run_name]
    values = _quick(values) if args.quick else values
    return FLConfig(**values, data_root=str(args.data_root), seed=args.seed,
                    device=getattr(args, "device", "cpu"),
                    out=str(Path(args.out) / name / run_name))  # fmt: skip


def _cells(name: str) -> list[str]:
    """The experiment's runs, and the FedAvg study's centralised baseline."""
    return list(EXPERIMENTS[name]()) + (["centralized"] if name == "fedavg" else [])


def run_experiments(names: Sequence[str], args: argparse.Namespace) -> None:
    """The experiments' runs (those matching ``args.runs``, if given), each resumed in its
    folder, ``args.workers`` at once; a run that fails its checks (ValueError) is skipped, and
    one whose committed record was measured under its current settings is not rerun (unless
    ``args.rerun``): the records, not the ignored run folders, carry a pass across machines.
    Each finished run's record goes to the experiment's results file as it finishes
    (:func:`save_record`), so an interrupted pass keeps every run it completed."""
    patterns = getattr(args, "runs", None)
    cells = []
    for name in names:
        recorded = {} if getattr(args, "rerun", False) else current_records(name, args)[0]
        for run_name in _cells(name):
            if run_name in recorded:
                continue  # its committed record stands (another machine's, an earlier pass's)
            if not patterns or any(fnmatch.fnmatchcase(run_name, pat) for pat in patterns):
                cells.append((name, run_name))

    def show(cell: tuple[str, str], record: dict[str, Any]) -> None:
        saved = save_record(cell[0], cell[1], args)
        if saved is None:
            return
        print(f"{record['run']}: accuracy {saved['accuracy']:.4f} "
              f"({saved['seconds']:.0f} s)", flush=True)  # fmt: skip

    device = getattr(args, "device", "cpu")
    options = parallel_options(args)
    settings = argparse.Namespace(quick=args.quick, data_root=args.data_root, out=args.out,
                                  seed=args.seed, device=device)  # fmt: skip
    run_cells(cells, functools.partial(ScriptFunction(__file__, "run_one"), args=settings),
              store=None, label="/".join, on_record=show,
              gpus=1 / options["workers"] if device.startswith("cuda") else 0.0,
              **options)  # fmt: skip


def run_experiment(name: str, args: argparse.Namespace) -> None:
    """One experiment's runs (see :func:`run_experiments`)."""
    run_experiments([name], args)


def _centralized_settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    return {"dataset": "fashion-mnist", "model": "cnn", "activation": "sigmoid",
            "steps": 20 * (5 if quick else 500), "batch_size": 20, "lr": 0.01, "momentum": 0.9,
            "train_limit": 2000 if quick else None, "test_limit": 500 if quick else None,
            "seed": args.seed}  # fmt: skip


def centralized(args: argparse.Namespace) -> float | None:
    """Plain SGD on all the training data with one FL client's total step count: its test
    accuracy, or ``None`` if it had finished before."""
    from fl_core import build_model, load_dataset
    from fl_core.train import evaluate_accuracy, train_centralized

    path = Path(args.out) / "fedavg" / "centralized.jsonl"
    if load_records(path):
        return None
    s = _centralized_settings(args)
    train = load_dataset("fashion-mnist", root=args.data_root, train=True, limit=s["train_limit"])
    test = load_dataset("fashion-mnist", root=args.data_root, train=False, limit=s["test_limit"])
    model = build_model("cnn", in_shape=train.shape, activation="sigmoid",
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    start = time.perf_counter()
    train_centralized(model, train.images, train.labels, steps=s["steps"], batch_size=20, lr=0.01,
                      momentum=0.9, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    acc = evaluate_accuracy(model, test.images, test.labels)
    seconds = time.perf_counter() - start
    append_record(path, {"accuracy": acc, "steps": s["steps"], "seconds": seconds, "settings": s})
    return acc


# --- the committed records: what the report is built from ------------------------------------

RESULTS = Path("benchmarks/results/reproduction")
"""Where each experiment's finished runs are recorded, one ``<experiment>.json`` per experiment
(committed: the report and the README's reproduction table are rebuilt from these alone)."""

RECORD_FORMAT = "leakage-reproduction/1"


def expected_settings(name: str, run_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The settings a record of this run must have been measured under: the run's full
    ``leakage fl`` config (every default included) without where and how it was computed."""
    if run_name == "centralized":
        return _centralized_settings(args)
    from leakage.app.fl_cmd import EXECUTION_KEYS

    skip = {"out", "data_root", "device", *EXECUTION_KEYS}
    cfg = run_config(name, run_name, args).to_dict()
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in skip}))


def finished_record(name: str, run_name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The compact record of a run finished in its folder under ``--out`` (final accuracy,
    accuracy per evaluated round, seconds, device, settings), or ``None`` if it has not
    finished there."""
    out = Path(args.out) / name
    if run_name == "centralized":
        recs = load_records(out / "centralized.jsonl")
        if not recs:
            return None
        r = recs[-1]
        return {
            "accuracy": r["accuracy"],
            "curve": [],
            "seconds": round(r["seconds"], 1),
            "device": "cpu",
            "settings": r.get("settings", _centralized_settings(args)),
        }
    folder = out / run_name
    recs = load_records(folder / "rounds.jsonl")
    cfg_path = folder / "config.json"
    if not recs or not cfg_path.exists():
        return None
    config = json.loads(cfg_path.read_text())
    rounds = run_config(name, run_name, args).rounds
    if recs[-1].get("round") != rounds:
        return None
    from leakage.app.fl_cmd import EXECUTION_KEYS

    skip = {"out", "data_root", "device", *EXECUTION_KEYS}
    return {
        "accuracy": recs[-1]["accuracy"],
        "curve": [[r["round"], r["accuracy"]] for r in recs],
        "seconds": round(sum(r.get("seconds") or 0.0 for r in recs), 1),
        "device": config.get("device", "cpu"),
        "settings": {**{k: v for k, v in config.items() if k not in skip}, "rounds": rounds},
    }


def results_file(name: str, args: argparse.Namespace) -> Path:
    return Path(args.results) / f"{name}.json"


def load_results(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The experiment's committed run records (run name -> record); empty if none."""
    path = results_file(name, args)
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    if doc.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a {RECORD_FORMAT} file: rerun its experiment")
    return doc["runs"]


def save_record(name: str, run_name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Copy the run's finished record from its folder into the experiment's results file
    (written atomically; the other runs' records are kept). Returns the record, or ``None``
    if the run has not finished."""
    record = finished_record(name, run_name, args)
    if record is None or record["settings"] != expected_settings(name, run_name, args):
        return None  # unfinished, or a folder measured under other settings: not recorded
    runs = load_results(name, args)
    if runs.get(run_name) != record:
        runs[run_name] = record
        order = {r: i for i, r in enumerate(_cells(name))}
        runs = dict(sorted(runs.items(), key=lambda kv: order.get(kv[0], len(order))))
        doc = {"format": RECORD_FORMAT, "experiment": name,
               "script": "benchmarks/reproduction.py", "runs": runs}  # fmt: skip
        path = results_file(name, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, indent=1)
        point = r"\[\s+(-?[\d.e+-]+),\s+(-?[\d.e+-]+)\s+\]"
        text = re.sub(point, r"[\1, \2]", text)  # a curve's point on one line
        write_atomic(path, text + "\n")
    return record


def collect(names: Sequence[str], args: argparse.Namespace) -> None:
    """Record every run finished under ``--out`` (runs finished by an earlier pass, another
    machine's folders copied here) into the results files."""
    for name in names:
        for run_name in _cells(name):
            save_record(name, run_name, args)


Records = dict[str, dict[str, Any]]  # run name -> committed record


def current_records(name: str, args: argparse.Namespace) -> tuple[Records, list[str]]:
    """The experiment's records measured under the settings its runs have now, and the names of
    those whose settings have changed since (stale: the report leaves them out)."""
    kept, stale = {}, []
    for run_name, record in load_results(name, args).items():
        if run_name not in _cells(name):
            continue
        if record["settings"] == expected_settings(name, run_name, args):
            kept[run_name] = record
        else:
            stale.append(run_name)
    return kept, stale


def _final(records: Records, run_name: str) -> float | None:
    record = records.get(run_name)
    return None if record is None else record["accuracy"]


def _devices(records: Records) -> list[str]:
    """The devices the experiment's recorded runs ran on."""
    return sorted({r["device"] for r in records.values()})


def _accuracies(records: Records, name: str) -> Accuracies:
    return {run: _final(records, run) for run in EXPERIMENTS[name]()}


CHANCE = 0.11  # 10 classes: a run whose every evaluation is below this never learned


def _never_learned(records: Records, run: str) -> bool:
    curve = records[run]["curve"] if run in records else []
    return bool(curve) and max(acc for _, acc in curve) < CHANCE


def _matrix(records: Records, acc: Accuracies) -> list[str]:
    """Runs named ``<row>-<column>`` as a table of final accuracies; a dagger marks a run that
    never rose above chance in any evaluated round (stuck, not merely poisoned)."""
    rows: dict[str, dict[str, str]] = {}
    stuck = False
    for run, value in acc.items():
        row, _, col = run.partition("-")
        cell = "–" if value is None else _pct(value)
        if value is not None and _never_learned(records, run):
            cell, stuck = cell + " †", True
        rows.setdefault(row, {})[col] = cell
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| final accuracy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, values in rows.items():
        lines.append(f"| {row} | " + " | ".join(values.get(c, "") for c in cols) + " |")
    if stuck:
        lines += ["", f"† below {_pct(CHANCE)} in every evaluated round: the run never learned."]
    return lines


def _plot_curves(records: Records, name: str, path: Path) -> bool:
    """Accuracy against round, one panel per aggregation rule; False if nothing has run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, list[list[float]]]] = {}
    for run in EXPERIMENTS[name]():
        if run in records and records[run]["curve"]:
            row, _, col = run.partition("-")
            curves.setdefault(row, {})[col] = records[run]["curve"]
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), sharey=True)
    for ax, (row, runs) in zip(list(axes) if len(curves) > 1 else [axes], curves.items()):
        for col, curve in runs.items():
            ax.plot([r for r, _ in curve], [a for _, a in curve], label=col)
        ax.set_title(row)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy") if len(curves) > 1 else axes.set_ylabel("test accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)
    return True


def report_text(args: argparse.Namespace) -> str:
    """The report, built from the committed records alone (see :func:`current_records`)."""
    results = Path(args.results).as_posix()
    lines = [
        "# Reproductions: FedAvg convergence and Byzantine-robust aggregation",
        "",
        "Generated by `python benchmarks/reproduction.py` on this machine (2 CPU cores, one "
        "thread per run) unless a section names another device. Each numeric "
        "claim puts the source's number (the source studies' settings and numbers: an ECE 273 "
        "study of FedAvg, a one-round robust-aggregation study, FedMLSecurity (Han et al. "
        "2023) and the Emoji label-flipping study, as `benchmarks/reproduction.py` lists "
        "them) next to "
        "the lab's final test accuracy; each qualitative claim states the criterion that decides "
        "it on the lab's numbers. Every number comes from the run records committed in "
        f"`{results}/<experiment>.json` (final accuracy, accuracy per evaluated round, "
        "seconds, device and the run's full settings); `–` means no record measured under the "
        "run's current settings. The runs themselves live under "
        f"`{Path(args.out).as_posix()}` and resume.",
        "",
    ]
    held = {True: "**held**", False: "**not held**"}
    for name in EXPERIMENTS:
        records, stale = current_records(name, args)
        lines += [f"## {name}", "", " ".join((inspect.getdoc(EXPERIMENTS[name]) or "").split()), ""]
        if name in CLAIMS:
            lines += ["| run | source | lab | difference |", "|---|---|---|---|"]
            for run_name, claim in CLAIMS[name].items():
                got = _final(records, run_name)
                diff = "–" if got is None else f"{100 * (got - claim):+.2f} pts"
                shown = "–" if got is None else _pct(got)
                lines.append(f"| {run_name} | {_pct(claim)} | {shown} | {diff} |")
            lines.append("")
        acc = _accuracies(records, name)
        if name not in CLAIMS:
            lines += _matrix(records, acc) + [""]
        if name in VERDICTS:
            lines += ["| source claim | criterion | verdict | lab's numbers |", "|---|---|---|---|"]
            for v in VERDICTS[name]:
                result = v.check(acc)
                verdict, evidence = ("pending", "–") if result is None else (held[result[0]],
                                                                             result[1])  # fmt: skip
                lines.append(f"| {v.claim} | {v.criterion} | {verdict} | {evidence} |")
            lines.append("")
        if stale:
            lines += [f"Left out, measured under settings the runs no longer have (rerun them): "
                      f"{', '.join(stale)}.", ""]  # fmt: skip
        if records:
            seconds = sum(r["seconds"] for r in records.values())
            spent = f"{seconds / 3600:.1f} run-hours" if seconds >= 3600 else (
                f"{seconds / 60:.0f} run-minutes")  # fmt: skip
            runs = "1 run" if len(records) == 1 else f"{len(records)} runs"
            lines += [f"Ran on: {', '.join(_devices(records))}; {runs} recorded, {spent} in all.",
                      ""]  # fmt: skip
        if name.startswith("robust_gd") and _plot_curves(
            records, name, Path(args.figures) / f"{name}.png"
        ):
            rel = Path("results") / "reproduction" / f"{name}.png"
            lines += [f"![{name} accuracy by round]({rel.as_posix()})", ""]
    if args.quick:
        lines.insert(2, "**Smoke run (`--quick`): not a reproduction.**\n")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, path: Path) -> str:
    text = report_text(args)
    write_atomic(path, text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/reproduction"))
    p.add_argument("--report-file", type=Path, default=Path("benchmarks/REPRODUCTION.md"))
    p.add_argument("--figures", type=Path, default=Path("benchmarks/results/reproduction"),
                   help="where the report's figures go")  # fmt: skip
    p.add_argument("--results", type=Path, default=None,
                   help=f"the run records the report is built from (default {RESULTS}; "
                   "with --quick, <out>/records)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="only the runs whose names match (e.g. 'median-*'); the report shows all",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the runs' device)")
    p.add_argument("--quick", action="store_true", help="smoke run: few rounds and steps")
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    p.add_argument("--rerun", action="store_true",
                   help="rerun runs that have a current record (default: skip them)")  # fmt: skip
    add_parallel_args(p)
    args = p.parse_args(argv)
    for e in args.experiments:
        if e not in EXPERIMENTS:
            p.error(f"unknown experiment {e!r}; valid: {', '.join(EXPERIMENTS)}")
    if args.results is None:
        args.results = args.out / "records" if args.quick else RESULTS
    if not args.report:
        try:
            run_experiments(args.experiments, args)
        except ValueError as e:  # the parallel options: say what to fix
            p.error(str(e))
    collect(args.experiments, args)  # runs finished under --out by an earlier pass
    print(write_report(args, args.report_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
