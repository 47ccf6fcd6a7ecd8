"""DLG / iDLG speed and success on the untrained sigmoid LeNet.

For each attack and batch size: seconds per L-BFGS step and per objective
evaluation, success rate (every image of the batch at PSNR >= 30 dB) over
several images and seeds, and the median wall time of successful runs.

Every finished run is appended to ``<out>/runs.jsonl`` (default
``benchmarks/results/dlg_speed/``); an interrupted
benchmark resumes where it stopped, and the tables are rebuilt from that file.

    python benchmarks/dlg_speed.py                      # lenet, 32x32 RGB, B = 1 2 4 8
    python benchmarks/dlg_speed.py --batch-sizes 1 --images 12 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fl_core import Client, Server, build_model, load_samples
from leakage import build_attack, score_images
from leakage.app.store import append_record, load_records, write_atomic
from leakage.metrics import label_accuracy

SUCCESS_DB = 30.0


def run_one(attack: str, batch: int, first: int, seed: int, steps: int, restarts: int) -> dict:
    """One attack on images ``first .. first+batch-1`` of the samples, victim seeded by ``seed``."""
    data = load_samples()
    idx = [(first + j) % len(data) for j in range(batch)]
    images, labels = data.images[idx], data.labels[idx]
    model = build_model("lenet", generator=torch.Generator().manual_seed(seed))
    seen = []
    Server(model, [Client(0, images, labels)], listeners=[seen.append], seed=seed).run_round()
    atk = build_attack(attack, steps=steps, restarts=restarts)
    start = time.perf_counter()
    rec = atk.reconstruct(seen[0], generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    scores = score_images(rec.images, images, data_range=1.0)
    return {
        "attack": attack,
        "batch": batch,
        "first": first,
        "seed": seed,
        "steps_limit": steps,
        "restarts": restarts,
        "names": [data.names[i] for i in idx],
        "seconds": seconds,
        "steps": rec.total_steps,
        "evaluations": rec.evaluations,
        "psnr": scores.psnr.tolist(),
        "ssim": scores.ssim.tolist(),
        "label_accuracy": label_accuracy(rec.labels.tolist(), labels.tolist()),
        "min_psnr": float(scores.psnr.min()),
        "stopped": rec.stopped,
        "restarts_used": len(rec.restart_losses),
    }


def key(row: dict) -> tuple:
    return (
        row["attack"],
        row["batch"],
        row["first"],
        row["seed"],
        row["steps_limit"],
        row["restarts"],
    )


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (attack, batch size, steps, restarts) setting."""
    out = []
    for setting in sorted(
        {(r["attack"], r["batch"], r["steps_limit"], r["restarts"]) for r in rows}
    ):
        rs = [
            r for r in rows if (r["attack"], r["batch"], r["steps_limit"], r["restarts"]) == setting
        ]
        ok = [r for r in rs if r["min_psnr"] >= SUCCESS_DB]
        secs = sum(r["seconds"] for r in rs)
        out.append(
            {
                "attack": setting[0],
                "batch": setting[1],
                "steps": setting[2],
                "restarts": setting[3],
                "runs": len(rs),
                "success": f"{len(ok)}/{len(rs)}",
                "ms_per_eval": 1e3 * secs / max(sum(r["evaluations"] for r in rs), 1),
                "s_per_step": secs / max(sum(r["steps"] for r in rs), 1),
                "median_s_success": statistics.median([r["seconds"] for r in ok]) if ok else None,
                "median_s_all": statistics.median([r["seconds"] for r in rs]),
                "median_psnr": statistics.median([p for r in rs for p in r["psnr"]]),
                "label_accuracy": statistics.mean([r["label_accuracy"] for r in rs]),
            }
        )
    return out


def markdown(summary: list[dict]) -> str:
    head = (
        "| attack | batch | steps | restarts | runs | success (PSNR >= 30 dB) | ms / evaluation "
        "| s / L-BFGS step "
        "| median s (successes) | median s (all) | median PSNR | label acc. |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    cols = [
        ("attack", "s"), ("batch", "d"), ("steps", "d"), ("restarts", "d"),
        ("runs", "d"), ("success", "s"), ("ms_per_eval", ".2f"), ("s_per_step", ".3f"),
        ("median_s_success", ".1f"), ("median_s_all", ".1f"), ("median_psnr", ".1f"),
        ("label_accuracy", ".2f"),
    ]  # fmt: skip
    return head + "".join(
        "| " + " | ".join(f(s[k], fmt) for k, fmt in cols) + " |\n" for s in summary
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--attacks", nargs="+", default=["dlg", "idlg"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--images", type=int, default=6, help="distinct first images per batch size")
    p.add_argument("--seeds", type=int, default=2, help="victim/attack seeds per image")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default="benchmarks/results/dlg_speed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.jsonl"
    rows = load_records(store)
    done = {key(r) for r in rows}
    plan = [
        (a, b, first, seed, args.steps, args.restarts)
        for a in args.attacks
        for b in args.batch_sizes
        for first in range(args.images)
        for seed in range(args.seeds)
    ]
    todo = [c for c in plan if c not in done]
    print(f"{len(plan) - len(todo)} of {len(plan)} runs already in {store}; running {len(todo)}")
    for n, (a, b, first, seed, _, _) in enumerate(todo, 1):
        row = run_one(a, b, first, seed, args.steps, args.restarts)
        append_record(store, row)
        rows.append(row)
        print(
            f"[{n}/{len(todo)}] {a} B={b} images {first}.. seed {seed}: "
            f"min PSNR {row['min_psnr']:.1f} dB, {row['seconds']:.1f} s, {row['stopped']}",
            flush=True,
        )
    table = markdown(summarise(rows))
    write_atomic(out / "summary.md", table)
    print()
    print(table)


if __name__ == "__main__":
    main()
