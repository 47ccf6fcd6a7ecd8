"""The lab's hot paths, each measured beside its peer in the same run on this machine.

One command, four sections (``--only`` picks some):

* ``scoring``: SSIM and PSNR of 64 pairs of 32x32 RGB images against
  scikit-image's per-image loop, the B x B SSIM matrix and MSE matching against
  the loop over every pair, one thread, with the largest difference from
  scikit-image (the target: batched SSIM >= 10x, equal within 1e-6). LPIPS is
  scored against the ``lpips`` package's per-image loop where its backbone
  weights can be loaded.
* ``restarts``: the wall time of a fixed budget with R = 1, 2, 4, 8 restarts
  batched, against one restart (target: 8 restarts <= 3x one), for IG on the
  sigmoid LeNet and on ResNet-18 and for lock-step DLG on the sigmoid LeNet;
  for DLG also its batched objective alone and how the victim's convolutions
  scale from 1 to 8 images, in float64 and float32.
* ``dlg``: time per success (every image at PSNR >= 30 dB; total seconds over
  successes) of the lab's DLG and iDLG at batch 1 on the sigmoid LeNet, eager
  and with ``compile=True`` (timed after one warm-up attack on a development
  image, whose seconds are recorded apart, as are each objective's
  milliseconds alone), and, with ``--original-dlg PATH`` (a checkout of
  mit-han-lab/dlg), of the original code's loop on the same network, weights
  and images (target: >= 10x).
* ``engines``: client updates per second of the vmap engine, eager and through
  ``torch.compile`` (``batched: compiled``; its first, untimed round compiles
  and is recorded), against the client loop (``benchmarks/fl_throughput.py``'s
  measurement, the three engines run in turn three times, medians; target:
  >= 3x for the LeNet at 8 images per client).

Threat model of the attacks: honest-but-curious server, one client's FedSGD
gradient of one image. Every measurement is one JSON line in
``<out>/records.jsonl``; a measured key is not remeasured without ``--again``,
so an interrupted run resumes, and ``<out>/summary.md`` is rebuilt from the
records alone.

    python benchmarks/hot_paths.py                              # all but the original DLG
    python benchmarks/hot_paths.py --only dlg --original-dlg ../dlg --images 6 --seeds 2
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fl_throughput, a sibling script

from fl_core import Client, Server, build_model, load_dataset, load_samples  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402
from leakage.metrics import match_images, psnr, ssim, ssim_matrix  # noqa: E402

SECTIONS = ("scoring", "restarts", "dlg", "engines")
SUCCESS_DB = 30.0
RESTARTS = (1, 2, 4, 8)
TARGETS = {
    "ssim": 10.0,  # lab >= 10x scikit-image's loop
    "restarts": 3.0,  # 8 restarts <= 3x one
    "dlg": 10.0,  # lab >= 10x the original DLG code per success
    "engines": 3.0,  # vmap >= 3x the loop
}


def _machine() -> dict:
    return {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _paired(lab: Callable[[], object], peer: Callable[[], object], repeats: int):
    """The fastest of ``repeats`` timed calls of each, the two alternating (after one
    warm-up call each), so that both meet the same state of a shared machine."""
    lab(), peer()
    lab_s, peer_s = [], []
    for _ in range(repeats):
        for fn, times in ((lab, lab_s), (peer, peer_s)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(lab_s), min(peer_s)


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------- scoring


def scoring(args, done: set, record: Callable[[dict], None]) -> None:
    from scipy.optimize import linear_sum_assignment
    from skimage.metrics import (
        mean_squared_error,
        peak_signal_noise_ratio,
        structural_similarity,
    )

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(args.seed)
        b = args.pairs
        x = torch.rand(b, 3, 32, 32, generator=g, dtype=torch.float64)
        y = (x + 0.1 * torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
        xn, yn = x.numpy(), y.numpy()

        def sk_ssim(i: int, j: int) -> float:
            return structural_similarity(
                xn[i], yn[j], channel_axis=0, data_range=1.0, gaussian_weights=True,
                sigma=1.5, use_sample_covariance=False,
            )  # fmt: skip

        cases = {
            "ssim": (
                lambda: ssim(x, y, data_range=1.0),
                lambda: np.array([sk_ssim(i, i) for i in range(b)]),
                args.repeats,
            ),
            "psnr": (
                lambda: psnr(x, y, data_range=1.0),
                lambda: np.array(
                    [peak_signal_noise_ratio(yn[i], xn[i], data_range=1.0) for i in range(b)]
                ),
                args.repeats,
            ),
            "ssim_matrix": (
                lambda: ssim_matrix(x, y, data_range=1.0),
                lambda: np.array([[sk_ssim(i, j) for j in range(b)] for i in range(b)]),
                1,
            ),
            "match_mse": (
                lambda: match_images(y, x),
                lambda: linear_sum_assignment(
                    np.array(
                        [[mean_squared_error(xn[i], yn[j]) for j in range(b)] for i in range(b)]
                    )  # fmt: skip
                )[1],
                1,
            ),
        }
        for name, (lab, peer, repeats) in cases.items():
            key = ("scoring", name, b)
            if key in done:
                continue
            got, want = lab(), peer()
            diff = float(np.abs(np.asarray(got, dtype=np.float64) - want).max())
            lab_s, peer_s = _paired(lab, peer, repeats)
            record({"section": "scoring", "name": name, "setting": b, "lab_s": lab_s,
                    "peer": "scikit-image loop", "peer_s": peer_s, "max_abs_diff": diff,
                    "threads": 1})  # fmt: skip
        _lpips(args, x, y, done, record)
    finally:
        torch.set_num_threads(previous)


def _lpips(args, x, y, done, record) -> None:
    key = ("scoring", "lpips", args.pairs)
    if key in done:
        return
    from leakage.metrics import lpips

    try:
        import lpips as package

        peer_model = package.LPIPS(net="alex", verbose=False)
        lab = lambda: lpips(x, y, data_range=1.0)  # noqa: E731
        lab()
    except Exception as e:  # no package or no weights on this machine: say so
        print(f"lpips skipped: {str(e).splitlines()[0][:120]}", flush=True)
        return
    xs, ys = x.float() * 2 - 1, y.float() * 2 - 1

    def peer() -> np.ndarray:
        with torch.no_grad():
            return np.array(
                [float(peer_model(xs[i : i + 1], ys[i : i + 1])) for i in range(len(x))]
            )

    diff = float(np.abs(lab().numpy() - peer()).max())
    record({"section": "scoring", "name": "lpips", "setting": args.pairs,
            **dict(zip(("lab_s", "peer_s"), _paired(lab, peer, 3))), "peer": "lpips package loop",
            "max_abs_diff": diff, "threads": 1})  # fmt: skip


# ---------------------------------------------------------------- restarts

RESTART_CASES = {
    # name: (attack, model, activation, fixed budget)
    "ig-lenet": ("ig", "lenet", "sigmoid", {"steps": 200}),
    "dlg-lenet": (
        "dlg",
        "lenet",
        "sigmoid",
        {"steps": 5, "tol": 0.0, "early_stop": False, "batched": True},
    ),  # fmt: skip
    "ig-resnet18": ("ig", "resnet18", "sigmoid", {"steps": 10}),
}


def _observe(model, images, labels, seed: int):
    seen = []
    Server(model, [Client(0, images, labels)], listeners=[seen.append], seed=seed).run_round()
    return seen[0]


def restarts(args, done: set, record: Callable[[dict], None]) -> None:
    data = load_samples()
    images, labels = data.images[:1], data.labels[:1]
    for name, (attack, model_name, act, budget) in RESTART_CASES.items():
        if name not in args.restart_cases:
            continue
        model = build_model(
            model_name, activation=act, generator=torch.Generator().manual_seed(args.seed)
        )
        obs = _observe(model, images, labels, args.seed)
        pending = [r for r in RESTARTS if ("restarts", name, r) not in done]
        attacks = {r: ATTACKS.build(attack, restarts=r, **budget) for r in pending}

        def run(r: int, obs=obs, attacks=attacks):  # the same random starts every time
            return attacks[r].reconstruct(obs, generator=torch.Generator().manual_seed(args.seed))

        evaluations = {r: run(r).evaluations for r in pending}  # and a warm-up
        times: dict[int, list[float]] = {r: [] for r in pending}
        for _ in range(args.restart_repeats):  # every R in turn, so drift hits them alike
            for r in pending:
                start = time.perf_counter()
                run(r)
                times[r].append(time.perf_counter() - start)
        for r in pending:
            record({"section": "restarts", "name": name, "setting": r, "lab_s": min(times[r]),
                    "seconds_all": times[r], "evaluations": evaluations[r],
                    "threads": torch.get_num_threads()})  # fmt: skip
        if attack == "dlg" and ("objective", name, 8) not in done:
            cases = {r: (None, False, r) for r in (1, 8)}
            for r, ms in _objective_ms(obs, cases, args.restart_repeats).items():
                record({"section": "objective", "name": name, "setting": r,
                        "lab_s": ms / 1e3})  # fmt: skip
        if attack == "dlg" and ("conv-scaling", name, "8 images, 1 threads, float32") not in done:
            for setting, seconds in _conv_scaling(model, args.restart_repeats).items():
                record({"section": "conv-scaling", "name": name, "setting": setting,
                        "lab_s": seconds})  # fmt: skip
        if ("flops", name, 1) not in done:  # the arithmetic of one restart's budget
            from torch.utils.flop_counter import FlopCounterMode

            atk = ATTACKS.build(attack, restarts=1, **budget)
            with FlopCounterMode(display=False) as counter:
                atk.reconstruct(obs, generator=torch.Generator().manual_seed(args.seed))
            record({"section": "flops", "name": name, "setting": 1, "lab_s": 0.0,
                    "flops": counter.get_total_flops()})  # fmt: skip


def _conv_scaling(model: torch.nn.Module, repeats: int) -> dict:
    """Seconds of one forward pass through each of ``model``'s convolutions,
    summed over the layers, for 1 and 8 images, on one thread and on the threads
    in use, in float64 (DLG's precision on this victim) and float32: whether the
    batch amortizes the convolutions' work. Each case is the fastest of
    ``repeats`` timings of 20 calls, the cases taken in turn."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    shapes: dict[torch.nn.Module, tuple] = {}

    def keep(module, inputs, output) -> None:
        shapes[module] = inputs[0].shape[1:]

    hooks = [m.register_forward_hook(keep) for m in convs]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *model.spec.in_shape))
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    cases = {}
    for dtype in (torch.float64, torch.float32):
        layers = [(m.weight.detach().to(dtype), m.stride, m.padding) for m in convs]
        for t in sorted({1, threads}):
            for r in (1, 8):
                xs = [torch.rand(r, *shapes[m], generator=g, dtype=dtype) for m in convs]
                name = f"{r} images, {t} threads" + ("" if dtype == torch.float64 else ", float32")
                cases[name] = (t, layers, xs)
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):
        for name, (t, layers, xs) in cases.items():

            def run(layers=layers, xs=xs):
                for _ in range(20):
                    for (w, stride, pad), x in zip(layers, xs):
                        torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)

            torch.set_num_threads(t)
            try:
                best[name] = min(best[name], _best_of(run, 1) / 20)
            finally:
                torch.set_num_threads(threads)
    return best


