"""The privacy-utility frontier: what each defense buys against the attacks and costs the model.

For every defense over a grid of strengths (``GRID``) the sweep measures both
sides with the same defense parameters:

* **privacy**: DLG, iDLG, inverting gradients (IG) and R-GAP against one
  client's FedSGD gradient of a single image (honest-but-curious server), for
  each of a fixed set of test images (indices ``0 .. --images−1`` of the test
  split), on an untrained victim (LeNet with sigmoids, the DLG paper's victim); PSNR and SSIM of the
  reconstruction and the accuracy of the recovered label;
* **utility**: test accuracy after ``--rounds`` FedSGD rounds of ``--clients``
  IID clients (every client every round, local batch ``--batch-size``, server
  step ``--server-lr``), the defense applied to every client update (or DP-SGD
  training, for ``dpsgd``), from the same initial weights;
* **epsilon** for DP-SGD, from Opacus's accountant over the utility run's
  rounds and sampling (each client's local dataset, δ = 1e-5).

Each finished measurement (one attack on one image, or one utility run) is
appended to ``<out>/records.jsonl`` at once; an interrupted sweep resumes
without redoing finished ones, and ``--report`` rebuilds the Markdown report
(``report.md``, with the DLG paper's defense findings next to the lab's),
``table.csv``, one plot per defense and the combined frontier from that file.
Disjoint ``--families`` may run in separate processes on the same ``--out``, and
``--workers N`` runs N measurements at once (Ray, or a process pool;
``--ray-address`` for a cluster; see :mod:`leakage.app.sweep`) with the same records.

    python benchmarks/privacy_utility.py                       # Fashion-MNIST, full grid
    python benchmarks/privacy_utility.py --families gaussian prune --images 2
    python benchmarks/privacy_utility.py --report              # tables and plots only
    python benchmarks/privacy_utility.py --workers 2           # two measurements at once
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from defenses import build_plan
from fl_core import build_model, load_dataset
from fl_core.client import Client, LocalTraining
from fl_core.partition import partition_iid
from fl_core.server import Server
from fl_core.train import evaluate_accuracy
from leakage import ATTACKS, score_images
from leakage.app.experiment import AttackConfig, dp_ready, observe_round
from leakage.app.store import load_records, write_atomic
from leakage.app.sweep import ScriptFunction, add_parallel_args, parallel_options, run_cells
from leakage.metrics import label_accuracy

VARIANCES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
GRID: dict[str, list[tuple[str, list[dict]]]] = {
    "none": [("none", [])],
    "clip": [(f"C={c:g}", [{"clip": {"max_norm": c}}]) for c in (2.0, 0.5, 0.1)],
    "gaussian": [(f"var={v:g}", [{"gaussian": {"sigma": math.sqrt(v)}}]) for v in VARIANCES],
    "laplace": [(f"var={v:g}", [{"laplace": {"scale": math.sqrt(v / 2)}}]) for v in VARIANCES],
    "prune": [
        (f"{r:.0%}", [{"prune": {"ratio": r}}]) for r in (0.01, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    ],
    "quantize": [(f, [{"quantize": {"format": f}}]) for f in ("fp16", "bf16", "int8")],
    "dpsgd": [
        (f"z={z:g}", [{"dpsgd": {"noise_multiplier": z, "max_grad_norm": 1.0}}])
        for z in (0.01, 0.1, 0.5, 1.0, 2.0)
    ],
}
ATTACK_BUDGETS = {  # attack -> options (one restart each: the sweep has ~400 attack runs)
    "dlg": {"steps": 200, "restarts": 1},
    "idlg": {"steps": 200, "restarts": 1},
    "ig": {"steps": 2000, "restarts": 1},
    # R-GAP (Zhu & Blaschko 2021): closed form, batch 1, the sigmoid LeNet is in its scope.
    # Added after the first three; records of a sweep without it stay valid (check_settings).
    "rgap": {},
    # The best meta-attack (leakage.attacks.best): R-GAP, IG and DLG at the budgets above,
    # the fit to the update decides, and on a pruned update IG and DLG match only the
    # kept entries (the adaptive attack). Run on the families where adapting matters.
    "best": {"steps": 2000, "dlg_steps": 200, "restarts": 1},
}
CORE_ATTACKS = ("dlg", "idlg", "ig")
"""A point counts in the headlines when these ran on all its images; the others
(added later, or run on some families only) join the best-of where they ran."""
WORKS, DEFEATED = 20.0, 12.0  # DLG PSNR (dB) above which it "works", below which it is "defeated"


def record_key(r: dict) -> tuple:
    return (r["dataset"], r["family"], r["strength"], r["part"], r.get("attack"), r.get("image"))


class Sweep:
    """Data, victim and settings shared by every point of one dataset's sweep."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        root = args.data_root
        self.test = load_dataset(args.dataset, root=root, train=False)
        self.train = load_dataset(args.dataset, root=root, train=True, limit=args.train_limit)
        g = torch.Generator().manual_seed(args.seed)
        self.eval_idx = torch.randperm(len(self.test), generator=g)[: args.test_limit]

    def victim(self, *, utility: bool = False):
        """The attacked victim, or (``utility``) the model the FL run trains."""
        a = self.args
        return build_model(
            a.utility_model if utility else a.model,
            in_shape=self.test.shape,
            activation=a.utility_activation if utility else a.activation,
            generator=torch.Generator().manual_seed(a.seed),
        )

    def attack(self, defenses: list[dict], attack: str, image: int) -> dict:
        """One attack on one image's FedSGD gradient under ``defenses``."""
        cfg = AttackConfig(defenses=defenses, seed=self.args.seed)
        model, _ = dp_ready(self.victim(), cfg.defenses)
        obs, gt, clients, plan = observe_round(cfg, model, self.test.subset([image]))
        privacy = {}
        if plan.client_wrapper is not None:  # the ε of the very update attacked (q = 1, 1 step)
            from defenses import privacy_report

            privacy = {"attack_epsilon": privacy_report(clients, plan.delta)["epsilon"]}
        options = dict(ATTACK_BUDGETS[attack])
        if self.args.attack_steps is not None:
            options["steps"] = self.args.attack_steps
        atk = ATTACKS.build(attack, **options)
        start = time.perf_counter()
        rec = atk.reconstruct(obs, generator=torch.Generator().manual_seed(self.args.seed))
        seconds = time.perf_counter() - start
        scores = score_images(rec.images, gt.images, data_range=1.0)
        return {
            "psnr": float(scores.psnr.clamp(max=100).mean()),
            "ssim": float(scores.ssim.mean()),
            "label_accuracy": label_accuracy(rec.labels.tolist(), gt.labels.tolist()),
            "seconds": seconds,
            "update_norm": obs.update.norm(),
            **({"chosen": rec.options["chosen"]} if "chosen" in rec.options else {}),
            **privacy,
        }

    def utility(self, defenses: list[dict]) -> dict:
        """Test accuracy after the FedSGD run under ``defenses`` (and ε for DP-SGD)."""
        a = self.args
        plan = build_plan(defenses)
        parts = partition_iid(len(self.train), a.clients, seed=a.seed)
        training = LocalTraining("fedsgd", batch_size=a.batch_size)
        clients = plan.wrap_clients(
            [
                Client(i, self.train.images[p], self.train.labels[p], training=training)
                for i, p in enumerate(parts)
            ]
        )
        model, converted = dp_ready(self.victim(utility=True), plan.entries)
        server = Server(model, clients, server_lr=a.server_lr, seed=a.seed, **plan.server_kwargs())
        start = time.perf_counter()
        server.run(a.rounds)
        x, y = self.test.images[self.eval_idx], self.test.labels[self.eval_idx]
        out = {"accuracy": evaluate_accuracy(model, x, y), "seconds": time.perf_counter() - start}
        if plan.client_wrapper is not None:
            from defenses import privacy_report

            report = privacy_report(clients, plan.delta)
            out["epsilon"] = report["epsilon"]
            out["delta"] = report["delta"]
            out["sample_rate"] = report["sample_rate"]
            out["steps"] = report["steps"]
            out["victim_converted"] = converted
        return out


