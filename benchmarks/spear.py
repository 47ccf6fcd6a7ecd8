"""SPEAR's runtime and exactness against the batch size, on the ReLU ``mlp`` victim.

SPEAR (Dimitrov et al., "SPEAR: Exact Gradient Inversion of Batches in
Federated Learning", NeurIPS 2024) recovers a whole batch from the gradient of
a first linear layer followed by ReLU. Its search samples B - 1 rows of the
weight gradient's left factor until each sample's sparsity pattern turns up;
a draw succeeds with probability about B·2^-(B-1), so the work grows as 2^B.

For each batch size B and draw d the script takes the first B files of a
seeded permutation (``torch.Generator().manual_seed(d)``) of the CIFAR-10 test
split (so draw d's batch of 4 is the start of its batch of 8), lets a lab
client compute its FedSGD gradient on the ``mlp`` victim (ReLU, width 1024,
depth 3, CIFAR-10 input normalisation, weights from ``--seed``; the same
weights for every batch) and runs the lab's ``spear`` with its defaults, as
``leakage attack --attack spear`` does (its row subsets drawn from a generator
seeded with d). Per batch it records each image's PSNR against its matched
original, the attack's own exactness check (the activation pattern of each
recovered input equals the support of its output gradient), the labels, the
row subsets drawn and the wall time.

Records go to ``<out>/records.jsonl`` as each batch finishes; a rerun skips
what is recorded for the same setting; ``<out>/summary.md`` is rebuilt
(atomically) from every record of the setting at the end.

    python benchmarks/spear.py                              # B = 4, 8, 16; 3 draws each
    python benchmarks/spear.py --batch-sizes 20 --draws 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling vs_breaching.py

from vs_breaching import CIFAR10_CLASSES  # noqa: E402

from fl_core import Client, Server, build_model, load_image_files  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402

MODEL = "mlp"
SHAPE = (3, 32, 32)
EXACT_DB = 60.0
"""An image counts as recovered exactly at PSNR >= 60 dB (RMS error under 1e-3 of the
range; SPEAR's exact solutions from float32 gradients reach 150-190 dB)."""


def cifar10_test_files(folder: Path) -> list[str]:
    """Every ``<class>/<file>.jpg`` of the CIFAR-10 test split, sorted."""
    return [
        f"{c}/{p.name}"
        for c in CIFAR10_CLASSES
        for p in sorted((folder / c).glob("*.jpg"), key=lambda p: p.name)
    ]


def draw_batch(files: list[str], batch: int, draw: int) -> list[str]:
    """The first ``batch`` files of the permutation seeded by ``draw``."""
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(draw))
    return [files[i] for i in order[:batch].tolist()]


def run_one(folder: Path, names: list[str], draw: int, seed: int) -> dict:
    """SPEAR on one batch; the record's measurements."""
    labels = [CIFAR10_CLASSES.index(n.split("/")[0]) for n in names]
    data = load_image_files([folder / n for n in names], labels=labels, shape=SHAPE)
    victim = build_model(
        MODEL, normalize=NORMALIZATION["cifar10"], generator=torch.Generator().manual_seed(seed)
    )
    seen, truth = [], []
    client = Client(0, data.images, data.labels)
    Server(victim, [client], listeners=[seen.append], truth_listeners=[truth.append]).run_round()
    attack = ATTACKS.build("spear")
    start = time.perf_counter()
    rec = attack.reconstruct(seen[0], generator=torch.Generator().manual_seed(draw))
    seconds = time.perf_counter() - start
    s = score_images(rec.images, truth[0].images, data_range=1.0)
    psnr = [min(float(v), 999.0) for v in s.psnr]  # 999: identical in float32
    return {
        "psnr": psnr,
        "exact_psnr": sum(v >= EXACT_DB for v in psnr),
        "consistent": rec.options["exact"],
        "labels_right": sum(
            int(a == b) for a, b in zip(rec.labels[s.order].tolist(), truth[0].labels.tolist())
        ),
        "found": rec.options["found"],
        "row_draws": rec.options["draws"],
        "seconds": seconds,
        "solver_seconds": rec.options["seconds"],
    }


