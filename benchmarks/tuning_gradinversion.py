"""GradInversion's priors on the inverting-gradients loop: weights chosen on development
images, reported on test images.

Victim: the lab's ResNet-20 *trained* as ``benchmarks/attack_suite.py`` trains it
(``leakage train``, its ``TRAINING`` settings: 10,000 CIFAR-10 training images,
2 epochs, seed 0; the checkpoint is cached outside git and made if missing),
BatchNorm in eval mode, so the server's running statistics are the ones the
client's forward pass used. Threat model: honest-but-curious server, one
client's FedSGD gradient of a batch of B images; the attack is given the true
labels (in sorted order), so the table measures the image priors, not label
recovery.

Development set: seeded random batches of CIFAR-10 *training* images
(``/cifar10/train/``); test set: of CIFAR-10 *test* images. The two never
overlap. Every run is scored in pixel space after matching reconstructions
to the originals (PSNR, SSIM of :func:`leakage.score_images`; LPIPS needs
AlexNet weights this machine cannot download).

Stages on the development batches (batch 4), each one's winner by mean PSNR the
base of the next:

1. ``bn``: the BatchNorm-statistics prior's weight (0: plain inverting
   gradients with its tuned eval-mode ResNet defaults);
2. ``extra``: the winner plus an image ℓ2 prior (group consistency over
   restarts doubles the cost per run and was left out of this CPU sweep).

GradInversion's recipe in the lab's loop (breaching's ``seethroughgradients``
settings, :data:`leakage.attacks.gradinversion.RECIPE`) runs beside them. The
test report runs plain IG, the chosen setting and the recipe at batch 4 and 8.
All runs are eager (``compile=False``: one graph per setting and shape would
cost more compilation than the runs).

Records go to ``<out>/records.jsonl`` as each run finishes (a rerun resumes;
``--stage dev`` stops after the development sweep, ``--max-runs N`` after N new
runs with exit status 3); ``<out>/summary.md`` is rebuilt from them.

    python benchmarks/tuning_gradinversion.py                 # dev sweep + test report
    python benchmarks/tuning_gradinversion.py --stage dev
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tuning import images  # noqa: E402

from fl_core import load_checkpoint  # noqa: E402
from leakage import score_images  # noqa: E402
from leakage.app.experiment import AttackConfig, observe  # noqa: E402
from leakage.app.store import append_record, load_records  # noqa: E402
from leakage.attacks.gradinversion import RECIPE  # noqa: E402
from leakage.attacks.inverting import invert_gradients  # noqa: E402

CHECKPOINT = Path("benchmarks/out/gradinversion/resnet20-relu.pt")
BN_WEIGHTS = (0.0, 1e-3, 1e-2, 1e-1)
EXTRA = ({"l2": 1e-2},)


def trained_resnet20(path: Path, root: str):
    """The attack suite's trained ResNet-20 (trained once if the checkpoint is missing)."""
    if not path.exists():
        from attack_suite import TRAINING

        from leakage.app.cli import main as cli

        path.parent.mkdir(parents=True, exist_ok=True)
        t = TRAINING
        argv = ["train", "--model", "resnet20", "--activation", "relu", "--dataset", "cifar10"]
        argv += ["--data-root", root, "--limit", str(t["limit"]), "--epochs", str(t["epochs"])]
        argv += ["--batch-size", str(t["batch_size"]), "--lr", str(t["lr"])]
        argv += ["--momentum", str(t["momentum"]), "--seed", "0", "--out", str(path), "--quiet"]
        if cli(argv) != 0:
            raise SystemExit("tuning_gradinversion: training resnet20 failed")
    model, meta = load_checkpoint(path)
    return model, meta


def batches(root: str, train: bool, size: int, count: int, seed: int):
    """``count`` disjoint seeded batches of ``size`` images of the train (dev) or test split."""
    data = images(root, "cifar10", train, size * count, seed=seed + size)
    return [data.subset(list(range(i * size, (i + 1) * size))) for i in range(count)]


def attack(model, batch, options: dict, steps: int, seed: int) -> dict:
    model = copy.deepcopy(model)  # the round's server steps its model in place
    obs, gt = observe(AttackConfig(bn_mode="eval", batch_size=len(batch.labels)), model, batch)
    labels = gt.labels.sort().values  # given, in sorted order (the order is free)
    start = time.perf_counter()
    rec = invert_gradients(
        obs,
        labels=labels,
        steps=steps,
        compile=False,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )
    seconds = time.perf_counter() - start
    s = score_images(rec.images, gt.images, data_range=1.0)
    return {
        "psnr": float(s.psnr.clamp(max=100).mean()),
        "ssim": float(s.ssim.mean()),
        "seconds": seconds,
        "s_per_it": seconds / steps,
        "loss": rec.loss,
        "resolved": {k: v for k, v in rec.options.items() if k not in ("tuned_for",)},
    }


class Pause(Exception):
    """``--max-runs`` new runs are done: stop here, a rerun resumes."""