SETTINGS = (
    "dataset", "images", "attack_steps", "model", "activation", "utility_model",
    "utility_activation", "rounds", "clients", "batch_size",
    "server_lr", "train_limit", "test_limit", "seed",
)  # fmt: skip


def check_settings(args: argparse.Namespace) -> None:
    """Record the sweep's settings in ``<out>/settings.json``; refuse to mix different ones."""
    path = args.out / "settings.json"
    mine = {k: getattr(args, k) for k in SETTINGS}
    mine["grid"] = json.loads(json.dumps({"defenses": GRID, "attacks": ATTACK_BUDGETS}))
    if path.exists():
        stored = json.loads(path.read_text())
        # an attack added to ATTACK_BUDGETS since the sweep began keeps its records valid:
        # the stored attacks must keep their budgets, new ones are recorded
        old = stored.get("grid", {}).get("attacks", {})
        added = {a: o for a, o in mine["grid"]["attacks"].items() if a not in old}
        if stored.get("grid") and all(mine["grid"]["attacks"].get(a) == o for a, o in old.items()):
            stored["grid"]["attacks"] = {**old, **added}
        diff = sorted(k for k in mine if stored.get(k) != mine[k])
        if added and not diff:
            write_atomic(path, json.dumps(stored, indent=2) + "\n")
        if diff:
            raise SystemExit(
                f"privacy_utility: {args.out} holds a sweep with other settings ({', '.join(diff)}"
                f"): use those or another --out"
            )
    else:
        path.write_text(json.dumps(mine, indent=2) + "\n")