def _objective_ms(obs, cases: dict, repeats: int) -> dict:
    """Milliseconds per call of DLG's matching objective alone (no L-BFGS) for each
    case ``key -> (labels or None, compiled, restarts R)``: the cases timed in turn
    ``repeats`` times (50 calls each after 5 untimed ones), the fastest kept.
    ``compiled="guarded"`` is the compiled objective without ``lean`` (every
    guard evaluated, inductor's Python wrapper), as DLG ran before lean calls."""
    from fl_core.compiled import CompiledObjective
    from leakage.attacks.dlg import _Problem
    from leakage.attacks.matching import setup

    st = setup(obs, dtype="auto", device=None, lbfgs=True)
    g = torch.Generator().manual_seed(0)
    timed = {}
    for key, (labels, compiled, r) in cases.items():
        problem = _Problem(st, labels, compiled=compiled is True)
        if compiled == "guarded":  # through a function of its own, so that the attack's
            # functions keep one compiled graph each (lean calls need that)
            problem._one = CompiledObjective(
                lambda z, p=problem: p._functional(z), problem._eager, "DLG"
            )
        n = problem.nx + (problem.y_shape[-1] if labels is None else 0)
        timed[key] = (problem, torch.rand(r, n, generator=g, dtype=st.dtype))
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):
        for key, (problem, z) in timed.items():
            which = list(range(len(z)))
            with st.backend(len(z)):
                for _ in range(5):
                    problem.objective(z, which)
                start = time.perf_counter()
                for _ in range(50):
                    problem.objective(z, which)
            best[key] = min(best[key], (time.perf_counter() - start) / 50 * 1e3)
    return best


