"""How many curvature pairs DLG's L-BFGS keeps: a sweep on development images.

Development set: CIFAR-10 *training* images (a seeded random draw), disjoint
from the CIFAR-10 test images on which ``benchmarks/hot_paths.py`` reports the
lab's DLG and iDLG against the original code. Victim and attack as there: the
original DLG's sigmoid LeNet (100 classes, raw pixels, weights seeded per run),
one image, one FedSGD round observed by an honest-but-curious server, the
attack's defaults except ``history``, one thread. A run succeeds at PSNR >= 30 dB.

For each history size the table gives evaluations, seconds and seconds per
success; the defaults (:data:`leakage.attacks.dlg.LONG_HISTORY`) are the sizes
with the fewest seconds per success in one run of the script, every run
succeeding. Records go to
``<out>/records.jsonl`` as each run finishes (a rerun resumes);
``<out>/summary.md`` is rebuilt from them.

    python benchmarks/lbfgs_history.py --data ../shared/datasets
    python benchmarks/lbfgs_history.py --data ../shared/datasets --history 100 400 --images 2
    python benchmarks/lbfgs_history.py --data ../shared/datasets --history 400 600 \
        --dtypes float64 float32            # the defaults' precision against float32
    python benchmarks/lbfgs_history.py --data ../shared/datasets --history 400 600 \
        --rows float64 float32 --images 8   # float64 attacks keeping float32 pairs
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

from fl_core import Client, Server, build_model, load_dataset  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402

SUCCESS_DB = 30.0


def run(
    attack: str, history: int, image, label, seed: int, dtype: str = "auto", rows: str = "float64"
) -> dict:
    """One attack on one image with ``history`` pairs kept in ``rows`` precision;
    seconds, evaluations and PSNR."""
    model = build_model("lenet", num_classes=100, generator=torch.Generator().manual_seed(seed))
    seen = []
    Server(model, [Client(0, image, label)], listeners=[seen.append], seed=seed).run_round()
    atk = ATTACKS.build(attack, history=history, dtype=dtype, history_dtype=rows)
    start = time.perf_counter()
    rec = atk.reconstruct(seen[0], generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    value = float(score_images(rec.images, image, data_range=1.0).psnr.min())
    return {"seconds": seconds, "evaluations": rec.evaluations, "psnr": value,
            "success": value >= SUCCESS_DB}  # fmt: skip


def _dtype(r: dict) -> str:
    return r.get("dtype", "float64")  # "auto" is float64 for this victim


def _rows(r: dict) -> str:
    """The stored pairs' precision (records before the option: the attack's)."""
    return r.get("rows", _dtype(r))


def summary(records: list[dict]) -> str:
    commands = sorted({r["command"] for r in records if "command" in r})
    if not commands or any("command" not in r for r in records):
        commands.insert(0, "python benchmarks/lbfgs_history.py --data ../shared/datasets")
    lines = ["# L-BFGS history for DLG and iDLG (development images)", "",
             "Reproduced by " + ", then ".join(f"`{c}`" for c in commands) + ".",
             "CIFAR-10 training images, sigmoid LeNet (100 classes), batch 1, FedSGD, "
             "honest-but-curious server, one thread; success: PSNR >= 30 dB.", "",
             "| attack | precision | pairs kept in | history | runs | successes "
             "| evaluations (mean) | seconds (mean) | s per success | median PSNR |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["attack"], _dtype(r), _rows(r), r["history"]), []).append(r)
    for (attack, dtype, rows, history), rs in sorted(groups.items()):
        ok = sum(r["success"] for r in rs)
        total = sum(r["seconds"] for r in rs)
        per = f"{total / ok:.2f}" if ok else "-"
        lines.append(f"| {attack} | {dtype} | {rows} | {history} | {len(rs)} | {ok} | "
                     f"{statistics.mean(r['evaluations'] for r in rs):.0f} | "
                     f"{total / len(rs):.2f} | {per} | "
                     f"{statistics.median(r['psnr'] for r in rs):.1f} |")  # fmt: skip
    lines += ["", "Seconds compare only within one run of the script: this machine's speed "
              "drifts between runs; the evaluation counts do not."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder holding CIFAR-10 (see load_dataset)")
    p.add_argument("--attacks", nargs="+", default=["dlg", "idlg"], choices=["dlg", "idlg"])
    p.add_argument("--history", nargs="+", type=int, default=[100, 200, 300, 400, 600])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float64"],
        choices=["float64", "float32"],
        help="precision of the attack (float64 is its default for this victim)",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        default=["float64"],
        choices=["float64", "float32"],
        help="precision of the stored pairs (the attacks' history_dtype)",
    )
    p.add_argument("--images", type=int, default=4, help="development images")
    p.add_argument("--seeds", type=int, default=1, help="victim seeds per image")
    p.add_argument("--sample-seed", type=int, default=123)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/lbfgs_history"))
    args = p.parse_args(argv)
    if min(args.history) < 1 or args.images < 1 or args.seeds < 1:
        p.error("--history, --images and --seeds must be positive")
    data = load_dataset("cifar10", root=args.data, train=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    done = {(r["attack"], _dtype(r), _rows(r), r["history"], r["image"], r["seed"])
            for r in load_records(path)}  # fmt: skip
    command = "python benchmarks/lbfgs_history.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    g = torch.Generator().manual_seed(args.sample_seed)
    picks = torch.randperm(len(data), generator=g)[: args.images].tolist()
    torch.set_num_threads(1)
    for index in picks:
        for seed in range(args.seeds):
            cases = [(a, d, w, h) for a in args.attacks for d in args.dtypes
                     for w in args.rows for h in args.history]  # fmt: skip
            for attack, dtype, rows, history in cases:  # side by side on each image
                if (attack, dtype, rows, history, index, seed) in done:
                    continue
                image, label = data.images[index : index + 1], data.labels[index : index + 1]
                got = run(attack, history, image, label, seed, dtype, rows)
                append_record(path, {"attack": attack, "dtype": dtype, "rows": rows,
                                     "history": history, "image": index, "seed": seed,
                                     "command": command, **got})  # fmt: skip
                print(attack, dtype, rows, history, index, seed,
                      {k: round(v, 2) for k, v in got.items()}, flush=True)  # fmt: skip
    write_atomic(out / "summary.md", summary(load_records(path)))
    print(summary(load_records(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
