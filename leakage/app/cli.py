"""The ``leakage`` command line.

``leakage attack`` runs one experiment end to end (see
:mod:`leakage.app.experiment`); ``leakage train`` trains a victim and saves a
checkpoint for ``leakage attack --checkpoint`` (see :mod:`leakage.app.train_cmd`);
``leakage fl CONFIG`` runs federated rounds with poisoning clients and
defenses (see :mod:`leakage.app.fl_cmd`).
Bad input ends with a one-line message on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(EXIT_USAGE, f"leakage: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from defenses.config import DEFENSES
    from fl_core.data import DATASETS
    from fl_core.models import ACTIVATIONS, MODELS

    from ..attacks import ATTACKS
    from ..labels import LABEL_STRATEGIES
    from ..metrics import LPIPS_NETS
    from ..simulate import THREAT_MODELS
    from .fl_cmd import add_fl_parser
    from .train_cmd import add_train_parser

    p = _Parser(prog="leakage", description="Measure what federated learning leaks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser(
        "attack",
        help="attack one round's update and score the reconstruction",
        description="One round (FedSGD, FedAvg or a securely aggregated sum of several "
        "clients), the attacker listening at the server. Writes results.json, "
        "reconstruction.png and history.png into --out.",
    )
    S = argparse.SUPPRESS  # unset options do not override --config
    a.add_argument(
        "--config", metavar="FILE", help="YAML file with the same keys (CLI options win)"
    )
    a.add_argument(
        "--attack", default=S, help=f"attack: {', '.join(ATTACKS.names())} (default dlg)"
    )
    a.add_argument(
        "--model", default=S, help=f"victim: {', '.join(MODELS.names())} (default lenet)"
    )
    a.add_argument(
        "--activation", default=S, help=f"victim activation: {', '.join(sorted(ACTIVATIONS))}"
    )
    a.add_argument("--num-classes", type=int, default=S, help="classes of the victim (default 10)")
    a.add_argument(
        "--dataset",
        default=S,
        help=f"{', '.join(sorted(DATASETS))}, or a folder of class sub-folders (default samples)",
    )
    a.add_argument("--data-root", default=S, help="folder of torchvision datasets (default data)")
    a.add_argument("--download", action="store_true", default=S, help="allow dataset downloads")
    a.add_argument("--train-split", action="store_true", default=S, help="use the training split")
    a.add_argument("--images", nargs="+", metavar="FILE", default=S, help="your own image files")
    a.add_argument("--labels", nargs="+", type=int, metavar="INT", default=S, help="batch labels")
    a.add_argument("--index", type=int, default=S, help="dataset position of the first image")
    a.add_argument("--shape", nargs=3, type=int, metavar=("C", "H", "W"), default=S)
    a.add_argument("--batch-size", type=int, default=S, help="images in the batch (default 1)")
    a.add_argument(
        "--threat",
        default=S,
        help=f"threat model: {', '.join(THREAT_MODELS)} (default fedsgd)",
    )
    a.add_argument(
        "--local-steps", type=int, default=S, help="local SGD steps of FedAvg clients (default 1)"
    )
    a.add_argument("--local-lr", type=float, default=S, help="local learning rate (default 0.01)")
    a.add_argument(
        "--local-batch-size", type=int, default=S, help="local batch size (default: all data)"
    )
    a.add_argument(
        "--clients",
        type=int,
        default=S,
        help="clients behind an aggregate update (default: one per image)",
    )
    a.add_argument(
        "--label-strategy",
        default=S,
        help=f"labels: joint, {', '.join(LABEL_STRATEGIES.names())} (default: the attack's)",
    )
    a.add_argument(
        "--checkpoint", default=S, metavar="FILE", help="victim saved by 'leakage train'"
    )
    a.add_argument(
        "--steps", type=int, default=S, help="attack optimiser steps (default: the attack's)"
    )
    a.add_argument(
        "--restarts", type=int, default=S, help="random restarts (default: the attack's)"
    )
    a.add_argument("--tv", type=float, default=S, help="total-variation weight (attack ig)")
    a.add_argument(
        "--bins", type=int, default=S, help="rows of a malicious server's block (imprint, trap)"
    )
    a.add_argument("--target-class", type=int, default=S, help="class a fishing server fishes for")
    a.add_argument(
        "--sample-seed",
        type=int,
        default=S,
        help="draw the batch from a seeded random order of the dataset (default: file order)",
    )
    a.add_argument(
        "--defense",
        dest="defenses",
        action="append",
        default=S,
        metavar="NAME[:K=V,...]",
        help="a defense, repeatable, applied in order (e.g. --defense clip:max_norm=1 "
        f"--defense gaussian:sigma=0.01); names: {', '.join(DEFENSES)}",
    )
    a.add_argument(
        "--normalize",
        default=S,
        help="victim input normalisation: dataset (its mean/std), none, or auto "
        "(default: none for DLG's sigmoid LeNet, as in its paper; dataset otherwise)",
    )
    a.add_argument(
        "--bn-mode",
        default=S,
        help="BatchNorm of the client: train (batch statistics, default, as FL clients run) "
        "or eval (running statistics, as in the inversion papers)",
    )
    a.add_argument(
        "--precision", default=S, help="auto (float64 for small victims), float32 or float64"
    )
    a.add_argument(
        "--metrics",
        default=S,
        metavar="NAMES",
        help="image metrics, comma-separated: psnr, ssim, lpips (default psnr,ssim; PSNR and "
        "SSIM are always reported; LPIPS, lower is better, needs pip install "
        "'leakage-lab[lpips]' and downloads its backbone weights on first use)",
    )
    a.add_argument(
        "--lpips-net",
        default=S,
        help=f"LPIPS backbone: {', '.join(LPIPS_NETS)} (default alex)",
    )
    a.add_argument("--seed", type=int, default=S, help="seed of weights and attack (default 0)")
    a.add_argument("--device", default=S, help="cpu or cuda (default cpu)")
    a.add_argument("--out", default=S, help="output folder (default: new folder under results/)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument(
        "--threads",
        default="auto",
        type=_threads,
        help="torch CPU threads: a count, or auto (default: one thread for victims under "
        "100k parameters, torch's default otherwise)",
    )
    add_train_parser(sub)
    add_fl_parser(sub)
    return p


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or auto; got {text!r}")
    return count


def _attack(args: argparse.Namespace) -> int:
    from defenses.config import parse_defense_option

    from .experiment import load_config, make_config, run_attack

    options: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet", "threads")
    }
    if "defenses" in options:
        options["defenses"] = [parse_defense_option(d) for d in options["defenses"]]
    cfg = load_config(args.config, **options) if args.config else make_config(options)
    result = run_attack(cfg, progress=not args.quiet, threads=args.threads)
    s = result["summary"]
    psnr = "inf" if s["psnr"] is None else f"{s['psnr']:.2f}"
    lpips = ""
    if "lpips" in s:
        lpips = "LPIPS nan  " if s["lpips"] is None else f"LPIPS {s['lpips']:.4f}  "
    print(
        f"PSNR {psnr} dB  SSIM {s['ssim']:.4f}  {lpips}label accuracy {s['label_accuracy']:.2f} "
        f"(set {s['label_set_accuracy']:.2f})  recovered {s['recovered_fraction']:.2f}  "
        f"({result['seconds']:.1f} s)  -> {result['config']['out']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leakage`` command; returns the exit code."""
    import yaml

    args = _parser().parse_args(argv)
    try:
        if args.command == "attack":
            return _attack(args)
        if args.command == "train":
            from .train_cmd import run_train

            return run_train(args)
        if args.command == "fl":
            from .fl_cmd import run_fl_command

            return run_fl_command(args)
    except (ValueError, OSError, ImportError, yaml.YAMLError, json.JSONDecodeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"leakage: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