# ---------------------------------------------------------------- DLG time per success


def _dlg_images(args):
    if args.data:
        data = load_dataset("cifar10", root=args.data, train=False)
        g = torch.Generator().manual_seed(args.sample_seed)
        order = torch.randperm(len(data), generator=g)[: args.images].tolist()
        return data.subset(order), f"CIFAR-10 test, sample seed {args.sample_seed}"
    data = load_samples()
    return data.subset(list(range(min(args.images, len(data))))), "scikit-image photographs"


def _original_dlg(path: Path, model, images, labels, seed: int, steps: int) -> dict:
    """The original code's attack (mit-han-lab/dlg ``main.py``) on ``model``'s weights:
    its LeNet and loss from the checkout, dummy data and label logits N(0, 1) from the
    global generator it seeds, torch's L-BFGS with default settings, ``steps`` steps.

    The reconstruction is scored every 10 steps, outside the timing: ``first_s`` is
    the time to the first score >= 30 dB (an oracle the attacker does not have, so
    a lower bound on the code's cost), ``seconds`` the whole run as the code runs
    it and ``psnr`` its final image's."""
    sys.path.insert(0, str(path))
    try:
        vision = importlib.import_module("models.vision")
        utils = importlib.import_module("utils")
    finally:
        sys.path.remove(str(path))
    net = vision.LeNet()
    with torch.no_grad():
        for theirs, ours in zip(net.parameters(), model.parameters(), strict=True):
            theirs.copy_(ours)
    onehot = utils.label_to_onehot(labels, num_classes=100)
    loss = utils.cross_entropy_for_onehot(net(images), onehot)
    target = [g.detach() for g in torch.autograd.grad(loss, list(net.parameters()))]
    torch.manual_seed(seed)  # the original draws its start from the global generator
    dummy = torch.randn(images.shape).requires_grad_(True)
    dummy_label = torch.randn(onehot.shape).requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy, dummy_label])

    def closure():
        optimizer.zero_grad()
        pred = net(dummy)
        dummy_loss = utils.cross_entropy_for_onehot(pred, torch.softmax(dummy_label, dim=-1))
        grads = torch.autograd.grad(dummy_loss, list(net.parameters()), create_graph=True)
        diff = sum(((gx - gy) ** 2).sum() for gx, gy in zip(grads, target, strict=True))
        diff.backward()
        return diff

    seconds, first, value = 0.0, None, -math.inf
    for step in range(steps):
        start = time.perf_counter()
        optimizer.step(closure)
        seconds += time.perf_counter() - start
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                value = float(psnr(dummy.detach().clamp(0, 1), images, data_range=1.0)[0])
            if first is None and value >= SUCCESS_DB:
                first = seconds
    value = value if math.isfinite(value) else -math.inf
    return {"seconds": seconds, "psnr": value, "first_s": first, "steps": steps}