def summary(records: list[dict], args, command: str) -> str:
    threads = records[0]["threads"] if records else torch.get_num_threads()
    lines = [
        f"# SPEAR: exactness and runtime against the batch size ({MODEL}, ReLU, CIFAR-10 test)",
        "",
        "Threat model: honest-but-curious server, one client's FedSGD gradient of a batch of "
        f"B CIFAR-10 test images; untrained {MODEL} victim (ReLU, width 1024, depth 3, "
        f"PyTorch's default init from seed {args.seed}) with CIFAR-10 input normalisation. "
        "Each draw is a different seeded batch. Exact: PSNR >= "
        f"{EXACT_DB:.0f} dB against the matched original; self-check: the attack's own "
        "consistency test (no ground truth). Seconds: wall time of the whole attack, label "
        f"matching included. Command: `{command}` ({threads} torch threads, CPU).",
        "",
        "| B | draws | exact images | self-check | labels right | min PSNR dB | "
        "median s | max s | median row subsets | max row subsets |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for b in sorted({r["batch"] for r in records}):
        rs = [r for r in records if r["batch"] == b]
        total = b * len(rs)
        lines.append(
            f"| {b} | {len(rs)} | {sum(r['exact_psnr'] for r in rs)}/{total} | "
            f"{sum(r['consistent'] for r in rs)}/{total} | "
            f"{sum(r['labels_right'] for r in rs)}/{total} | "
            f"{min(min(r['psnr']) for r in rs):.1f} | "
            f"{statistics.median(r['seconds'] for r in rs):.2f} | "
            f"{max(r['seconds'] for r in rs):.2f} | "
            f"{statistics.median(r['row_draws'] for r in rs):,.0f} | "
            f"{max(r['row_draws'] for r in rs):,} |"
        )
    lines += [
        "",
        "Row subsets are counted in the attack's chunks of 8,192; the search stops when every "
        "sample passes the self-check or after `max_draws` (default 2,000,000) row subsets. "
        "Where a sample's direction is still missing then, the completed Q is wrong and in "
        "general so is every other sample's input (see `leakage/attacks/spear.py`, `_solve`).",
        "",
        "Per batch:",
        "",
        "| B | draw | exact | directions found | seconds | row subsets | images |",
        "|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in sorted(records, key=lambda r: (r["batch"], r["draw"])):
        shown = ", ".join(r["images"][:4]) + (", ..." if len(r["images"]) > 4 else "")
        lines.append(
            f"| {r['batch']} | {r['draw']} | {r['exact_psnr']}/{r['batch']} | "
            f"{r['found']}/{r['batch']} | {r['seconds']:.2f} | {r['row_draws']:,} | {shown} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default="../shared/datasets", help="holds cifar10/test/")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16], metavar="B")
    p.add_argument("--draws", type=int, default=3, help="batches per batch size (seeds 0..)")
    p.add_argument("--seed", type=int, default=0, help="seed of the victim's weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/spear"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.draws < 1 or min(args.batch_sizes) < 1:
        p.error("--draws and --batch-sizes must be positive")
    folder = Path(args.data_root) / "cifar10" / "test"
    if not all((folder / c).is_dir() for c in CIFAR10_CLASSES):
        p.error(f"no CIFAR-10 class folders under {folder} (give --data-root)")
    files = cifar10_test_files(folder)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    setting = {"model": MODEL, "seed": args.seed, "normalize": "cifar10"}
    done = {(r["batch"], r["draw"]) for r in load_records(store) if r["setting"] == setting}
    todo = [(b, d) for b in args.batch_sizes for d in range(args.draws) if (b, d) not in done]
    bar = tqdm(todo, desc="spear", disable=args.quiet)
    for b, d in bar:
        names = draw_batch(files, b, d)
        record = {
            "setting": setting,
            "batch": b,
            "draw": d,
            "images": names,
            **run_one(folder, names, d, args.seed),
            "threads": torch.get_num_threads(),
        }
        append_record(store, record)
        bar.write(
            f"B={b} draw {d}: {record['exact_psnr']}/{b} exact, {record['seconds']:.2f} s, "
            f"{record['row_draws']:,} row subsets"
        )
    records = [r for r in load_records(store) if r["setting"] == setting]
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/spear.py", *(a for a in given if a != "--quiet")])
    text = summary(records, args, command)
    write_atomic(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
