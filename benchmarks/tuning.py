"""How the optimisation attacks' defaults were chosen: a sweep on development images,
a report on test images.

Development set: the victim's dataset's *training* images (a seeded random
draw per victim). Test set: its *test* images. The two never overlap, so the
reported numbers are not tuned on the images they are measured on. Victims
attack CIFAR-10 unless their name starts with ``fmnist-`` (Fashion-MNIST,
1x28x28 grayscale).

Every run attacks one image (batch 1) of one untrained victim (seeded weights,
the dataset's input normalisation, or none for ``-raw`` victims, which see
[0, 1] pixels as DLG's LeNet does) through one FedSGD round, with the lab's
label recovery (``auto``: iDLG's rule at batch 1), at a fixed iteration budget
(``--steps``, default 1,000), and is scored in pixel space. Threat model:
honest-but-curious server, one client's gradient.

Stages (each one's winner, by mean PSNR over the development images, is the
base of the next).

``--attack ig`` (inverting gradients):

1. ``space``: optimised coordinates (normalised or pixel; one and the same
   for ``-raw`` victims, which run pixel only) x start (N(0, 1) in those
   coordinates, or U[0, 1] pixels), at TV 1e-2 and step size 0.1;
2. ``tv_lr``: TV weight x step size;
3. ``loop``: step schedule (the paper's step decay, cosine, constant) x
   keep-best-iterate on/off.

The test report runs the winner, the lab's previous defaults (pixel space,
U[0, 1] start, TV 1e-4) and breaching's defaults (normalised, N(0, 1), TV
0.2) on the test images.

``--attack dlg`` (DLG's L-BFGS, soft labels learned jointly; ``--steps`` is
unused, the budget is part of each setting): coordinates x start x budget
(4 restarts of 300 L-BFGS steps, the lab's earlier default, or 2 of 1,000),
reported beside the lab's previous defaults.

Records go to ``<out>/<attack>/records.jsonl`` as each run finishes (a rerun
resumes); ``<out>/<attack>/summary.md`` is rebuilt from them.

    python benchmarks/tuning.py --attack ig               # all victims, all stages, report
    python benchmarks/tuning.py --attack ig --victims lenet-sigmoid --dev-images 4
    python benchmarks/tuning.py --attack dlg
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core import build_model, load_dataset  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from leakage import score_images  # noqa: E402
from leakage.app.experiment import AttackConfig, observe  # noqa: E402
from leakage.app.store import append_record, load_records  # noqa: E402
from leakage.attacks import DLG, InvertingGradients  # noqa: E402

VICTIMS = {  # name -> (dataset, model, activation, BatchNorm mode, input normalisation)
    "lenet-sigmoid": ("cifar10", "lenet", "sigmoid", "train", True),
    "lenet-sigmoid-raw": ("cifar10", "lenet", "sigmoid", "train", False),
    "lenet-relu": ("cifar10", "lenet", "relu", "train", True),
    "lenet-relu-raw": ("cifar10", "lenet", "relu", "train", False),
    "cnn": ("cifar10", "cnn", "sigmoid", "train", True),
    "resnet20-eval": ("cifar10", "resnet20", "relu", "eval", True),
    "resnet20-train": ("cifar10", "resnet20", "relu", "train", True),
    "fmnist-lenet-sigmoid": ("fashion-mnist", "lenet", "sigmoid", "train", True),
    "fmnist-lenet-sigmoid-raw": ("fashion-mnist", "lenet", "sigmoid", "train", False),
}
ATTACK_VICTIMS = {
    "ig": [
        "lenet-sigmoid",
        "lenet-relu",
        "cnn",
        "resnet20-eval",
        "resnet20-train",
        "lenet-sigmoid-raw",
        "lenet-relu-raw",
        "fmnist-lenet-sigmoid",
        "fmnist-lenet-sigmoid-raw",
    ],
    "dlg": ["lenet-sigmoid", "lenet-sigmoid-raw"],
}
PREVIOUS = {  # every option explicit: a missing one would take the victim's tuned value
    "ig": {
        "coordinates": "pixel",
        "init": "uniform",
        "tv": 1e-4,
        "lr": 0.1,
        "schedule": "step",
        "keep_best": False,
    },
    "dlg": {"coordinates": "pixel", "init": "uniform", "restarts": 4, "steps": 300},
}
BREACHING = {  # breaching's invertinggradients.yaml; step-lr: x0.1 at 3/8, 5/8, 7/8
    "coordinates": "normalized",
    "init": "randn",
    "tv": 0.2,
    "lr": 0.1,
    "schedule": "step",
    "keep_best": True,
}
IG_STAGES = {
    "space": [
        {"coordinates": c, "init": i, "tv": 1e-2, "lr": 0.1}
        for c in ("normalized", "pixel")
        for i in ("randn", "uniform")
    ],
    "tv_lr": [
        {"tv": tv, "lr": lr}
        for tv in (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.2, 0.4)
        for lr in (0.03, 0.1, 0.3)
    ],
    "loop": [
        {"schedule": s, "keep_best": k}
        for s in ("step", "cosine", "constant")
        for k in (True, False)
    ],
}
DLG_STAGES = {
    "space_budget": [
        {"coordinates": c, "init": i, "restarts": r, "steps": n}
        for c, i in (("pixel", "uniform"), ("normalized", "randn"), ("normalized", "uniform"))
        for r, n in ((4, 300), (2, 1000))
    ],
}
STAGES = {"ig": IG_STAGES, "dlg": DLG_STAGES}

_DATA: dict[tuple[str, bool], object] = {}


def images(root: str, dataset: str, train: bool, count: int, seed: int):
    """``count`` seeded random images of ``dataset``'s training (dev) or test split."""
    if (dataset, train) not in _DATA:
        if dataset == "cifar10":  # the class-folder copy
            name, kw = str(Path(root) / "cifar10" / ("train" if train else "test")), {}
        else:  # a torchvision dataset under root
            name, kw = dataset, dict(root=root, train=train)
        _DATA[dataset, train] = load_dataset(name, limit=5000, seed=1, **kw)
    data = _DATA[dataset, train]
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:count].tolist())


