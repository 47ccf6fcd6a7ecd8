"""The attack suite: attacks x victims x batch sizes x threat models, one table.

Every cell attacks one batch (random images of the CIFAR-10 test split, or the
embedded photographs) and scores the reconstruction: PSNR and SSIM after
Hungarian matching, label-set and label-count accuracy, wall seconds of the
attack. Victims (``VICTIMS``) carry their data's input normalisation, as
deployed models do (``-raw``: DLG's LeNet as its paper feeds it, raw pixels);
they are fresh seeded ones (``-trained``: checkpoints of
``leakage train`` on CIFAR-10, see ``TRAINING``), and the client computes its
update with BatchNorm in train mode (``-eval``: eval mode, running statistics).
The attacks run with their defaults (IG's tuned per victim family) and the
budgets of ``BUDGETS``. Threat models, as set up in each cell (all
honest-but-curious server):

* ``fedsgd``: one client's gradient of its whole batch;
* ``fedavg``: one client's delta after 4 local SGD steps (lr 0.05) with local
  batches of ceil(B/4) images, i.e. at most one epoch, so the dummy order is
  not a guess (see :mod:`leakage.simulate`);
* ``aggregate``: the mean of min(B, 4) FedSGD clients' gradients (one update
  covering the whole batch, as under secure aggregation).

Budgets are per victim size (``BUDGETS``), chosen so that the whole grid runs
in about an hour on one CPU core; they are far below the papers' (IG: 4,800-
24,000 iterations) and the table says so. Each finished cell is appended to
``<out>/cells.jsonl`` at once; an interrupted run resumes without redoing
finished cells, and the tables and the figure are rebuilt from that file.
``--workers N`` runs N cells at once (Ray, or a process pool; ``--ray-address``
for a cluster; see :mod:`leakage.app.sweep`), each on ``--threads`` torch threads,
with the same records as one worker.

``--restart-cost`` measures instead what R restarts batched cost against one
(wall time of a fixed number of iterations), for IG and DLG.

    python benchmarks/attack_suite.py                     # the full grid, CIFAR-10
    python benchmarks/attack_suite.py --datasets samples --batch-sizes 1 --threats fedsgd
    python benchmarks/attack_suite.py --workers 2                         # two cells at once
    python benchmarks/attack_suite.py --restart-cost
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import math
import statistics
import time
from pathlib import Path

import torch

from fl_core import build_model, load_dataset, load_samples
from leakage import ATTACKS, score_images
from leakage.app.experiment import AttackConfig, observe
from leakage.app.store import load_records, write_atomic
from leakage.app.sweep import (
    ScriptFunction,
    add_parallel_args,
    check_parallel,
    parallel_options,
    run_cells,
)
from leakage.metrics import label_count_accuracy, label_set_accuracy

VICTIMS = {  # name -> (model, activation, BatchNorm mode, trained)
    "lenet-sigmoid-raw": ("lenet", "sigmoid", "train", False),  # DLG's: no normalisation
    "lenet-sigmoid": ("lenet", "sigmoid", "train", False),
    "lenet-relu": ("lenet", "relu", "train", False),
    "cnn": ("cnn", "sigmoid", "train", False),
    "resnet18-sigmoid": ("resnet18", "sigmoid", "train", False),
    "resnet18-relu": ("resnet18", "relu", "train", False),
    "resnet20": ("resnet20", "relu", "train", False),
    "resnet20-eval": ("resnet20", "relu", "eval", False),
    "mlp-relu": ("mlp", "relu", "train", False),
    "lenet-sigmoid-trained": ("lenet", "sigmoid", "train", True),
    "lenet-relu-trained": ("lenet", "relu", "train", True),
    "cnn-trained": ("cnn", "sigmoid", "train", True),
    "resnet20-trained": ("resnet20", "relu", "train", True),
    "resnet20-trained-eval": ("resnet20", "relu", "eval", True),
    "mlp-relu-trained": ("mlp", "relu", "train", True),
    "cnn6": ("cnn6", "leaky_relu", "train", False),  # R-GAP's CNN6 (leaky ReLU 0.2)
}
SMALL = {v for v, (m, *_rest) in VICTIMS.items() if m in ("lenet", "cnn", "mlp", "cnn6")}
BUDGETS = {  # attack -> (options for small victims, options for ResNets; None: not run)
    # DLG and iDLG do not invert a ResNet at any budget this grid can afford
    # (L-BFGS through ~0.3-11 M parameters); the earlier table ran them for 2
    # steps, which measured nothing.
    "dlg": ({"steps": 100, "restarts": 1}, None),
    "idlg": ({"steps": 100, "restarts": 1}, None),
    "ig": ({"steps": 1000, "restarts": 1}, {"steps": 500, "restarts": 1}),
    "analytic": ({}, {}),
    "rgap": ({}, {}),
    "spear": ({}, {}),
    "cpa": ({}, {}),
}
TRAINING = dict(limit=10000, epochs=2, batch_size=64, lr=0.05, momentum=0.9)
"""How ``leakage train`` makes the trained victims (CIFAR-10 training images,
input normalisation from the data, seed 0); the checkpoints are cached under
``<out>/checkpoints/`` and not committed (``--retrain`` makes them anew)."""
ANALYTIC_VICTIMS = {"mlp-relu", "mlp-relu-trained"}  # the closed form needs a first linear layer
SCOPE = {  # attack -> the victims in its scope (attacks not listed: every victim but the MLPs)
    "analytic": ANALYTIC_VICTIMS,
    "spear": ANALYTIC_VICTIMS,  # a first ReLU linear layer
    "cpa": ANALYTIC_VICTIMS,  # a first linear layer
    # R-GAP: plain conv/linear chains with invertible activations (no ReLU, no BatchNorm)
    # (the small CNN max-pools, which no equation inverts)
    "rgap": {"lenet-sigmoid-raw", "lenet-sigmoid", "lenet-sigmoid-trained", "cnn6"},
}
CLOSED_FORM_BATCH = {"rgap": 1}  # attacks defined for batch 1 only


def in_scope(attack: str, victim: str, batch: int) -> bool:
    """Whether the suite runs ``attack`` on ``victim`` at ``batch`` (and has a budget for it)."""
    if attack not in BUDGETS or BUDGETS[attack][0 if victim in SMALL else 1] is None:
        return False
    if batch > CLOSED_FORM_BATCH.get(attack, batch):
        return False
    if attack in SCOPE:
        return victim in SCOPE[attack]
    return victim not in ANALYTIC_VICTIMS


FEDAVG_STEPS, FEDAVG_LR, AGGREGATE_CLIENTS = 4, 0.05, 4
COLUMNS = [  # of table.csv: one row per (dataset, attack, victim, batch, threat)
    "dataset",
    "attack",
    "victim",
    "batch",
    "threat",
    "seeds",
    "psnr",
    "ssim",
    "label_set_accuracy",
    "label_count_accuracy",
    "seconds",
    "budget",
]


def key(cell: dict) -> tuple:
    return tuple(cell[c] for c in ("dataset", "attack", "victim", "batch", "threat", "seed"))


def threat_config(
    threat: str, batch: int, dtype: str = "auto", bn_mode: str = "train"
) -> AttackConfig:
    """The threat-model settings of a cell, as an AttackConfig (only those fields matter)."""
    common = dict(batch_size=batch, precision=dtype, bn_mode=bn_mode)
    if threat == "fedavg":
        return AttackConfig(
            threat="fedavg",
            local_steps=FEDAVG_STEPS,
            local_lr=FEDAVG_LR,
            local_batch_size=math.ceil(batch / FEDAVG_STEPS),
            **common,
        )
    if threat == "aggregate":
        return AttackConfig(threat="aggregate", clients=min(batch, AGGREGATE_CLIENTS), **common)
    return AttackConfig(**common)


def checkpoint_path(out: Path, victim: str) -> Path:
    model_name, act, _, _ = VICTIMS[victim]
    return out / "checkpoints" / f"{model_name}-{act}.pt"


def ensure_checkpoints(victims: list[str], out: Path, root: str, retrain: bool) -> dict:
    """Train (once) the checkpoints the trained victims load; returns their test accuracy."""
    from fl_core import load_checkpoint
    from leakage.app.cli import main as cli

    accuracy = {}
    for v in victims:
        if not VICTIMS[v][3]:
            continue
        path = checkpoint_path(out, v)
        if retrain or not path.exists():
            model_name, act, _, _ = VICTIMS[v]
            path.parent.mkdir(parents=True, exist_ok=True)
            t = TRAINING
            argv = ["train", "--model", model_name, "--activation", act, "--dataset", "cifar10"]
            argv += ["--data-root", root, "--limit", str(t["limit"]), "--epochs", str(t["epochs"])]
            argv += ["--batch-size", str(t["batch_size"]), "--lr", str(t["lr"])]
            argv += ["--momentum", str(t["momentum"]), "--seed", "0", "--out", str(path)]
            if cli([*argv, "--quiet"]) != 0:
                raise SystemExit(f"attack_suite: training {v} failed")
        _, meta = load_checkpoint(path)
        accuracy[path.stem] = meta["accuracy"]
    return accuracy


def victim_model(victim: str, data, dataset_name: str, seed: int, out: Path):
    """The cell's victim: a fresh seeded one with the data's input normalisation, or the
    suite's trained checkpoint (CIFAR-10's normalisation, whatever images it is attacked on)."""
    from fl_core import dataset_normalization, load_checkpoint

    model_name, act, _, trained = VICTIMS[victim]
    if trained:
        model, _ = load_checkpoint(checkpoint_path(out, victim))
        return model
    return build_model(
        model_name,
        num_classes=10,
        in_shape=data.shape,
        activation=act,
        normalize=None if victim.endswith("-raw") else dataset_normalization(dataset_name, data),
        generator=torch.Generator().manual_seed(seed),
    )


_DATA: dict[str, object] = {}


def dataset(name: str, root: str):
    if name not in _DATA:
        if name == "samples":
            _DATA[name] = load_samples()
        else:
            _DATA[name] = load_dataset(name, root=root, train=False)
    return _DATA[name]


def run_cell(dataset_name, attack, victim, batch, threat, seed, root, figs: Path) -> dict:
    data = dataset(dataset_name, root)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:batch].tolist()
    chosen = data.subset(idx)
    model = victim_model(victim, chosen, dataset_name, seed, figs.parent)
    cfg = threat_config(threat, batch, bn_mode=VICTIMS[victim][2])
    obs, gt = observe(cfg, model, chosen)
    options = BUDGETS[attack][0 if victim in SMALL else 1]
    atk = ATTACKS.build(attack, **options)
    start = time.perf_counter()
    rec = atk.reconstruct(obs, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    scores = score_images(rec.images, gt.images, data_range=1.0)
    torch.save(
        {"truth": gt.images, "reconstruction": rec.images[scores.order]},
        figs / f"{'-'.join(map(str, (dataset_name, attack, victim, batch, threat, seed)))}.pt",
    )
    return {
        "dataset": dataset_name,
        "attack": attack,
        "victim": victim,
        "batch": batch,
        "threat": threat,
        "seed": seed,
        "psnr": float(scores.psnr.clamp(max=100).mean()),
        "ssim": float(scores.ssim.mean()),
        "label_set_accuracy": label_set_accuracy(rec.labels.tolist(), gt.labels.tolist()),
        "label_count_accuracy": label_count_accuracy(rec.labels.tolist(), gt.labels.tolist()),
        "seconds": seconds,
        "budget": ", ".join(f"{k} {v}" for k, v in options.items()) or "closed form",
        "loss": rec.loss if math.isfinite(rec.loss) else None,
        "stopped": rec.stopped,
        "evaluations": rec.evaluations,
        "images": chosen.names,
        "threads": torch.get_num_threads(),
    }


def grid_cell(cell: tuple, root: str, figs: Path) -> dict:
    """The record of one cell, given as its ``key`` (run by :func:`leakage.app.sweep.run_cells`)."""
    return run_cell(*cell, root, figs)


ROW_KEY = ("dataset", "attack", "victim", "batch", "threat")
NUMERIC = ("psnr", "ssim", "label_set_accuracy", "label_count_accuracy", "seconds")


def read_table(path: Path) -> list[dict]:
    """Rows (means over seeds) of an earlier ``table.csv``, typed as :func:`write_tables`
    writes them (without its ``best`` column, which is recomputed)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["batch"], r["seeds"] = int(r["batch"]), int(r["seeds"])
        for m in NUMERIC:
            r[m] = float(r[m])
        r.pop("best", None)
    return rows


