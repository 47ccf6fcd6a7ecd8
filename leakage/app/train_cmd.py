"""The ``leakage train`` command: train a victim centrally and save a checkpoint.

Attacks on a trained network (rather than on fresh weights) start from the
checkpoint this writes; see :mod:`fl_core.checkpoint`. Two functions for
:mod:`leakage.app.cli`: :func:`add_train_parser` adds the sub-command,
:func:`run_train` runs it. Bad input raises ``ValueError`` / ``OSError``, which
the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["add_train_parser", "run_train"]


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    from fl_core.data import DATASETS
    from fl_core.models import ACTIVATIONS, MODELS

    t = subparsers.add_parser(
        "train",
        help="train a victim centrally and save a checkpoint",
        description="Plain minibatch SGD on a dataset's training split, accuracy on its "
        "test split, weights and provenance saved to --out (read with "
        "fl_core.load_checkpoint).",
    )
    t.add_argument("--model", default="lenet", help=f"victim: {', '.join(MODELS.names())}")
    t.add_argument(
        "--activation",
        default=None,
        help=f"{', '.join(sorted(ACTIVATIONS))} (default: the victim's own)",
    )
    t.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the victim (default: the dataset's; 10 for samples)",
    )
    t.add_argument(
        "--dataset",
        default="samples",
        help=f"{', '.join(sorted(DATASETS))}, or a folder of class sub-folders "
        "(or of train/ and test/ holding them) (default samples)",
    )
    t.add_argument("--data-root", default="data", help="folder of torchvision datasets")
    t.add_argument("--download", action="store_true", help="allow dataset downloads")
    t.add_argument(
        "--shape", nargs=3, type=int, metavar=("C", "H", "W"), default=None, help="resize to"
    )
    t.add_argument("--limit", type=int, default=None, help="train on a random subset of N images")
    t.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    t.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    t.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="L2 penalty (default 0; He et al. train resnet20 with --lr 0.1 "
        "--batch-size 128 --weight-decay 1e-4)",
    )
    t.add_argument(
        "--normalize",
        default="dataset",
        choices=("dataset", "none"),
        help="input normalisation the victim carries: the training data's mean/std "
        "(default) or none",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of weights, subset, batch order")
    t.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    t.add_argument("--out", required=True, metavar="PATH.pt", help="checkpoint file to write")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return t


def _splits(dataset: str) -> tuple[str, str | None]:
    """The names to load the training and test splits from (test None: no test split)."""
    from fl_core.data import DATASETS

    key = str(dataset).lower().replace("_", "-")
    if key in DATASETS:
        return dataset, (None if key == "samples" else dataset)
    folder = Path(dataset)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return str(folder / "train"), str(folder / "test")
    return dataset, None


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda is not available on this machine; use --device cpu")
    return device


def run_train(args: argparse.Namespace) -> int:
    """Run ``leakage train``: load, train, evaluate, save; print one line. Returns 0."""
    import torch

    from fl_core import (
        build_model,
        dataset_normalization,
        evaluate_accuracy,
        load_dataset,
        save_checkpoint,
        train_victim,
    )

    start = time.perf_counter()
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out}/victim.pt")
    if args.num_classes is not None and args.num_classes < 2:
        raise ValueError(f"--num-classes must be at least 2; got {args.num_classes}")
    device = _device(args.device)
    train_name, test_name = _splits(args.dataset)
    load = dict(
        root=args.data_root,
        download=args.download,
        shape=args.shape,
        num_classes=args.num_classes or 10,
        seed=args.seed,
    )
    train = load_dataset(train_name, train=True, limit=args.limit, **load)
    num_classes = args.num_classes or train.num_classes
    if num_classes < train.num_classes:
        raise ValueError(
            f"--num-classes {num_classes} is below the {train.num_classes} classes of the data"
        )

    generator = torch.Generator().manual_seed(args.seed)  # weights, then batch order
    model = build_model(
        args.model,
        num_classes=num_classes,
        in_shape=train.shape,
        activation=args.activation,
        normalize=None if args.normalize == "none" else dataset_normalization(train_name, train),
        generator=generator,
    ).to(device)
    train_start = time.perf_counter()
    losses = train_victim(
        model,
        train.images,
        train.labels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        generator=generator,
        progress=not args.quiet,
    )
    train_seconds = time.perf_counter() - train_start
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"training diverged (loss {losses[-1]}); lower --lr")

    split = "test" if test_name is not None else "train"
    test = train if test_name is None else load_dataset(test_name, train=False, **load)
    accuracy = evaluate_accuracy(model, test.images, test.labels)
    seconds = time.perf_counter() - start
    meta = {
        "dataset": str(args.dataset),
        "num_train": len(train),
        "limit": args.limit,
        "shape": list(train.shape),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "normalize": args.normalize,
        "device": str(device),
        "train_losses": losses,
        "accuracy": accuracy,
        "accuracy_split": split,
        "num_eval": len(test),
        "train_seconds": train_seconds,
        "seconds": seconds,
    }
    save_checkpoint(model, out, meta=meta)
    note = "" if test_name is not None else f" (no test split for {args.dataset}: train images)"
    print(
        f"{split} accuracy {accuracy:.4f}{note}  train loss {losses[-1]:.4f}  "
        f"({train_seconds:.1f} s training, {seconds:.1f} s total)  -> {out}"
    )
    return 0