def run(attack_name: str, victim: str, image, index: int, options: dict, steps: int, seed: int):
    dataset, model, act, bn_mode, normalized = VICTIMS[victim]
    m = build_model(
        model,
        in_shape=tuple(image.shape),
        activation=act,
        normalize=NORMALIZATION[dataset] if normalized else None,
        generator=torch.Generator().manual_seed(seed + index),
    )
    obs, gt = observe(AttackConfig(bn_mode=bn_mode), m, image)
    if attack_name == "ig":
        attack = InvertingGradients(steps=steps, **options)
    else:
        attack = DLG(**options)
    start = time.perf_counter()
    rec = attack.reconstruct(obs, generator=torch.Generator().manual_seed(seed + index))
    seconds = time.perf_counter() - start
    s = score_images(rec.images, gt.images, data_range=1.0)
    return {
        "psnr": float(s.psnr.clamp(max=100).mean()),
        "ssim": float(s.ssim.mean()),
        "label_right": rec.labels.tolist() == gt.labels.tolist(),
        "seconds": seconds,
        "loss": rec.loss,
        "stopped": rec.stopped,
    }


def key(r: dict) -> tuple:  # noqa: D103
    return (
        r["victim"],
        r["split"],
        r["index"],
        json.dumps(r["options"], sort_keys=True),
        r["steps"],
    )


class Sweep:
    def __init__(self, args) -> None:
        self.args = args
        self.store = args.out / "records.jsonl"
        self.stages = STAGES[args.attack]
        self.records = {key(r): r for r in load_records(self.store)}

    def measure(self, victim: str, split: str, options: dict) -> list[dict]:
        a = self.args
        count = a.dev_images if split == "dev" else a.test_images
        batch = images(a.data_root, VICTIMS[victim][0], split == "dev", count, seed=a.seed)
        out = []
        for i in range(count):
            r = {"victim": victim, "split": split, "index": i, "options": options, "steps": a.steps}
            k = key(r)
            if k not in self.records:
                r.update(run(a.attack, victim, batch.subset([i]), i, options, a.steps, a.seed))
                r["image"] = batch.names[i]
                append_record(self.store, r)
                self.records[k] = r
                print(
                    f"{victim} {split} {i} {json.dumps(options, sort_keys=True)}: "
                    f"{r['psnr']:.2f} dB ({r['seconds']:.1f} s)",
                    flush=True,
                )
            out.append(self.records[k])
        return out

    def best(self, victim: str) -> dict:
        """The winner of every stage in turn (by mean development PSNR)."""
        chosen: dict = {}
        for stage in self.stages.values():
            scored = []
            for change in stage:
                if not VICTIMS[victim][4] and change.get("coordinates") == "normalized":
                    continue  # without input normalisation the two coordinates coincide
                options = {**chosen, **change}
                rs = self.measure(victim, "dev", options)
                scored.append((statistics.fmean(r["psnr"] for r in rs), options))
            chosen = max(scored, key=lambda t: t[0])[1]
        return chosen