def dlg(args, done: set, record: Callable[[dict], None]) -> None:
    previous = torch.get_num_threads()
    try:
        _dlg_runs(args, done, record)
    finally:
        torch.set_num_threads(previous)  # the sections after it get the threads asked for


COMPILED = {"dlg-compiled": "dlg", "idlg-compiled": "idlg"}
"""The lab's attacks with ``compile=True``: timed after one warm-up attack in the
process (on a development image), whose compilation is recorded apart."""


def _warm_up_compiled(args, done: set, record: Callable[[dict], None]) -> None:
    """Compile DLG's and iDLG's objectives with one attack each on a development
    image (a CIFAR-10 *training* image with ``--data``, else the last photograph)
    and record its seconds; then each objective alone, eager and compiled, timed
    in turn (one restart, no L-BFGS)."""
    if args.data:
        dev, index = load_dataset("cifar10", root=args.data, train=True), 12382
    else:
        dev = load_samples()
        index = len(dev) - 1
    images, labels = dev.images[index : index + 1], dev.labels[index : index + 1]
    model = build_model("lenet", num_classes=100, generator=torch.Generator().manual_seed(0))
    obs = _observe(model, images, labels, 0)
    torch.set_num_threads(1)
    for name, base in COMPILED.items():
        start = time.perf_counter()
        rec = ATTACKS.build(base, compile=True).reconstruct(obs)
        seconds = time.perf_counter() - start
        if ("dlg-compile", name, "warm-up") not in done:
            record({"section": "dlg-compile", "name": name, "setting": "warm-up",
                    "lab_s": seconds, "evaluations": rec.evaluations})  # fmt: skip
        if ("dlg-objective", name, "compiled") in done:
            continue
        fixed = None if base == "dlg" else labels
        cases = {"eager": (fixed, False, 1), "compiled, guarded": (fixed, "guarded", 1),
                 "compiled": (fixed, True, 1)}  # fmt: skip
        ms = _objective_ms(obs, cases, args.restart_repeats)
        for setting, value in ms.items():
            record({"section": "dlg-objective", "name": name, "setting": setting,
                    "lab_s": value / 1e3})  # fmt: skip


