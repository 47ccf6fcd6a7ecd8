"""Label recovery from one FedSGD gradient: every strategy, label-set and label-count accuracy.

Each batch is a fresh untrained victim (sigmoid activations, built from its own
seed) and ``--batch-size`` CIFAR-10 test images drawn at random without
replacement, so labels repeat as they happen to (``--distinct``: one image per
class). One client holds the batch; one FedSGD round of ``fl_core`` (Server +
Client, train mode, gradient of the mean cross-entropy) gives the Observation the
strategies read. Scores per strategy and victim, averaged over the batches:

* set accuracy: fraction of the batch's distinct classes recovered
  (``leakage.metrics.label_set_accuracy``, iLRG's label existence);
* count accuracy: Σ_c min(n̂_c, n_c) / B (``label_count_accuracy``);
* exact: fraction of batches whose label multiset is recovered exactly.

``ilrg-paper`` is ``ilrg`` with ``refine_steps=0``, the estimate of Ma et al. (2023)
without this lab's refinement. A strategy that refuses a setting (rlg when
B ≥ K − 1, yin when B > K) is reported as such.

With ``--num-classes`` above 10, the victims get that many outputs and each image
a label drawn uniformly from all of them (no CIFAR-100 copy offline; untrained
victims know nothing of class semantics, so only the label statistics matter).

    python benchmarks/label_recovery.py --batches 20     # benchmarks/results/label_recovery/
    python benchmarks/label_recovery.py --batches 100 --out benchmarks/results/label_recovery_100
    python benchmarks/label_recovery.py --batches 20 --distinct --out benchmarks/out/label_distinct
    python benchmarks/label_recovery.py --batches 20 --models lenet --num-classes 100 \\
        --batch-size 24 --out benchmarks/results/label_recovery_k100

``table.md`` and ``table.csv`` are written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fl_core import Client, Server, build_model, load_dataset
from leakage.app.store import write_atomic
from leakage.labels import LABEL_STRATEGIES, ilrg, last_layer
from leakage.metrics import label_count_accuracy, label_set_accuracy

EXTRA = {"ilrg-paper": functools.partial(ilrg, refine_steps=0)}
COLUMNS = ["model", "strategy", "batches", "set_accuracy", "count_accuracy", "exact", "ms"]


def strategy_fn(name: str):
    """A strategy of ``leakage.labels.LABEL_STRATEGIES`` or of :data:`EXTRA`."""
    if name in EXTRA:
        return EXTRA[name]
    if name not in LABEL_STRATEGIES:
        valid = ", ".join(sorted([*LABEL_STRATEGIES.names(), *EXTRA]))
        raise ValueError(f"unknown strategy {name!r}; valid names: {valid}")
    return LABEL_STRATEGIES.get(name)


def draw_batch(labels: torch.Tensor, size: int, distinct: bool, g: torch.Generator):
    """Indices of ``size`` test images: uniformly at random, or one per random class."""
    if not distinct:
        return torch.randperm(len(labels), generator=g)[:size]
    classes = torch.randperm(int(labels.max()) + 1, generator=g)[:size]
    picks = []
    for c in classes.tolist():
        pool = (labels == c).nonzero().flatten()
        picks.append(pool[torch.randint(len(pool), (1,), generator=g)])
    return torch.cat(picks)


def run(args: argparse.Namespace) -> list[dict]:
    data = load_dataset("cifar10", root=args.data_root, train=False)
    if args.distinct and args.batch_size > data.num_classes:
        raise ValueError(f"--distinct needs --batch-size <= {data.num_classes}")
    g = torch.Generator().manual_seed(args.seed)  # the one source of every draw below
    rows = []
    for model_name in args.models:
        scores = {
            s: {"set": [], "count": [], "exact": [], "s": [], "error": None}
            for s in args.strategies
        }
        for _ in tqdm(range(args.batches), desc=model_name, disable=not args.progress):
            victim_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
            model = build_model(
                model_name,
                num_classes=args.num_classes,
                activation="sigmoid",
                generator=torch.Generator().manual_seed(victim_seed),
            )
            idx = draw_batch(data.labels, args.batch_size, args.distinct, g)
            labels = data.labels[idx]
            if args.num_classes != data.num_classes:
                labels = torch.randint(args.num_classes, (len(idx),), generator=g)
            seen = []
            client = Client(0, data.images[idx], labels)
            Server(model, [client], listeners=[seen.append], seed=victim_seed).run_round()
            obs = seen[0]
            victim = obs.model()  # the global model as sent, in the protocol's train mode
            layer = last_layer(obs, model=victim)
            for name in args.strategies:
                entry = scores[name]
                if entry["error"]:
                    continue
                strategy_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
                start = time.perf_counter()
                try:
                    got = strategy_fn(name)(
                        layer,
                        obs.protocol.num_samples,
                        model=victim,
                        generator=torch.Generator().manual_seed(strategy_seed),
                    )
                except ValueError as exc:
                    entry["error"] = str(exc).split(";")[0]
                    continue
                entry["s"].append(time.perf_counter() - start)
                entry["set"].append(label_set_accuracy(got, labels))
                entry["count"].append(label_count_accuracy(got, labels))
                entry["exact"].append(float(got.tolist() == sorted(labels.tolist())))
        for name, entry in scores.items():
            n = len(entry["set"])
            mean = (lambda v: sum(v) / len(v)) if n else (lambda v: float("nan"))
            rows.append(
                {
                    "model": model_name,
                    "strategy": name,
                    "batches": n,
                    "set_accuracy": mean(entry["set"]),
                    "count_accuracy": mean(entry["count"]),
                    "exact": mean(entry["exact"]),
                    "ms": 1000 * mean(entry["s"]),
                    "note": entry["error"] or "",
                }
            )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    draw = "one image per class" if args.distinct else "random images, repeats allowed"
    head = (
        f"Label recovery, FedSGD gradient of the mean cross-entropy, untrained sigmoid victims "
        f"(train mode), {args.num_classes} classes, batch {args.batch_size} of CIFAR-10 test "
        f"images ({draw}), {args.batches} batches, seed {args.seed}.\n\n"
        "| model | strategy | set accuracy | count accuracy | exact batches | ms / call |\n"
        "|---|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r["note"]:
            lines.append(f"| {r['model']} | {r['strategy']} | n/a | n/a | n/a | {r['note']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['set_accuracy']:.3f} | "
            f"{r['count_accuracy']:.3f} | {r['exact']:.2f} | {r['ms']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--models", nargs="+", default=["lenet", "resnet18"])
    p.add_argument(
        "--strategies", nargs="+", default=["yin", "llg", "rlg", "ilrg", "ilrg-paper", "auto"]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--distinct", action="store_true", help="one image per class in a batch")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--out", default="benchmarks/results/label_recovery")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    try:
        if args.batches < 1 or args.batch_size < 1:
            raise ValueError("--batches and --batch-size must be positive integers")
        for name in args.strategies:
            strategy_fn(name)
        rows = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown(rows, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", table)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "note"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "table.csv", buffer.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