def cell_of(row: dict) -> tuple:
    """(dataset, victim, batch, threat): the cell a row's attack ran in."""
    return (row["dataset"], row["victim"], row["batch"], row["threat"])


def best_per_cell(rows: list[dict]) -> dict[tuple, dict]:
    """Per (dataset, victim, batch, threat): the row of the attack with the highest mean PSNR.

    The defender's worst case among the attacks the suite ran there: an attacker
    who sees the update can run them all, and the reconstruction that fits the
    update best is, for the exact attacks, the right one (see ``leakage.attacks.best``).
    Ties (exact recoveries are shown as 100 dB) go to the faster attack.
    """
    out: dict[tuple, dict] = {}
    for r in rows:
        k = cell_of(r)
        if k not in out or (r["psnr"], -r["seconds"]) > (out[k]["psnr"], -out[k]["seconds"]):
            out[k] = r
    return out


def write_tables(cells: list[dict], out: Path, earlier: list[dict] = ()) -> str:
    """Mean over seeds per (dataset, attack, victim, batch, threat); Markdown + CSV.

    ``earlier``: rows of an earlier table (:func:`read_table`) kept where this
    run's cells do not measure the same (dataset, attack, victim, batch, threat).
    The ``best`` column marks, in each (dataset, victim, batch, threat), the
    attack with the highest mean PSNR (:func:`best_per_cell`); a second table
    lists those cells.
    """
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault(key(c)[:5], []).append(c)
    measured = []
    for k, cs in groups.items():
        row = dict(zip(ROW_KEY, k))
        row["seeds"] = len(cs)
        for m in NUMERIC:
            row[m] = statistics.fmean(c[m] for c in cs)
        row["budget"] = cs[0]["budget"]
        measured.append(row)
    kept = [r for r in earlier if tuple(r[c] for c in ROW_KEY) not in groups]
    order = list(VICTIMS)
    rows = sorted(
        kept + measured,
        key=lambda r: (
            r["dataset"],
            r["attack"],
            order.index(r["victim"]),
            r["batch"],
            r["threat"],
        ),
    )
    best = best_per_cell(rows)
    for r in rows:
        r["best"] = "yes" if best[cell_of(r)] is r else ""
    buffer = io.StringIO()
    w = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "best"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "table.csv", buffer.getvalue())
    lines = [
        "| dataset | attack | victim | B | threat | seeds | PSNR dB | SSIM | label set | "
        "label count | s | budget | best |",
        "|---|---|---|--:|---|--:|--:|--:|--:|--:|--:|---|:-:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['victim']} | {r['batch']} | {r['threat']} "
            f"| {r['seeds']} | {r['psnr']:.1f} | {r['ssim']:.3f} | "
            f"{r['label_set_accuracy']:.2f} | {r['label_count_accuracy']:.2f} | "
            f"{r['seconds']:.1f} | {r['budget']} | {'**best**' if r['best'] else ''} |"
        )
    lines += [
        "",
        "Best attack per cell (highest mean PSNR among the attacks run there):",
        "",
        "| dataset | victim | B | threat | best attack | PSNR dB | SSIM | runner-up |",
        "|---|---|--:|---|---|--:|--:|---|",
    ]
    for k in sorted(best, key=lambda k: (k[0], order.index(k[1]), k[2], k[3])):
        b = best[k]
        others = sorted(
            (r for r in rows if cell_of(r) == k and r is not b), key=lambda r: -r["psnr"]
        )
        runner = f"{others[0]['attack']} {others[0]['psnr']:.1f}" if others else "–"
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {b['attack']} | {b['psnr']:.1f} | "
            f"{b['ssim']:.3f} | {runner} |"
        )
    md = "\n".join(lines) + "\n"
    write_atomic(out / "table.md", md)
    return md