def _dlg_runs(args, done: set, record: Callable[[dict], None]) -> None:
    data, source = _dlg_images(args)
    runs = [(i, s) for i in range(len(data.labels)) for s in range(args.seeds)]
    who = ["dlg", "idlg", *COMPILED] + (["original-dlg"] if args.original_dlg else [])
    todo = [(a, f"{source}#{i}#{s}") for i, s in runs for a in COMPILED]
    if any(("dlg", a, setting) not in done for a, setting in todo) or not all(
        ("dlg-objective", a, "compiled") in done for a in COMPILED
    ):
        _warm_up_compiled(args, done, record)
    for i, seed in runs:
        for attack in who:  # side by side on each image, so the machine's drift is shared
            key = ("dlg", attack, f"{source}#{i}#{seed}")
            if key in done:
                continue
            images, labels = data.images[i : i + 1], data.labels[i : i + 1]
            # the original's LeNet: 100 classes, U(-0.5, 0.5) weights, raw pixels
            model = build_model(
                "lenet", num_classes=100, generator=torch.Generator().manual_seed(seed)
            )
            # each with its own thread default: the lab's --threads auto picks one for
            # a victim this small, the original code runs with torch's default
            torch.set_num_threads(args.threads if attack == "original-dlg" else 1)
            if attack == "original-dlg":
                got = _original_dlg(Path(args.original_dlg), model, images, labels, seed,
                                    args.original_steps)  # fmt: skip
            else:
                obs = _observe(model, images, labels, seed)
                atk = (
                    ATTACKS.build(COMPILED[attack], compile=True)
                    if attack in COMPILED
                    else ATTACKS.build(attack)
                )
                start = time.perf_counter()
                rec = atk.reconstruct(obs, generator=torch.Generator().manual_seed(seed))
                seconds = time.perf_counter() - start
                value = float(score_images(rec.images, images, data_range=1.0).psnr.min())
                got = {"seconds": seconds, "psnr": value, "evaluations": rec.evaluations}
            record({"section": "dlg", "name": attack, "setting": key[2], "images": source,
                    "lab_s": got["seconds"], "psnr": got["psnr"],
                    "success": got["psnr"] >= SUCCESS_DB, "threads": torch.get_num_threads(),
                    **{k: v for k, v in got.items()
                       if k in ("steps", "evaluations", "first_s")}})  # fmt: skip


# ---------------------------------------------------------------- engines


ENGINE_VARIANTS = ("loop", "batched", "compiled")
"""The client loop, the vmap engine, and the vmap engine through ``torch.compile``
(``batched: compiled``; its first, untimed round compiles: ``warmup_s``)."""


def engines(args, done: set, record: Callable[[dict], None]) -> None:
    """Each case's loop and vmap engine timed in turn, ``--engine-repeats`` times
    (each a fresh run of ``--engine-rounds`` rounds, the first untimed); the
    median updates per second of each engine is kept."""
    fl_throughput = importlib.import_module("fl_throughput")
    for model, algorithm in [(m, a) for m in ("lenet", "cnn") for a in ("fedsgd", "fedavg")]:
        names = {e: f"{model}-{algorithm}-{e}" for e in ENGINE_VARIANTS}
        if all(("engines", n, args.engine_clients) in done for n in names.values()):
            continue
        ns = argparse.Namespace(
            dataset="fashion-mnist" if model == "lenet" else "cifar10",
            data_root=args.data_root, per_client=8, rounds=args.engine_rounds,
            algorithm=algorithm, local_steps=5, seed=args.seed, device="cpu",
        )  # fmt: skip
        rates: dict[str, list[float]] = {e: [] for e in names}
        warmups: dict[str, list[float]] = {e: [] for e in names}
        for _ in range(args.engine_repeats):  # alternately, so drift hits every engine
            for engine in names:
                got = fl_throughput.measure(ns, model, args.engine_clients, engine)
                rates[engine].append(got["updates_per_s"])
                warmups[engine].append(got["warmup_s"])
        for engine, name in names.items():
            rate = statistics.median(rates[engine])
            record({"section": "engines", "name": name, "setting": args.engine_clients,
                    "lab_s": args.engine_clients * (args.engine_rounds - 1) / rate,
                    "updates_per_s": rate, "updates_per_s_all": rates[engine],
                    "warmup_s": warmups[engine],
                    "dataset": ns.dataset, "threads": got["threads"]})  # fmt: skip


# ---------------------------------------------------------------- summary


def _key(r: dict) -> tuple:
    return (r["section"], r["name"], r["setting"])


def _verdict(x: float, target: float, larger: bool = True) -> str:
    return "met" if (x >= target if larger else x <= target) else "NOT met"