def table(rows: list[tuple[str, str, list[dict]]]) -> list[str]:
    lines = [
        "| victim | setting | images | PSNR dB (mean ± sd) | SSIM | label right | s / run |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for victim, name, rs in rows:
        ps = [r["psnr"] for r in rs]
        sd = statistics.stdev(ps) if len(ps) > 1 else 0.0
        lines.append(
            f"| {victim} | {name} | {len(rs)} | {statistics.fmean(ps):.2f} ± {sd:.2f} | "
            f"{statistics.fmean(r['ssim'] for r in rs):.3f} | "
            f"{sum(r['label_right'] for r in rs)}/{len(rs)} | "
            f"{statistics.fmean(r['seconds'] for r in rs):.1f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-root",
        default="../shared/datasets",
        help="holds cifar10/{train,test} and torchvision's FashionMNIST",
    )
    p.add_argument("--attack", default="ig", choices=sorted(STAGES))
    p.add_argument("--victims", nargs="+", default=None, help="default: the attack's")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dev-images", type=int, default=5)
    p.add_argument("--test-images", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="the development sweep only")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning"))
    args = p.parse_args(argv)
    args.victims = args.victims or ATTACK_VICTIMS[args.attack]
    args.out = args.out / args.attack
    for v in args.victims:
        if v not in VICTIMS:
            p.error(f"unknown victim {v!r}; valid: {', '.join(VICTIMS)}")
    if not (Path(args.data_root) / "cifar10" / "train").is_dir():
        p.error(f"{args.data_root}/cifar10/train not found (give --data-root)")
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args)
    budget = f"{args.steps} iterations" if args.attack == "ig" else "budget per setting"
    labels = "recovered by the attack (iDLG's rule)" if args.attack == "ig" else "learned jointly"
    lines = [
        f"# {args.attack}: tuning on training images, report on test images ({budget}, batch 1)",
        "",
        "Threat model: honest-but-curious server, one client's FedSGD gradient; untrained "
        "victims on CIFAR-10 (`fmnist-`: Fashion-MNIST) with the dataset's input "
        "normalisation (`-raw`: without); BatchNorm mode in the victim's name (train "
        f"otherwise); labels {labels}. Command: `python "
        f"benchmarks/tuning.py --attack {args.attack} --steps {args.steps} --dev-images "
        f"{args.dev_images} --test-images {args.test_images}`.",
        "",
    ]
    report = []
    for victim in args.victims:
        chosen = sweep.best(victim)
        lines += [f"## {victim}", "", "Development sweep (mean over the development images):", ""]
        dev_rows = []
        seen = set()
        for r in list(sweep.records.values()):
            if r["victim"] == victim and r["split"] == "dev" and r["steps"] == args.steps:
                o = json.dumps(r["options"], sort_keys=True)
                if o not in seen:
                    seen.add(o)
                    rs = [
                        x
                        for x in sweep.records.values()
                        if x["victim"] == victim
                        and x["split"] == "dev"
                        and x["steps"] == args.steps
                        and json.dumps(x["options"], sort_keys=True) == o
                    ]
                    dev_rows.append((victim, f"`{o}`", rs))
        dev_rows.sort(key=lambda t: -statistics.fmean(r["psnr"] for r in t[2]))
        lines += table(dev_rows) + ["", f"Chosen: `{json.dumps(chosen, sort_keys=True)}`", ""]
        if not args.no_report:
            settings = [("tuned", chosen), ("lab's previous defaults", PREVIOUS[args.attack])]
            if args.attack == "ig":
                settings.append(("breaching's defaults", BREACHING))
            for name, options in settings:
                report.append((victim, name, sweep.measure(victim, "test", options)))
    if report:
        lines += ["## Test images", ""] + table(report) + [""]
    text = "\n".join(lines) + "\n"
    tmp = args.out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