def _show(ax, image: torch.Tensor, title: str) -> None:
    ax.imshow(image.permute(1, 2, 0).squeeze().numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)


def write_figure(cells: list[dict], out: Path) -> None:
    """Truth and reconstructions at batch 1, fedsgd: one row per victim, one column per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds in sorted({c["dataset"] for c in cells}):
        cs = [c for c in cells if (c["dataset"], c["batch"], c["threat"]) == (ds, 1, "fedsgd")]
        if not cs:
            continue
        seed = min(c["seed"] for c in cs)
        cs = [c for c in cs if c["seed"] == seed]
        victims = [v for v in VICTIMS if any(c["victim"] == v for c in cs)]
        attacks = [a for a in BUDGETS if any(c["attack"] == a for c in cs)]
        fig, axes = plt.subplots(
            len(victims),
            len(attacks) + 1,
            figsize=(1.5 * (len(attacks) + 1), 1.6 * len(victims)),
            squeeze=False,
        )
        for row, v in zip(axes, victims):
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
            row[0].set_ylabel(v, fontsize=7)
            for j, a in enumerate(attacks, start=1):
                c = next((c for c in cs if c["victim"] == v and c["attack"] == a), None)
                if c is None:
                    row[j].axis("off")
                    continue
                saved = torch.load(
                    out / "cells" / f"{'-'.join(map(str, key(c)))}.pt", weights_only=True
                )
                _show(row[0], saved["truth"][0], "truth")
                _show(row[j], saved["reconstruction"][0], f"{a} {c['psnr']:.1f} dB")
        fig.tight_layout()
        fig.savefig(out / f"grid-{ds}.png", dpi=120)
        plt.close(fig)


def restart_cost(args) -> None:
    """Wall time of a fixed budget with R restarts batched, against R = 1."""
    data = load_samples()
    lines = [
        "| attack | victim | restarts | iterations | seconds | x one restart |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for attack, victim, options in (
        ("ig", "lenet-sigmoid", {"steps": 200}),
        ("dlg", "lenet-sigmoid", {"steps": 5, "tol": 0.0, "early_stop": False, "batched": True}),
        ("ig", "resnet20", {"steps": 20}),
        ("ig", "resnet18-sigmoid", {"steps": 10}),
    ):
        if victim not in args.victims and victim != "lenet-sigmoid":
            continue
        model = victim_model(victim, data, "samples", 0, args.out)
        obs, _ = observe(AttackConfig(), model, data.subset([0]))
        base = None
        for r in args.restart_counts:
            atk = ATTACKS.build(attack, restarts=r, **options)
            atk.reconstruct(obs, generator=torch.Generator().manual_seed(0))  # warm-up
            start = time.perf_counter()
            rec = atk.reconstruct(obs, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
            base = seconds if r == 1 else base
            lines.append(
                f"| {attack} | {victim} | {r} | {rec.evaluations} evaluations | {seconds:.2f} | "
                f"{seconds / base:.2f} |"
            )
            print(lines[-1], flush=True)
    md = "\n".join(lines) + "\n"
    (args.out / "restart_cost.md").write_text(md)
    print(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--datasets", nargs="+", default=["cifar10"], help="cifar10 and/or samples")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--attacks", nargs="+", default=list(BUDGETS))
    p.add_argument("--victims", nargs="+", default=list(VICTIMS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--threats", nargs="+", default=["fedsgd", "fedavg", "aggregate"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/attack_suite"))
    p.add_argument("--restart-cost", action="store_true", help="measure batched restarts instead")
    p.add_argument("--restart-counts", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--retrain", action="store_true", help="train the trained victims anew")
    p.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier table.csv whose rows this run keeps where it measures nothing new "
        "(e.g. benchmarks/results/attack_suite.csv)",
    )
    add_parallel_args(p)
    args = p.parse_args(argv)
    for v in args.victims:
        if v not in VICTIMS:
            p.error(f"unknown victim {v!r}; valid: {', '.join(VICTIMS)}")
    for a in args.attacks:
        if a not in BUDGETS:
            p.error(f"unknown attack {a!r}; valid: {', '.join(BUDGETS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.restart_cost:
        restart_cost(args)
        return 0
    figs = args.out / "cells"
    figs.mkdir(exist_ok=True)
    path = args.out / "cells.jsonl"
    todo = [
        (d, a, v, b, t, s)
        for d in args.datasets
        for v in args.victims
        for a in args.attacks
        for b in args.batch_sizes
        for t in args.threats
        for s in args.seeds
        if in_scope(a, v, b)
    ]
    try:  # before any training: a bad parallel option costs nothing
        check_parallel(**parallel_options(args))
    except ValueError as e:
        p.error(str(e))
    if todo:
        accuracy = ensure_checkpoints(args.victims, args.out, args.data_root, args.retrain)
        for name, acc in accuracy.items():
            print(f"trained victim {name}: CIFAR-10 test accuracy {acc:.3f}", flush=True)
    position = {cell_key: n for n, cell_key in enumerate(todo)}

    def show(cell_key: tuple, cell: dict) -> None:
        print(
            f"[{position[cell_key] + 1}/{len(todo)}] {' '.join(map(str, cell_key))}: "
            f"{cell['psnr']:.1f} dB, labels {cell['label_count_accuracy']:.2f}, "
            f"{cell['seconds']:.1f} s",
            flush=True,
        )

    fn = functools.partial(ScriptFunction(__file__, "grid_cell"), root=args.data_root, figs=figs)
    try:  # a cell the attack cannot handle (ValueError) is skipped with a line on stderr
        run_cells(todo, fn, store=path, key=key, on_record=show, **parallel_options(args))
    except ValueError as e:  # the parallel options: say what to fix
        p.error(str(e))
    cells = load_records(path)
    earlier = read_table(args.merge) if args.merge else []
    print(write_tables(cells, args.out, earlier))
    write_figure(cells, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