def summary(records: list[dict], command: str) -> str:
    by = {_key(r): r for r in records}
    lines = ["# Hot paths against their peers", "", "Reproduced by", "",
             "    python benchmarks/hot_paths.py --data ../shared/datasets --images 6 --seeds 2 "
             "--original-dlg PATH", "",
             "with PATH a checkout of mit-han-lab/dlg (measured at d21007f); the records were "
             "taken in parts with `--only` and `--again`, each record naming its command where "
             f"it was kept (this summary: `{command}`).", ""]  # fmt: skip
    if records:
        m = records[-1]
        lines += [f"Machine: {m['processor']}, torch {m['torch']}; threads as listed.", ""]
    score = [r for r in records if r["section"] == "scoring"]
    if score:
        lines += ["## Scoring (one thread)", "",
                  "| metric | pairs | lab ms | peer | peer ms | peer / lab | max abs diff |",
                  "|---|--:|--:|---|--:|--:|--:|"]  # fmt: skip
        for r in score:
            lines.append(
                f"| {r['name']} | {r['setting']} | {1e3 * r['lab_s']:.2f} | {r['peer']} | "
                f"{1e3 * r['peer_s']:.2f} | {r['peer_s'] / r['lab_s']:.1f}x | "
                f"{r['max_abs_diff']:.1e} |"
            )
        if ("scoring", "ssim", 64) in by:
            r = by[("scoring", "ssim", 64)]
            x = r["peer_s"] / r["lab_s"]
            ok = x >= TARGETS["ssim"] and r["max_abs_diff"] <= 1e-6
            verdict = "met" if ok else "NOT met"
            lines += ["", f"Target batched SSIM >= 10x scikit-image on 64 pairs, equal within "
                      f"1e-6: {x:.1f}x, {r['max_abs_diff']:.1e}, {verdict}."]  # fmt: skip
        lines.append("")
    rs = [r for r in records if r["section"] == "restarts"]
    if rs:
        lines += ["## Batched restarts (fixed budget, one image)", "",
                  "| case | restarts | evaluations | seconds | x one restart | threads |",
                  "|---|--:|--:|--:|--:|--:|"]  # fmt: skip
        for r in rs:
            one = by.get(("restarts", r["name"], 1))
            x = r["lab_s"] / one["lab_s"] if one else math.nan
            lines.append(f"| {r['name']} | {r['setting']} | {r['evaluations']} | "
                         f"{r['lab_s']:.2f} | {x:.2f} | {r['threads']} |")  # fmt: skip
        rates = []
        for name in RESTART_CASES:
            flops = by.get(("flops", name, 1))
            timed = [by.get(("restarts", name, r)) for r in RESTARTS]
            if flops and all(timed):
                gf = [r * flops["flops"] / t["lab_s"] / 1e9 for r, t in zip(RESTARTS, timed)]
                rates.append(f"| {name} | {flops['flops'] / 1e9:.2f} | "
                             + " | ".join(f"{x:.1f}" for x in gf) + " |")  # fmt: skip
        if rates:
            lines += ["", "Arithmetic rate (convolution and matrix-product FLOPs counted by "
                      "torch's FlopCounterMode for one restart, times R, over the seconds):", "",
                      "| case | GFLOP per restart | GFLOP/s, R = 1 | 2 | 4 | 8 |",
                      "|---|--:|--:|--:|--:|--:|", *rates]  # fmt: skip
        for name in RESTART_CASES:
            one, eight = by.get(("objective", name, 1)), by.get(("objective", name, 8))
            if one and eight:
                lines.append(f"\n{name}: the batched objective alone (no L-BFGS) takes "
                             f"{one['lab_s'] * 1e3:.2f} ms for one restart and "
                             f"{eight['lab_s'] * 1e3:.2f} ms for 8, "
                             f"{eight['lab_s'] / one['lab_s']:.2f}x.")  # fmt: skip
        for name in RESTART_CASES:
            conv = {r["setting"]: r["lab_s"] for r in records
                    if r["section"] == "conv-scaling" and r["name"] == name}  # fmt: skip
            ts = sorted({int(s.split(", ")[1].split()[0]) for s in conv})
            for suffix, dtype in (("", "float64"), (", float32", "float32")):
                keys = [f"{r} images, {t} threads{suffix}" for r in (1, 8) for t in ts]
                if not ts or not all(k in conv for k in keys):
                    continue
                parts = []
                for t in ts:
                    a = conv[f"1 images, {t} threads{suffix}"]
                    b = conv[f"8 images, {t} threads{suffix}"]
                    parts.append(f"{a * 1e3:.3f} ms for one image and {b * 1e3:.3f} ms for 8 "
                                 f"on {t} thread{'s' if t > 1 else ''} ({b / a:.1f}x)")  # fmt: skip
                lines.append(f"\n{name}: the victim's convolutions in {dtype} (forward, summed "
                             f"over its layers) take " + "; ".join(parts) + ".")  # fmt: skip
        for name in RESTART_CASES:
            one, eight = by.get(("restarts", name, 1)), by.get(("restarts", name, 8))
            if one and eight:
                x = eight["lab_s"] / one["lab_s"]
                lines.append(f"\nTarget 8 restarts <= 3x one, {name}: {x:.2f}x, "
                             f"{_verdict(x, TARGETS['restarts'], larger=False)}.")  # fmt: skip
        lines.append("")
    ds = [r for r in records if r["section"] == "dlg"]
    if ds:
        lines += ["## DLG / iDLG at batch 1, sigmoid LeNet (100 classes), time per success", "",
                  "| attack | images | runs | successes | total s | s per success | "
                  "median PSNR |", "|---|---|--:|--:|--:|--:|--:|"]  # fmt: skip
        per = {}
        for name in ("dlg", "idlg", *COMPILED, "original-dlg"):
            group = [r for r in ds if r["name"] == name]
            if not group:
                continue
            ok = sum(r["success"] for r in group)
            total = sum(r["lab_s"] for r in group)
            per[name] = total / ok if ok else math.inf
            lines.append(
                f"| {name} | {group[0]['images']} | {len(group)} | {ok} | {total:.1f} | "
                f"{per[name]:.1f} | {statistics.median(r['psnr'] for r in group):.1f} |"
            )
        oracle = [r for r in ds if r["name"] == "original-dlg" and "first_s" in r]
        if oracle:
            hits = [r for r in oracle if r["first_s"] is not None]
            spent = sum(r["first_s"] if r["first_s"] is not None else r["lab_s"] for r in oracle)
            per["original-dlg, stopped at 30 dB"] = spent / len(hits) if hits else math.inf
            lines.append(
                f"\nThe original code stopped by an oracle at its first image >= 30 dB (scored "
                f"every 10 steps): {len(hits)}/{len(oracle)} reach it, "
                f"{per['original-dlg, stopped at 30 dB']:.1f} s per success."
            )
        warm = {r["name"]: r for r in records if r["section"] == "dlg-compile"}
        for name in COMPILED:
            if name in warm and name in per:
                group = [r for r in ds if r["name"] == name]
                ok = sum(r["success"] for r in group)
                with_warm = (sum(r["lab_s"] for r in group) + warm[name]["lab_s"]) / max(ok, 1)
                lines.append(
                    f"\n{name}: `compile=True`, timed after one warm-up attack in the process "
                    f"on a development image ({warm[name]['lab_s']:.1f} s, compilation "
                    f"included, not in the table); counting it, {with_warm:.1f} s per success "
                    f"over these {len(group)} runs."
                )
        objective = {(r["name"], r["setting"]): r for r in records
                     if r["section"] == "dlg-objective"}  # fmt: skip
        for name in COMPILED:
            eager, fast = objective.get((name, "eager")), objective.get((name, "compiled"))
            guarded = objective.get((name, "compiled, guarded"))
            if eager and fast:
                lines.append(
                    f"\n{COMPILED[name]}'s objective alone (one restart, no L-BFGS, one "
                    f"thread): {eager['lab_s'] * 1e3:.2f} ms eager, "
                    + (f"{guarded['lab_s'] * 1e3:.2f} ms compiled without `lean` (every "
                       "guard evaluated, Python wrapper), " if guarded else "")
                    + f"{fast['lab_s'] * 1e3:.2f} ms compiled (lean calls)."
                )  # fmt: skip
        for peer in ("original-dlg", "original-dlg, stopped at 30 dB"):
            for name in ("dlg", "idlg", *COMPILED):
                if peer in per and name in per and math.isfinite(per[peer]):
                    x = per[peer] / per[name]
                    lines.append(f"\nTarget {name} >= 10x {peer} per success: {x:.1f}x, "
                                 f"{_verdict(x, TARGETS['dlg'])}.")  # fmt: skip
        lines.append("")
    es = [r for r in records if r["section"] == "engines"]
    if es:
        lines += ["## Client engines (8 images per client; FedAvg: 5 local steps)", "",
                  "| victim | algorithm | clients | loop updates / s | batched updates / s | "
                  "batched / loop | compiled updates / s | compiled / loop | "
                  "compiled's first round s | threads |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for model in ("lenet", "cnn"):
            for algorithm in ("fedsgd", "fedavg"):
                loop = by.get(("engines", f"{model}-{algorithm}-loop", es[0]["setting"]))
                fast = by.get(("engines", f"{model}-{algorithm}-batched", es[0]["setting"]))
                comp = by.get(("engines", f"{model}-{algorithm}-compiled", es[0]["setting"]))
                if not (loop and fast):
                    continue
                cells = []
                for r in (fast, comp):
                    if r is None:
                        cells += ["-", "-"]
                        continue
                    x = r["updates_per_s"] / loop["updates_per_s"]
                    verdict = f" ({_verdict(x, TARGETS['engines'])})" if model == "lenet" else ""
                    cells += [f"{r['updates_per_s']:,.0f}", f"{x:.2f}x{verdict}"]
                first = f"{max(comp['warmup_s']):.1f}" if comp and "warmup_s" in comp else "-"
                lines.append(f"| {model} ({fast['dataset']}) | {algorithm} | {fast['setting']} | "
                             f"{loop['updates_per_s']:,.0f} | {' | '.join(cells)} | {first} | "
                             f"{fast['threads']} |")  # fmt: skip
        lines.append("\nTarget: batched >= 3x the loop for the LeNet. The compiled engine's "
                     "first round (untimed) compiles; the column gives the longest of its "
                     "runs' first rounds.")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/hot_paths"))
    p.add_argument(
        "--again",
        nargs="*",
        default=None,
        help="remeasure what was measured: everything, or the names given (e.g. dlg idlg)",
    )
    p.add_argument("--summary-only", action="store_true", help="rebuild summary.md only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (scoring uses one)")
    p.add_argument("--pairs", type=int, default=64, help="image pairs scored")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of the lab's scoring")
    p.add_argument("--restart-cases", nargs="+", default=list(RESTART_CASES),
                   choices=list(RESTART_CASES))  # fmt: skip
    p.add_argument(
        "--restart-repeats",
        type=int,
        default=3,
        help="timed runs per restart count, the counts in turn (fastest kept)",
    )
    p.add_argument("--data", default=None, help="CIFAR-10 root for the DLG images (default: "
                   "the photographs bundled with scikit-image)")  # fmt: skip
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--original-dlg", default=None, help="a checkout of mit-han-lab/dlg")
    p.add_argument("--original-steps", type=int, default=300)
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--engine-clients", type=int, default=100)
    p.add_argument("--engine-rounds", type=int, default=11, help="rounds per engine run "
                   "(the first is not timed)")  # fmt: skip
    p.add_argument("--engine-repeats", type=int, default=3, help="runs per engine, alternating")
    args = p.parse_args(argv)
    if args.engine_rounds < 2 or args.engine_repeats < 1:
        p.error("--engine-rounds must be at least 2 (the first is not timed) and "
                "--engine-repeats at least 1")  # fmt: skip
    if args.original_dlg and not (Path(args.original_dlg) / "models" / "vision.py").is_file():
        p.error(f"--original-dlg {args.original_dlg}: no models/vision.py there; give a "
                "checkout of mit-han-lab/dlg")  # fmt: skip
    if "scoring" in args.only and args.threads != 1 and not args.summary_only:
        # its own process with one thread from the start: after torch's thread pool
        # started with two, one-thread elementwise work ran ~3x slower here
        child = [sys.executable, __file__, "--only", "scoring", "--threads", "1",
                 "--out", str(args.out), "--pairs", str(args.pairs),
                 "--repeats", str(args.repeats), "--seed", str(args.seed)]  # fmt: skip
        if args.again is not None:
            child += ["--again", *args.again]
        subprocess.run(child, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        args.only = [s for s in args.only if s != "scoring"]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "records.jsonl"
    records = load_records(path)
    if args.again is not None:  # superseded: the summary keeps the latest line per key
        records = [r for r in records if args.again and r["name"] not in args.again]
    done = {_key(r) for r in records}
    command = "python benchmarks/hot_paths.py " + " ".join(argv or sys.argv[1:])

    def record(r: dict) -> None:
        r = {**r, **_machine(), "threads": r.get("threads", torch.get_num_threads()),
             "command": command}  # fmt: skip
        append_record(path, r)
        records.append(r)
        done.add(_key(r))
        print({k: v for k, v in r.items() if k not in ("machine", "processor", "torch")},
              flush=True)  # fmt: skip

    for name in [] if args.summary_only else args.only:
        globals()[name](args, done, record)
    latest = {_key(r): r for r in load_records(path)}
    text = summary(list(latest.values()), command)
    write_atomic(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
