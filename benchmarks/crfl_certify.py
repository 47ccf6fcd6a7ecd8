"""CRFL on MNIST: train with clipping + noise, certify by parameter smoothing, accuracy vs radius.

Xie, Chen, Chen, Li, "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021. Each model is trained by ``fl_core`` FedAvg (IID clients, all
of them every round, plain local SGD) with :class:`defenses.crfl.CRFL` after each
aggregation: clip the global parameters to ρ_t = 0.1 t + 2, add N(0, σ²), σ = 0.01;
the last round is clipped only, as the reference saves its model. The final model is
then certified on a fixed random subset of the test split with M = 1000 noisy
copies and Hoeffding bounds holding jointly at level 1 − α, α = 0.001, by a union
bound over the classes (:func:`defenses.crfl.certify`), giving
per-sample certified radii on the L2 norm of a backdoor trigger for the threat
model of the reference's MNIST plots: one attacker (R = 1) in round t_adv = 10
scaling its update by γ = 10, with 5 of every 100 local images poisoned.

Models and schedules (``--models``; any schedule flag overrides both presets):

* ``logreg``: multinomial logistic regression, the reference's MNIST model, on the
  reference's MNIST schedule: 60,000 images over N = 20 clients, batch 100, one
  local epoch (τ = 30 steps), η = 0.001, T = 100 rounds. Its L_Z = sqrt(2 + 2ρ + ρ²)
  (ρ = ρ_{t_adv} = 3) is the reference's constant for this model.
* ``cnn``: the lab's small ReLU CNN on a reduced schedule that runs in about two
  minutes on one core: 10,000 images over N = 10 clients, batch 50, one local epoch
  (τ = 20), η = 0.1, T = 30. The radius uses the same L_Z, which is not a proven
  constant for a CNN, and shrinks as 1/(η τ): read its radii as nominal.

Writes ``certified_accuracy.md`` (tables, settings, command), ``certified_accuracy.png``
(curves), ``certified_samples.csv`` (per-sample votes, bounds, radius) and
``summary.json`` to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/crfl_certify.py
    OMP_NUM_THREADS=1 python benchmarks/crfl_certify.py --models logreg --num-models 200
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from defenses.crfl import CRFL, CertifyResult, ThreatModel, certified_accuracy, certify
from fl_core import (
    Client,
    LocalTraining,
    Server,
    build_model,
    count_parameters,
    evaluate_accuracy,
    load_dataset,
    partition_iid,
)


@dataclass(frozen=True)
class Schedule:
    """One model and its FedAvg schedule."""

    model: str
    options: tuple[tuple[str, int], ...]
    train_limit: int | None
    num_clients: int
    batch_size: int
    local_steps: int
    lr: float
    rounds: int
    note: str


PRESETS = {
    "logreg": Schedule("mlp", (("depth", 1),), None, 20, 100, 30, 0.001, 100, "reference schedule"),
    "cnn": Schedule("cnn", (), 10_000, 10, 50, 20, 0.1, 30, "reduced schedule"),
}
SAMPLE_COLUMNS = [
    "model",
    "index",
    "name",
    "label",
    "top_class",
    "prediction",
    "votes_top",
    "votes_runner_up",
    "pa_lower",
    "pb_upper",
    "radius",
    "correct",
]


def schedule_for(name: str, args: argparse.Namespace) -> Schedule:
    """The preset of ``name`` with the schedule flags given on the command line."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    s = PRESETS[name]
    overrides = {
        "train_limit": args.train_limit,
        "num_clients": args.clients,
        "batch_size": args.batch_size,
        "local_steps": args.local_steps,
        "lr": args.lr,
        "rounds": args.rounds,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(s, **given, note=s.note + (" (overridden)" if given else ""))


def nice_step(span: float, parts: int = 6) -> float:
    """A round step (1, 2, 2.5 or 5 × 10^k) cutting ``span`` into about ``parts`` pieces."""
    if not span > 0:
        return 1.0
    raw = span / parts
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def run_model(name: str, args: argparse.Namespace, train, test, test_full) -> dict:
    s = schedule_for(name, args)
    if not 1 <= args.attack_round <= s.rounds:
        raise ValueError(f"--attack-round {args.attack_round}: use 1 .. rounds ({s.rounds})")
    data = (
        train
        if s.train_limit is None
        else train.subset(list(range(min(s.train_limit, len(train)))))
    )
    parts = partition_iid(len(data), s.num_clients, seed=args.seed)
    training = LocalTraining(
        "fedavg", batch_size=s.batch_size, local_steps=s.local_steps, lr=s.lr, momentum=0.0
    )
    clients = [
        Client(i, data.images[p], data.labels[p], training=training) for i, p in enumerate(parts)
    ]
    model = build_model(
        s.model,
        num_classes=train.num_classes,
        in_shape=train.shape,
        activation="relu",
        generator=torch.Generator().manual_seed(args.seed),
        **dict(s.options),
    )
    defense = CRFL(
        sigma=args.sigma, rho_slope=args.rho_slope, rho_offset=args.rho_offset, rounds=s.rounds
    )
    server = Server(
        model,
        clients,
        post_aggregation=[defense],
        evaluate=lambda m: {"accuracy": evaluate_accuracy(m, test.images, test.labels)},
        seed=args.seed,
    )
    start = time.perf_counter()
    records = server.run(s.rounds, progress=args.progress)
    train_s = time.perf_counter() - start
    threat = ThreatModel(
        rounds=s.rounds,
        attack_round=args.attack_round,
        lr=s.lr,
        local_steps=s.local_steps,
        num_clients=s.num_clients,
        num_attackers=args.attackers,
        scale_factor=args.scale_factor,
        poison_ratio=args.poison_ratio,
    )
    start = time.perf_counter()
    result = certify(
        model,
        test.images,
        test.labels,
        defense=defense,
        threat=threat,
        sigma=args.sigma_test,
        num_models=args.num_models,
        alpha=args.alpha,
        generator=torch.Generator().manual_seed(args.seed + 1),
        batch_size=args.eval_batch_size,
        progress=args.progress,
    )
    certify_s = time.perf_counter() - start
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    return {
        "name": name,
        "schedule": s,
        "threat": threat,
        "defense": defense,
        "result": result,
        "parameters": count_parameters(model),
        "train_images": len(data),
        "final_norm": norm,
        "rho_T": defense.rho(s.rounds),
        "lipschitz": threat.lipschitz_constant(defense),
        "accuracy_subset": evaluate_accuracy(model, test.images, test.labels),
        "accuracy_full": evaluate_accuracy(model, test_full.images, test_full.labels),
        "round_accuracy": [r.metrics["accuracy"] for r in records],
        "train_s": train_s,
        "certify_s": certify_s,
    }


def summarize(run: dict, radii: list[float] | None) -> dict:
    res: CertifyResult = run["result"]
    certified = res.prediction >= 0
    r_max = float(res.radius.max())
    if radii is None:
        step = nice_step(r_max, parts=8)
        radii = sorted({k * step for k in range(int(r_max // step) + 2)} | {r_max})
    return {
        "smoothed_top_vote_accuracy": float((res.top_class == res.labels).double().mean()),
        "smoothed_accuracy": float(res.correct.double().mean()),
        "abstain_rate": float((~certified).double().mean()),
        "median_radius": float(res.radius[res.correct].median()) if res.correct.any() else 0.0,
        "max_radius": r_max,
        "radii": radii,
        "certified_accuracy": certified_accuracy(res, radii),
    }


def jsonable(x):
    """``x`` with tuples as lists and non-finite floats as strings (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def fmt(x: float) -> str:
    return f"{x:.4g}"


def markdown(runs: list[dict], summaries: list[dict], args, command: str, total_s: float) -> str:
    first = runs[0]
    d: CRFL = first["defense"]
    t: ThreatModel = first["threat"]
    sigma_test = args.sigma if args.sigma_test is None else args.sigma_test
    classes = 10  # MNIST / Fashion-MNIST
    # Hoeffding's ε at the level of each of the 2K bounds of the union bound
    # (defenses.crfl.top_two_bounds): α / (2K)
    eps = math.sqrt(math.log(2 * classes / args.alpha) / (2 * args.num_models))
    lines = [
        f"# CRFL certified accuracy on {args.dataset}",
        "",
        "Xie, Chen, Chen, Li (ICML 2021). Training: FedAvg, IID clients, all clients every "
        f"round, plain local SGD; after each aggregation the global parameters are clipped to "
        f"ρ_t = {d.rho_slope}·t + {d.rho_offset} (t from 1) and N(0, σ²), σ = {d.sigma}, is "
        "added (the last round is clipped only). Certification: "
        f"M = {args.num_models} noisy copies (σ_T = {sigma_test}), Hoeffding bounds at "
        f"α = {args.alpha}, abstain unless p_A lower > p_B upper, on {len(first['result'])} "
        f"random test images (seed {args.seed}). Threat model of the radius: R = "
        f"{t.num_attackers} attacker(s) of weight 1/N at t_adv = {t.attack_round}, scale "
        f"γ = {t.scale_factor}, poisoned fraction q_B/n_B = {t.poison_ratio}, "
        "L_Z = sqrt(2 + 2ρ + ρ²) with ρ = ρ_{t_adv} (the reference's constant for its "
        "logistic-regression model).",
        "",
        "| model | schedule | params | train images | N | batch | τ | η | T | ρ_T | "
        "‖θ_T‖ | train s | certify s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        s: Schedule = run["schedule"]
        lines.append(
            f"| {run['name']} | {s.note} | {run['parameters']} | {run['train_images']} | "
            f"{s.num_clients} | {s.batch_size} | {s.local_steps} | {s.lr} | {s.rounds} | "
            f"{fmt(run['rho_T'])} | {fmt(run['final_norm'])} | {run['train_s']:.0f} | "
            f"{run['certify_s']:.0f} |"
        )
    lines += [
        "",
        "Clean accuracy: the unsmoothed θ_T on the certified subset and on the whole test "
        "split; the smoothed model's majority vote (the reference's `is_acc`); the certified "
        "prediction (abstentions count as wrong, = certified accuracy at radius 0).",
        "",
        "| model | θ_T (subset) | θ_T (full test) | smoothed, top vote | smoothed, certified "
        "| abstain | median radius (correct) | max radius |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, sm in zip(runs, summaries):
        lines.append(
            f"| {run['name']} | {run['accuracy_subset']:.3f} | {run['accuracy_full']:.3f} | "
            f"{sm['smoothed_top_vote_accuracy']:.3f} | {sm['smoothed_accuracy']:.3f} | "
            f"{sm['abstain_rate']:.3f} | {fmt(sm['median_radius'])} | {fmt(sm['max_radius'])} |"
        )
    for run, sm in zip(runs, summaries):
        lines += [
            "",
            f"Certified accuracy of `{run['name']}` (fraction of the {len(run['result'])} "
            "images predicted correctly with radius ≥ r):",
            "",
            "| radius r | certified accuracy |",
            "|---:|---:|",
        ]
        lines += [f"| {fmt(r)} | {a:.3f} |" for r, a in zip(sm["radii"], sm["certified_accuracy"])]
    lines += [
        "",
        "The radius bounds the L2 norm of the backdoor trigger δ and scales as "
        "σ / (η τ γ L_Z (q_B/n_B) sqrt(R Σp_i²)) (times the contractions): a schedule with a "
        "larger η τ certifies proportionally smaller radii, and L_Z is the reference's constant "
        "for logistic regression, not a proven one for the CNN. The largest radius listed "
        "before 0 is each model's ceiling: all M votes agree, p_A lower = 1 − ε and p_B "
        f"upper = ε, ε = sqrt(ln(2K/α) / 2M) = {eps:.4f} (K = {classes} classes: both "
        "bounds hold jointly at level 1 − α over all classes, since the two classes are "
        "chosen from the same votes). "
        + (
            f"With σ = {d.sigma} and ρ_t ≥ {d.rho_offset}, every contraction factor "
            "2Φ(ρ_t/σ) − 1 is 1 in double precision, so T and t_adv enter only through "
            "ρ_{t_adv} in L_Z. "
            if math.erf(d.rho(1) / (min(d.sigma, sigma_test) * math.sqrt(2))) == 1.0
            else ""
        )
        + f"Total wall time {total_s:.0f} s on one CPU thread.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


def plot(runs: list[dict], summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
    for ax, run, sm in zip(axes[0], runs, summaries):
        top = max(sm["radii"][-1], 1e-12)
        grid = [top * k / 400 for k in range(401)]
        ax.plot(grid, certified_accuracy(run["result"], grid), label="certified (smoothed)")
        ax.axhline(run["accuracy_subset"], color="gray", ls="--", lw=1, label="θ_T, unsmoothed")
        ax.set_xlim(0, top)
        ax.set_ylim(0, 1)
        ax.set_xlabel("radius (‖δ‖₂ of the backdoor trigger)")
        ax.set_ylabel("certified accuracy")
        s = run["schedule"]
        ax.set_title(f"{run['name']}: T={s.rounds}, η={s.lr}, τ={s.local_steps}", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_samples(runs: list[dict], test, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for run in runs:
            res: CertifyResult = run["result"]
            top2 = res.counts.topk(2, dim=1).values  # (N, 2)
            for i in range(len(res)):
                writer.writerow(
                    {
                        "model": run["name"],
                        "index": i,
                        "name": test.names[i],
                        "label": int(res.labels[i]),
                        "top_class": int(res.top_class[i]),
                        "prediction": int(res.prediction[i]),
                        "votes_top": int(top2[i, 0]),
                        "votes_runner_up": int(top2[i, 1]),
                        "pa_lower": f"{float(res.pa_lower[i]):.6f}",
                        "pb_upper": f"{float(res.pb_upper[i]):.6f}",
                        "radius": f"{float(res.radius[i]):.6g}",
                        "correct": int(res.correct[i]),
                    }
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["logreg", "cnn"], help="logreg and/or cnn")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--num-models", type=int, default=1000, help="M noisy copies")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sigma", type=float, default=0.01, help="training noise σ")
    p.add_argument("--sigma-test", type=float, default=None, help="σ_T (default: --sigma)")
    p.add_argument("--rho-slope", type=float, default=0.1)
    p.add_argument("--rho-offset", type=float, default=2.0)
    schedule = p.add_argument_group("schedule (default: each model's preset)")
    schedule.add_argument("--rounds", type=int)
    schedule.add_argument("--clients", type=int)
    schedule.add_argument("--batch-size", type=int)
    schedule.add_argument("--local-steps", type=int)
    schedule.add_argument("--lr", type=float)
    schedule.add_argument("--train-limit", type=int, help="training images (first of the split)")
    threat = p.add_argument_group("threat model of the radius")
    threat.add_argument("--attack-round", type=int, default=10, help="t_adv, counted from 1")
    threat.add_argument("--attackers", type=int, default=1, help="R")
    threat.add_argument("--scale-factor", type=float, default=10.0, help="γ")
    threat.add_argument("--poison-ratio", type=float, default=0.05, help="q_B / n_B")
    p.add_argument("--radii", type=float, nargs="+", help="table radii (default: per model)")
    p.add_argument("--eval-batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/crfl")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 python benchmarks/crfl_certify.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    start = time.perf_counter()
    try:
        if args.test_samples < 1:
            raise ValueError("--test-samples must be a positive integer")
        for name in args.models:
            schedule_for(name, args)
        train = load_dataset(args.dataset, root=args.data_root, train=True)
        test_full = load_dataset(args.dataset, root=args.data_root, train=False)
        test = load_dataset(
            args.dataset, root=args.data_root, train=False, limit=args.test_samples, seed=args.seed
        )
        runs = []
        for name in args.models:
            runs.append(run_model(name, args, train, test, test_full))
            print(
                f"{name}: trained in {runs[-1]['train_s']:.0f} s, "
                f"certified in {runs[-1]['certify_s']:.0f} s",
                file=sys.stderr,
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = [summarize(run, args.radii) for run in runs]
    table = markdown(runs, summaries, args, command.strip(), time.perf_counter() - start)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certified_accuracy.md").write_text(table)
    plot(runs, summaries, out / "certified_accuracy.png")
    write_samples(runs, test, out / "certified_samples.csv")
    summary = {
        "command": command.strip(),
        "args": vars(args),
        "models": {
            run["name"]: {
                "schedule": {k: v for k, v in run["schedule"].__dict__.items() if k != "options"},
                "model": run["schedule"].model,
                "options": dict(run["schedule"].options),
                "threat": {**run["threat"].__dict__, "lipschitz": run["lipschitz"]},
                "crfl": run["defense"].__dict__,
                "parameters": run["parameters"],
                "final_norm": run["final_norm"],
                "accuracy_subset": run["accuracy_subset"],
                "accuracy_full_test": run["accuracy_full"],
                "round_accuracy_subset": run["round_accuracy"],
                "train_s": run["train_s"],
                "certify_s": run["certify_s"],
                **sm,
            }
            for run, sm in zip(runs, summaries)
        },
    }
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
