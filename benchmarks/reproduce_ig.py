"""Inverting gradients on the untrained sigmoid LeNet: the paper's number, re-derived.

Geiping et al. (NeurIPS 2020) report 18.0 ± 3.3 dB PSNR for their attack on an
untrained LeNet (the DLG paper's: sigmoid, U(-0.5, 0.5) weights) over the first
100 CIFAR-10 validation images, at 4,800 iterations, one restart, labels
known. This script runs the lab's ``ig`` with its defaults (labels recovered
with iDLG's rule, exact at batch 1 on this victim) on a seeded random draw of
CIFAR-10 test images (the JPEG copy's folders do not keep the official order,
so "the first 100" cannot be taken), each on a fresh victim with CIFAR-10 input
normalisation, one FedSGD gradient of one image (threat model:
honest-but-curious server).

Records go to ``<out>/records.jsonl`` as each image finishes (a rerun resumes);
``<out>/summary.md`` is rebuilt from them.

    python benchmarks/reproduce_ig.py                    # 25 images, 4,800 iterations
    python benchmarks/reproduce_ig.py --images 4 --steps 200 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core import build_model, load_dataset  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.experiment import AttackConfig, observe  # noqa: E402
from leakage.app.store import append_record, load_records  # noqa: E402

PAPER_MEAN, PAPER_SD = 18.0, 3.3  # Geiping et al. 2020, untrained LeNet, CIFAR-10


def draw(root: str, count: int, seed: int):
    """``count`` seeded random images of the CIFAR-10 test split."""
    data = load_dataset(str(Path(root) / "cifar10" / "test"))
    g = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=g)[:count].tolist())


def run_one(image, index: int, steps: int, seed: int) -> dict:
    victim = build_model(
        "lenet",
        activation="sigmoid",
        normalize=NORMALIZATION["cifar10"],
        generator=torch.Generator().manual_seed(seed + index),
    )
    obs, gt = observe(AttackConfig(), victim, image)
    attack = ATTACKS.build("ig", steps=steps)
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
    }


def summarize(records: list[dict], args) -> str:
    ps = [r["psnr"] for r in records]
    sd = statistics.stdev(ps) if len(ps) > 1 else 0.0
    return "\n".join(
        [
            f"# Inverting gradients, untrained sigmoid LeNet, {args.steps} iterations",
            "",
            "Threat model: honest-but-curious server, one client's FedSGD gradient of one "
            "image; victim: DLG's LeNet (sigmoid, U(-0.5, 0.5)) with CIFAR-10 input "
            "normalisation, BatchNorm-free; the lab's `ig` defaults, labels recovered by the "
            f"attack. Command: `python benchmarks/reproduce_ig.py --images {args.images} "
            f"--steps {args.steps} --seed {args.seed}` (CPU).",
            "",
            "| source | images | PSNR dB (mean ± sd) | SSIM | label right | s / image |",
            "|---|--:|--:|--:|--:|--:|",
            f"| Geiping et al. 2020 (first 100 CIFAR-10 validation images, labels known) "
            f"| 100 | {PAPER_MEAN} ± {PAPER_SD} | – | – | – |",
            f"| the lab (seeded random CIFAR-10 test images) | {len(ps)} | "
            f"{statistics.fmean(ps):.2f} ± {sd:.2f} | "
            f"{statistics.fmean(r['ssim'] for r in records):.3f} | "
            f"{sum(r['label_right'] for r in records)}/{len(records)} | "
            f"{statistics.fmean(r['seconds'] for r in records):.1f} |",
            "",
            f"Median {statistics.median(ps):.2f} dB, min {min(ps):.2f}, max {max(ps):.2f}.",
            "",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default="../shared/datasets", help="holds cifar10/test/")
    p.add_argument("--images", type=int, default=25)
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reproduce_ig"))
    args = p.parse_args(argv)
    if args.images < 1 or args.steps < 1:
        p.error("--images and --steps must be positive")
    if not (Path(args.data_root) / "cifar10" / "test").is_dir():
        p.error(f"{args.data_root}/cifar10/test not found (give --data-root)")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    setting = {"steps": args.steps, "seed": args.seed}
    have = {r["index"]: r for r in load_records(store) if r["setting"] == setting}
    batch = draw(args.data_root, args.images, args.seed)
    records = []
    for i in range(args.images):
        if i not in have:
            r = {"setting": setting, "index": i, "image": batch.names[i]}
            r.update(run_one(batch.subset([i]), i, args.steps, args.seed))
            append_record(store, r)
            have[i] = r
            print(f"[{i + 1}/{args.images}] {r['image']}: {r['psnr']:.2f} dB", flush=True)
        records.append(have[i])
    text = summarize(records, args)
    tmp = args.out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