_SWEEPS: dict[tuple, Sweep] = {}  # per process: the data and victim of the current setting


def measure(cell: tuple, args: argparse.Namespace) -> dict:
    """The record of one measurement, given as its ``record_key`` (run by
    :func:`leakage.app.sweep.run_cells`, in this process or in a worker)."""
    dataset, family, strength, part, attack, image = cell
    settings = (args.data_root, *(getattr(args, k) for k in SETTINGS))
    if settings not in _SWEEPS:
        _SWEEPS.clear()  # one setting at a time: the datasets are large
        _SWEEPS[settings] = Sweep(args)
    sweep = _SWEEPS[settings]
    defenses = dict(GRID[family])[strength]
    if part == "utility":
        result = sweep.utility(defenses)
    else:
        result = sweep.attack(defenses, attack, image)
    base = {"dataset": dataset, "family": family, "strength": strength, "defenses": defenses}
    return {**base, "part": part, "attack": attack, "image": image, **result}


def run(args: argparse.Namespace) -> None:
    jobs = [("utility", None, None)] + [
        ("attack", attack, image) for attack in args.attacks for image in range(args.images)
    ]
    cells = [
        (args.dataset, family, strength, *job)
        for family in args.families
        for strength, _ in GRID[family]
        for job in jobs
    ]

    def show(cell: tuple, record: dict) -> None:
        _, family, strength, part, attack, _ = cell
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        print(f"{family:9s} {strength:10s} {part:8s} {attack or '':5s} {shown}", flush=True)

    settings = argparse.Namespace(**{k: getattr(args, k) for k in ("data_root", *SETTINGS)})
    run_cells(  # a point its setting cannot run (ValueError) is skipped with a line on stderr
        cells,
        functools.partial(ScriptFunction(__file__, "measure"), args=settings),
        store=args.out / "records.jsonl",
        key=record_key,
        on_record=show,
        **parallel_options(args),
    )


# ----------------------------------------------------------------------------- report