class Sweep:
    def __init__(self, args, model) -> None:
        self.args, self.model = args, model
        self.new = 0
        self.store = args.out / "records.jsonl"
        self.records = {self.key(r): r for r in load_records(self.store)}

    @staticmethod
    def key(r: dict) -> tuple:
        options = json.dumps(r["options"], sort_keys=True)
        return (r["split"], r["batch"], r["index"], options, r["steps"])

    def measure(self, split: str, size: int, options: dict) -> list[dict]:
        a = self.args
        count = a.dev_batches if split == "dev" else a.test_batches
        out = []
        for i, batch in enumerate(batches(a.data_root, split == "dev", size, count, a.seed)):
            r = {"split": split, "batch": size, "index": i, "options": options, "steps": a.steps}
            k = self.key(r)
            if k not in self.records:
                if self.args.max_runs is not None and self.new >= self.args.max_runs:
                    raise Pause
                self.new += 1
                r.update(attack(self.model, batch, options, a.steps, a.seed + i))
                r["images"] = list(batch.names)
                append_record(self.store, r)
                self.records[k] = r
                print(
                    f"{split} B={size} {i} {json.dumps(options, sort_keys=True)}: "
                    f"{r['psnr']:.2f} dB, SSIM {r['ssim']:.3f} ({r['s_per_it']:.3f} s/it)",
                    flush=True,
                )
            out.append(self.records[k])
        return out

    def choose(self) -> tuple[dict, list[tuple[str, list[dict]]]]:
        rows = []

        def score(options: dict) -> float:
            rs = self.measure("dev", 4, options)
            rows.append((json.dumps(options, sort_keys=True), rs))
            return statistics.fmean(r["psnr"] for r in rs)

        scored = [(score({"bn_prior": w}), {"bn_prior": w}) for w in BN_WEIGHTS]
        best_score, chosen = max(scored, key=lambda t: t[0])
        for extra in EXTRA:
            options = {**chosen, **extra}
            if (s := score(options)) > best_score:
                best_score, chosen = s, options
        score(RECIPE)
        return chosen, rows


def table(rows) -> list[str]:
    lines = [
        "| setting | batch | batches | PSNR dB (mean ± sd) | SSIM | s / iteration |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, rs in rows:
        ps = [r["psnr"] for r in rs]
        sd = statistics.stdev(ps) if len(ps) > 1 else 0.0
        lines.append(
            f"| {name} | {rs[0]['batch']} | {len(rs)} | {statistics.fmean(ps):.2f} ± {sd:.2f} | "
            f"{statistics.fmean(r['ssim'] for r in rs):.3f} | "
            f"{statistics.fmean(r['s_per_it'] for r in rs):.4f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default="../shared/datasets", help="holds cifar10/{train,test}")
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dev-batches", type=int, default=2)
    p.add_argument("--test-batches", type=int, default=2)
    p.add_argument("--test-sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=("dev", "all"), default="all")
    p.add_argument(
        "--max-runs", type=int, default=None, help="stop after this many new runs (exit 3)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning/gradinversion"))
    args = p.parse_args(argv)
    if not (Path(args.data_root) / "cifar10" / "train").is_dir():
        p.error(f"{args.data_root}/cifar10/train not found (give --data-root)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = trained_resnet20(args.checkpoint, args.data_root)
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args, model)
    try:
        return report(args, sweep, meta)
    except Pause:
        print(f"paused after {sweep.new} new runs; rerun to resume", flush=True)
        return 3


def report(args, sweep: Sweep, meta: dict) -> int:
    chosen, dev_rows = sweep.choose()
    dev_rows.sort(key=lambda t: -statistics.fmean(r["psnr"] for r in t[1]))
    command = (
        f"python benchmarks/tuning_gradinversion.py --steps {args.steps} --dev-batches "
        f"{args.dev_batches} --test-batches {args.test_batches} --test-sizes "
        f"{' '.join(map(str, args.test_sizes))}"
    )
    lines = [
        f"# GradInversion priors: tuning on training images, report on test images "
        f"({args.steps} iterations)",
        "",
        "Victim: the lab's ResNet-20 trained as `benchmarks/attack_suite.py` trains it "
        f"(test accuracy {meta['accuracy']:.3f}), eval-mode BatchNorm; one client's FedSGD "
        "gradient; true labels given. Options not listed take inverting gradients' tuned "
        "eval-mode ResNet defaults (pixel coordinates, U[0, 1] start, lr 0.3, TV 0.03, step "
        "decay, keep-best, signed Adam); every run eager, 1 restart unless listed. "
        f"Command: `{command}` ({torch.get_num_threads()} torch threads, CPU shared with "
        "other jobs).",
        "",
        "## Development batches (CIFAR-10 training images, batch 4)",
        "",
        *table(dev_rows),
        "",
        f"Chosen: `{json.dumps(chosen, sort_keys=True)}`; the recipe row is "
        f"`{json.dumps(RECIPE, sort_keys=True)}` (GradInversion as breaching sets it).",
        "",
    ]
    if args.stage == "all":
        report = []
        for size in args.test_sizes:
            for name, options in (
                ("inverting gradients (bn_prior 0)", {"bn_prior": 0.0}),
                ("chosen", chosen),
                ("GradInversion recipe", RECIPE),
            ):
                report.append((f"{name}", sweep.measure("test", size, options)))
        lines += ["## Test batches (CIFAR-10 test images)", "", *table(report), ""]
    text = "\n".join(lines) + "\n"
    tmp = args.out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
