"""torch.profiler tables of the attacks' inner loops: where each evaluation's time goes.

One thread, the original DLG's sigmoid LeNet (100 classes, raw pixels), one
CIFAR-10 *training* image (the development set of ``benchmarks/lbfgs_history.py``)
observed through one FedSGD round by an honest-but-curious server. Cases:

* ``dlg``, ``idlg``: the attacks' defaults, run to convergence;
* ``dlg compiled``, ``idlg compiled``: the same with ``compile=True`` (the
  untimed first run compiles);
* ``ig``: inverting gradients, 300 iterations, one restart;
* ``dlg x8``: lock-step DLG, 8 restarts batched, 5 L-BFGS steps each;
* ``ig x8``: inverting gradients, 8 restarts batched, 200 iterations.

Each case runs once untimed, once timed (seconds and evaluations), and once
under the profiler. The operators with the most self time go to
``<out>/profiles.md`` (written atomically), with milliseconds per evaluation.

    python benchmarks/profile_hot_paths.py --data ../shared/datasets
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core import Client, Server, build_model, load_dataset  # noqa: E402
from leakage import ATTACKS  # noqa: E402
from leakage.app.store import write_atomic  # noqa: E402

CASES = {
    "dlg": ("dlg", {}),
    "idlg": ("idlg", {}),
    "dlg compiled": ("dlg", {"compile": True}),
    "idlg compiled": ("idlg", {"compile": True}),
    "ig": ("ig", {"steps": 300, "restarts": 1}),
    "dlg x8": (
        "dlg",
        {"steps": 5, "restarts": 8, "tol": 0.0, "early_stop": False, "batched": True},
    ),  # fmt: skip
    "ig x8": ("ig", {"steps": 200, "restarts": 8}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder holding CIFAR-10 (see load_dataset)")
    p.add_argument("--image", type=int, default=12382, help="index of the training image")
    p.add_argument("--rows", type=int, default=12, help="operators listed per case")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/hot_paths"))
    args = p.parse_args(argv)
    data = load_dataset("cifar10", root=args.data, train=True)
    if not 0 <= args.image < len(data):
        p.error(f"--image must be in [0, {len(data) - 1}]")
    torch.set_num_threads(1)
    image, label = (
        data.images[args.image : args.image + 1],
        data.labels[args.image : args.image + 1],
    )
    model = build_model("lenet", num_classes=100, generator=torch.Generator().manual_seed(0))
    seen = []
    Server(model, [Client(0, image, label)], listeners=[seen.append], seed=0).run_round()
    obs = seen[0]
    lines = ["# Profiles of the attacks' inner loops", "",
             "Reproduced by `python benchmarks/profile_hot_paths.py --data ../shared/datasets`. "
             f"One thread, sigmoid LeNet (100 classes), CIFAR-10 training image {args.image}, "
             "FedSGD, honest-but-curious server; torch.profiler, operators by self CPU time.",
             ""]  # fmt: skip
    for case in args.cases:
        name, options = CASES[case]
        atk = ATTACKS.build(name, **options)

        def run(atk=atk):
            return atk.reconstruct(obs, generator=torch.Generator().manual_seed(0))

        run()
        start = time.perf_counter()
        rec = run()
        seconds = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
        per = 1e3 * seconds / rec.evaluations
        lines += [f"## {case}", "", f"{seconds:.2f} s, {rec.evaluations} evaluations, "
                  f"{per:.2f} ms per evaluation (timed without the profiler).", "",
                  "```", table.strip(), "```", ""]  # fmt: skip
        print(f"{case}: {seconds:.2f} s, {rec.evaluations} evaluations, {per:.2f} ms each",
              flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "profiles.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