def summarise(records: list[dict]) -> list[dict]:
    """One row per (family, strength): utility, ε, and each attack's means over images."""
    rows: dict[tuple, dict] = {}
    order = {(f, s): i for i, (f, pts) in enumerate(GRID.items()) for s, _ in [*pts]}
    for r in records:
        row = rows.setdefault(
            (r["family"], r["strength"]), {"family": r["family"], "strength": r["strength"]}
        )
        if r["part"] == "utility":
            row["accuracy"] = r["accuracy"]
            row["epsilon"] = r.get("epsilon")
        else:
            row.setdefault(r["attack"], []).append(r)
            if "attack_epsilon" in r:
                row["attack_epsilon"] = r["attack_epsilon"]
    out = []
    for k in sorted(rows, key=lambda k: order.get(k, 1e9)):
        row = rows[k]
        for attack in ATTACK_BUDGETS:
            runs = row.pop(attack, [])
            for metric in ("psnr", "ssim", "label_accuracy"):
                row[f"{attack}_{metric}"] = (
                    statistics.fmean(r[metric] for r in runs) if runs else None
                )
            row[f"{attack}_n"] = len(runs)
        psnrs = {a: row[f"{a}_psnr"] for a in ATTACK_BUDGETS if row[f"{a}_psnr"] is not None}
        # the defender's worst case: the attack with the highest mean PSNR at this point
        row["top_attack"] = max(psnrs, key=psnrs.get) if psnrs else None
        row["top_psnr"] = psnrs[row["top_attack"]] if psnrs else None
        counts = {row[f"{a}_n"] for a in ATTACK_BUDGETS} - {0}
        core = [a for a in CORE_ATTACKS if a in ATTACK_BUDGETS]
        row["complete"] = len(counts) == 1 and all(row[f"{a}_n"] for a in core)
        out.append(row)
    return out


def _fmt(v, digits=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (v > 1e4 or (0 < abs(v) < 10**-digits)):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def verdict(psnr: float | None) -> str:
    if psnr is None:
        return "not measured"
    if psnr >= WORKS:
        return "works"
    return "defeated" if psnr < DEFEATED else "degraded"


def dlg_findings(rows: list[dict]) -> list[str]:
    """The DLG paper's defense claims (Zhu et al. 2019, section 5) next to the lab's numbers."""
    by = {(r["family"], r["strength"]): r for r in rows}

    def dlg(family, strength):
        r = by.get((family, strength))
        return None if r is None else r.get("dlg_psnr")

    lines = [
        "| claim (DLG paper) | setting | DLG PSNR here (dB) | lab's verdict | holds? |",
        "|---|---|---|---|---|",
    ]
    claims = []
    for fam in ("gaussian", "laplace"):
        claims += [
            (f"{fam} variance 1e-4 leaves the attack working", fam, "var=0.0001", "works"),
            (f"{fam} variance 1e-3 degrades it", fam, "var=0.001", "degraded"),
            (f"{fam} variance 1e-2 defeats it", fam, "var=0.01", "defeated"),
            (f"{fam} variance 1e-1 defeats it", fam, "var=0.1", "defeated"),
        ]
    claims += [
        ("pruning 10% leaves the attack working", "prune", "10%", "works"),
        ("pruning 20% still leaks", "prune", "20%", "works"),
        ("pruning more than 20% defeats it", "prune", "30%", "defeated"),
        ("pruning more than 20% defeats it", "prune", "50%", "defeated"),
        ("fp16 does not protect", "quantize", "fp16", "works"),
    ]
    for text, fam, strength, expected in claims:
        p = dlg(fam, strength)
        got = verdict(p)
        holds = "–" if p is None else ("yes" if got == expected else "no")
        lines.append(f"| {text} | {fam} {strength} | {_fmt(p, 1)} | {got} | {holds} |")
    return lines


def headlines(rows: list[dict], test_n: int) -> list[str]:
    """Per defense: the weakest strength at which every attack is defeated, and its cost."""
    base = next((r for r in rows if r["family"] == "none"), None)
    if base is None or base.get("accuracy") is None:
        return ["(the undefended point is not measured yet)"]
    lines = [
        f"Undefended: test accuracy {base['accuracy']:.3f}; "
        f"best attack {_fmt(base['top_psnr'], 1)} dB ({base['top_attack']}).",
        "",
        "| defense | weakest strength defeating every attack (best mean PSNR < "
        f"{DEFEATED:g} dB) | best PSNR there (attack) | test acc. there | accuracy cost | "
        "ε of the attacked update | ε of the training run |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in GRID:
        if family == "none":
            continue
        pts = [r for r in rows if r["family"] == family and r["complete"]]
        if not pts:
            continue
        hit = next((r for r in pts if r["top_psnr"] is not None and r["top_psnr"] < DEFEATED), None)
        if hit is None:
            low = min(
                (r for r in pts if r["top_psnr"] is not None),
                key=lambda r: r["top_psnr"],
                default=None,
            )
            shown = "–" if low is None else f"{_fmt(low['top_psnr'], 1)} dB, {low['top_attack']}"
            lines.append(
                f"| {family} | none in the grid (lowest best PSNR {shown}) | – | – | – | – | – |"
            )
            continue
        acc = hit.get("accuracy")
        cost = None if acc is None else base["accuracy"] - acc
        lines.append(
            f"| {family} | {hit['strength']} | {_fmt(hit['top_psnr'], 1)} ({hit['top_attack']}) "
            f"| {_fmt(acc, 3)} | "
            f"{_fmt(cost, 3)} | {_fmt(hit.get('attack_epsilon'))} | {_fmt(hit.get('epsilon'))} |"
        )
    se = math.sqrt(base["accuracy"] * (1 - base["accuracy"]) / test_n)
    mild = [  # settings too weak to stop DLG: their spread is run-to-run training variation
        r["accuracy"]
        for r in rows
        if r["family"] in ("none", "gaussian", "laplace", "prune", "quantize")
        and r.get("accuracy") is not None
        and (r.get("dlg_psnr") or 0) >= WORKS
    ]
    lines += [
        "",
        "Only points where DLG, iDLG and IG ran on the same images count (R-GAP and best join "
        "the best-of where they ran). PSNR is the mean over "
        "the attacked images. Accuracy comes from one training run per point: the standard "
        f"error of the test sample alone is about {se:.3f}, and runs also differ in their "
        "noise draws and so in their trajectories; the settings too weak to stop DLG "
        f"(≥ {WORKS:g} dB; noise, pruning, quantisation) span accuracies "
        f"{min(mild, default=math.nan):.3f}-{max(mild, default=math.nan):.3f}, a measure of "
        "that run-to-run variation. Smaller accuracy costs are not resolved.",
    ]
    return lines


def write_report(args: argparse.Namespace) -> str:
    records = load_records(args.out / "records.jsonl")
    rows = summarise([r for r in records if r["dataset"] == args.dataset])
    if not rows:
        return "no records yet"
    cols = ["family", "strength", "attack_epsilon", "epsilon", "accuracy"] + [
        f"{a}_{m}" for a in ATTACK_BUDGETS for m in ("psnr", "ssim", "label_accuracy")
    ]
    cols += ["top_attack", "top_psnr"]
    with (args.out / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c) for c in cols])
    head = "| defense | strength | ε attacked update | ε training run | test acc. | " + " | ".join(
        f"{a.upper()} PSNR / SSIM / label" for a in ATTACK_BUDGETS
    )
    head += " | best: attack, PSNR"
    table = [head + " |", "|" + "---|" * (6 + len(ATTACK_BUDGETS))]
    for r in rows:
        cells = [
            f"{_fmt(r[f'{a}_psnr'], 1)} / {_fmt(r[f'{a}_ssim'])} / {_fmt(r[f'{a}_label_accuracy'])}"
            for a in ATTACK_BUDGETS
        ]
        table.append(
            f"| {r['family']} | {r['strength']} | {_fmt(r.get('attack_epsilon'))} | "
            f"{_fmt(r.get('epsilon'))} | "
            f"{_fmt(r.get('accuracy'), 3)} | "
            + " | ".join(cells)
            + f" | {r['top_attack'] or '–'}, {_fmt(r['top_psnr'], 1)} |"
        )
    plot_families(rows, args.out)
    a = args
    text = "\n".join(
        [
            f"# Privacy-utility frontier: {a.dataset}",
            "",
            "Generated by `python benchmarks/privacy_utility.py "
            f"--dataset {a.dataset}` (then `--report`). Do not edit by hand.",
            "",
            "## Setting",
            "",
            f"- Victim: `{a.model}` ({a.activation}), untrained, initial weights from seed "
            f"{a.seed}; the same weights start every utility run.",
            f"- Privacy: one client's FedSGD gradient of one image, test images 0-{a.images - 1}; "
            "attacks "
            + ", ".join(
                f"{k} ({', '.join(f'{o} {v}' for o, v in opts.items())})"
                for k, opts in ATTACK_BUDGETS.items()
            )
            + (f" (steps overridden: {a.attack_steps})" if a.attack_steps else "")
            + ". PSNR/SSIM are means over the images; label = recovered-label accuracy.",
            f"- Utility: `{a.utility_model}` ({a.utility_activation})"
            + (
                " (a different model from the attacked victim: the sigmoid victim does not learn "
                "this dataset in the run's budget)"
                if a.utility_model != a.model
                else ""
            )
            + f", {a.rounds} FedSGD rounds, {a.clients} IID clients (all every round) "
            f"sharing {a.train_limit} training images, local batch {a.batch_size}, server lr "
            f"{a.server_lr}; test accuracy on {a.test_limit} test images. The defense acts on "
            "every client's update; `dpsgd` clients train with Opacus (max_grad_norm 1, Poisson "
            "sampling); ε (δ = 1e-5) is Opacus's RDP accountant, record-level, for each "
            "client's data, client sampling not counted.",
            "- In the attack runs the client holds just the attacked image (DP-SGD sample rate "
            "1, one step): the defense's parameters are the same on both sides, the noise "
            "relative to the signal is not (a batch-32 gradient averages per-sample gradients). "
            "Hence two ε: that of the attacked update (one step at q = 1) and that of the "
            "training run (all its steps at q = batch / client images).",
            "- Strengths: `var` is the noise variance per entry (Gaussian σ = √var; Laplace "
            "b = √(var/2)); prune % = fraction of entries zeroed; `C` = clipping bound; `z` = "
            "DP-SGD noise multiplier.",
            "",
            "## Headlines",
            "",
            *headlines(rows, a.test_limit),
            "",
            "## Results",
            "",
            *table,
            "",
            "![frontier](frontier.png)",
            "",
            "## The DLG paper's defense findings, re-derived",
            "",
            f"Verdicts from DLG's mean PSNR: works ≥ {WORKS:g} dB, defeated < {DEFEATED:g} dB, "
            "degraded in between (the paper judged by eye; these thresholds are the lab's).",
            "",
            *dlg_findings(rows),
            "",
            "## Plots",
            "",
            *[f"![{f}]({f}.png)" for f in GRID if f != "none" and (args.out / f"{f}.png").exists()],
            "",
        ]
    )
    (args.out / "report.md").write_text(text)
    return text


def plot_families(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["family"] == "none"), None)
    colors = {"dlg": "tab:blue", "idlg": "tab:orange", "ig": "tab:green"}
    families = [f for f in GRID if f != "none"]
    for family in families:
        pts = [r for r in rows if r["family"] == family and r.get("accuracy") is not None]
        if not pts:
            continue
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
        for attack, color in colors.items():
            xs = [r["accuracy"] for r in pts if r[f"{attack}_psnr"] is not None]
            ys = [r[f"{attack}_psnr"] for r in pts if r[f"{attack}_psnr"] is not None]
            ax.plot(xs, ys, "o-", color=color, label=attack.upper(), alpha=0.8)
        for i, r in enumerate(pts):
            if r["top_psnr"] is not None:  # staggered, so clustered points stay readable
                ax.annotate(
                    r["strength"],
                    (r["accuracy"], r["top_psnr"]),
                    fontsize=7,
                    xytext=(5, 4 + 9 * (i % 3)),
                    textcoords="offset points",
                )
        if base and base.get("accuracy") is not None and base["top_psnr"] is not None:
            ax.plot(base["accuracy"], base["top_psnr"], "k*", ms=12, label="no defense")
        ax.set_xlabel("test accuracy after FL training")
        ax.set_ylabel("reconstruction PSNR (dB)")
        ax.set_title(f"{family}: privacy vs utility")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ticks = [
            r["strength"] + (f"\nε={r['epsilon']:.3g}" if r.get("epsilon") is not None else "")
            for r in pts
        ]
        x = range(len(pts))
        for attack, color in colors.items():
            bx.plot(x, [r[f"{attack}_psnr"] for r in pts], "o-", color=color, alpha=0.8)
        bx.set_ylabel("reconstruction PSNR (dB)")
        bx.set_xticks(list(x), ticks, fontsize=7)
        bx.set_xlabel("strength")
        bx.grid(alpha=0.3)
        acc = bx.twinx()
        acc.plot(x, [r["accuracy"] for r in pts], "s--", color="black", label="test accuracy")
        acc.set_ylabel("test accuracy")
        acc.legend(fontsize=8, loc="upper right")
        bx.set_title(f"{family}: by strength")
        fig.tight_layout()
        fig.savefig(out / f"{family}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 5))
    for family in families:
        pts = [r for r in rows if r["family"] == family]
        pts = [r for r in pts if r.get("accuracy") is not None and r["top_psnr"] is not None]
        if pts:
            ax.plot(
                [r["accuracy"] for r in pts],
                [r["top_psnr"] for r in pts],
                "o-",
                label=family,
                alpha=0.8,
            )
    if base and base.get("accuracy") is not None and base["top_psnr"] is not None:
        ax.plot(base["accuracy"], base["top_psnr"], "k*", ms=14, label="no defense")
    ax.set_xlabel("test accuracy after FL training (higher: more useful)")
    ax.set_ylabel("best attack's PSNR, dB (lower: more private)")
    names = ", ".join(a.upper() if a != "rgap" else "R-GAP" for a in ATTACK_BUDGETS)
    ax.set_title(f"privacy-utility frontier (best of {names})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist or cifar10")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--families", nargs="+", default=list(GRID), help=", ".join(GRID))
    p.add_argument("--attacks", nargs="+", default=list(ATTACK_BUDGETS))
    p.add_argument("--images", type=int, default=8, help="attacked test images (indices 0..N-1)")
    p.add_argument(
        "--attack-steps", type=int, default=None, help="override every attack's steps (smoke runs)"
    )
    p.add_argument("--model", default="lenet")
    p.add_argument("--activation", default="sigmoid")
    p.add_argument(
        "--utility-model", default=None, help="model the FL run trains (default: --model)"
    )
    p.add_argument(
        "--utility-activation", default=None, help="its activation (default: --activation)"
    )
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--server-lr", type=float, default=0.5)
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default benchmarks/results/privacy_utility/<dataset>",
    )
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    add_parallel_args(p)
    args = p.parse_args(argv)
    for f in args.families:
        if f not in GRID:
            p.error(f"unknown defense family {f!r}; valid: {', '.join(GRID)}")
    for a in args.attacks:
        if a not in ATTACK_BUDGETS:
            p.error(f"unknown attack {a!r}; valid: {', '.join(ATTACK_BUDGETS)}")
    if min(args.images, args.rounds, args.clients, args.batch_size) < 1:
        p.error("--images, --rounds, --clients and --batch-size must be positive")
    args.out = args.out or Path("benchmarks/results/privacy_utility") / args.dataset
    if args.utility_model is None:
        args.utility_model = args.model
        if args.utility_activation is None:
            args.utility_activation = args.activation
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "settings.json").exists() and args.report:
        vars(args).update(json.loads((args.out / "settings.json").read_text()))
    check_settings(args)
    if not args.report:
        try:
            run(args)
        except ValueError as e:  # the parallel options: say what to fix
            p.error(str(e))
    print(write_report(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
