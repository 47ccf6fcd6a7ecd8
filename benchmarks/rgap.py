"""The lab's R-GAP beside breaching's, on the same CNN6 weights, images and labels.

R-GAP (Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR
2021) inverts one sample's gradient layer by layer in closed form. For each
CIFAR-10 test image the script builds one victim, the lab's ``cnn6`` with
CIFAR-10's input normalisation and seeded weights (the same weights for every
image), lets a lab client compute its FedSGD gradient at batch 1, and hands
the *same* weights and gradient to both attackers:

* breaching's ``rgap`` attacker (``attack=rgap``, the package from the index,
  0.1.2; a thin wrapper around the original R-GAP code). Its recursion walks
  ``model.modules()`` backwards and expects breaching's own module layout
  (a flat ``Sequential`` whose ``Flatten`` sits between the last convolution and
  its activation), so it is given breaching's own ``cnn6``
  (``breaching.cases.construct_model("cnn6", ...)``, defined in
  ``breaching/cases/models/model_preparation.py``) with the lab's weights
  copied in, tensor by tensor: the same six bias-free convolutions (k4 s2 p2,
  then k3 s2/s1/s1/s2/s1 p1; 12, 36, 36, 36, 64, 128 channels), leaky ReLU 0.2
  and Linear(3200 -> 10) with bias as the lab's ``CNN6``. Before the attack the
  script checks that both networks give the same logits and the same gradient
  on the true image (recorded as ``logit_diff`` and ``grad_rel_diff``). That
  network reads normalised images (breaching normalises outside the model), so
  its reconstruction is un-normalised with the lab's CIFAR-10 mean and std. It
  is given the true label (its R-GAP does not use it when the last layer has a
  bias).
* the lab's ``rgap`` with its defaults, exactly as ``leakage attack --attack
  rgap`` runs it (label recovered from the gradient).

Both reconstructions are scored by the lab in pixel space [0, 1] (PSNR, SSIM
and the largest absolute pixel error). The two attackers alternate image by
image in one process on the same threads. The summary also holds the lab's
``rank_analysis`` of the victim at 32x32 (counts and the numerical rank for
generic data) and breaching's per-layer least-squares residuals as it prints
them.

breaching is not part of the lab: install it (``pip install breaching==0.1.2``)
or give a checkout with ``--breaching-path``; without either the script says
so and exits with status 2 before any work, unless ``--no-peer`` (the lab
alone). Records go to ``<out>/records.jsonl`` as each attack finishes; a rerun
skips what is recorded for the same setting; ``<out>/summary.md`` is rebuilt
(atomically) at the end.

    python benchmarks/rgap.py                      # first test image of each class
    python benchmarks/rgap.py --images cat/0000.jpg ship/0000.jpg --no-peer
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling vs_breaching.py

from vs_breaching import CIFAR10_CLASSES, import_breaching  # noqa: E402

from fl_core import Client, Server, build_model, load_image_files  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402
from leakage.attacks.rgap import rank_analysis  # noqa: E402
from leakage.labels import update_as_gradient  # noqa: E402

MODEL = "cnn6"
SHAPE = (3, 32, 32)
DEFAULT_IMAGES = tuple(f"{c}/0000.jpg" for c in CIFAR10_CLASSES)
NOTEBOOK_DB = 49.0
"""breaching's R-GAP notebook (breaching repository, examples/, the R-GAP notebook):
49.0 dB on its CNN6 at batch 1 on CIFAR-10."""


def victim_and_observation(image: Path, label: int, seed: int):
    """The cnn6 victim (CIFAR-10 normalisation, seeded weights), its FedSGD observation
    of ``image`` and the ground truth."""
    batch = load_image_files([image], labels=[label], shape=SHAPE)
    victim = build_model(
        MODEL, normalize=NORMALIZATION["cifar10"], generator=torch.Generator().manual_seed(seed)
    )
    seen, truth = [], []
    Server(
        victim, [Client(0, batch.images, batch.labels)], listeners=[seen.append],
        truth_listeners=[truth.append],
    ).run_round()  # fmt: skip
    return victim, seen[0], truth[0]


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = NORMALIZATION["cifar10"]
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def breaching_cnn6(breaching, cfg, obs):
    """breaching's own cnn6 holding the observation's (the lab's) weights."""
    net, loss_fn = breaching.cases.construct_model(MODEL, cfg.case.data, pretrained=False)
    ours = list(obs.parameters)
    theirs = list(net.parameters())
    if [tuple(p.shape) for p in theirs] != [tuple(p.shape) for p in ours]:
        raise RuntimeError("breaching's cnn6 and the lab's differ in their parameter shapes")
    with torch.no_grad():
        for p, v in zip(theirs, ours):
            p.copy_(v)
    return net, loss_fn


def same_network(net, obs, truth) -> tuple[float, float]:
    """(max |logit difference|, relative gradient difference) of breaching's net on the
    normalised true image against the model the client received (not the victim the
    server has updated since) and the observed gradient."""
    mean, std = _mean_std()
    x = truth.images
    with torch.no_grad():
        logit_diff = float((net((x - mean) / std) - obs.model()(x)).abs().max())
    loss = F.cross_entropy(net((x - mean) / std), truth.labels)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    observed = [update_as_gradient(obs, i) for i in range(len(grads))]
    num = sum(float((a - b).square().sum()) for a, b in zip(grads, observed))
    den = sum(float(b.square().sum()) for b in observed)
    return logit_diff, math.sqrt(num / den)


def run_breaching(breaching, obs, truth):
    """breaching's R-GAP; returns (pixels (1, C, H, W), seconds, extra record fields)."""
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # breaching prints its case, modules, residuals
        cfg = breaching.get_config(overrides=["case=1_single_image_small", "attack=rgap"])
        mean, std = NORMALIZATION["cifar10"]
        cfg.case.data.mean, cfg.case.data.std = list(mean), list(std)
        net, loss_fn = breaching_cnn6(breaching, cfg, obs)
        logit_diff, grad_diff = same_network(net, obs, truth)
        setup = dict(device=torch.device("cpu"), dtype=torch.float)
        attacker = breaching.attacks.prepare_attack(net, loss_fn, cfg.attack, setup)
        payload = [dict(parameters=list(obs.parameters), buffers=None, metadata=cfg.case.data)]
        gradients = [update_as_gradient(obs, i).clone() for i in range(len(obs.parameters))]
        metadata = dict(num_data_points=1, labels=truth.labels.clone(), local_hyperparams=None)
        shared = [dict(gradients=gradients, buffers=None, metadata=metadata)]
        start = time.perf_counter()
        rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
        seconds = time.perf_counter() - start
    residuals = [
        float(r.split()[0]) if r.strip() else None
        for r in re.findall(r"lstsq residual: \[([^\]]*)\]", quiet.getvalue())
    ]
    m, s = _mean_std()
    pixels = (rec["data"].detach().float() * s + m).clamp(0, 1)
    extra = {"logit_diff": logit_diff, "grad_rel_diff": grad_diff, "lstsq_residuals": residuals}
    return pixels, seconds, extra


def run_lab(obs):
    """The lab's R-GAP with its defaults (as ``leakage attack --attack rgap``)."""
    attack = ATTACKS.build("rgap")
    start = time.perf_counter()
    rec = attack.reconstruct(obs, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    layers = [
        {k: v for k, v in layer.items() if k in ("layer", "solver", "forward_residual")}
        for layer in rec.options["layers"]
    ]
    return rec.images, rec.labels.tolist(), seconds, {"layers": layers}


def rank_record(setting: dict, seed: int) -> dict:
    victim = build_model(
        MODEL, normalize=NORMALIZATION["cifar10"], generator=torch.Generator().manual_seed(seed)
    )
    start = time.perf_counter()
    rows = rank_analysis(victim, SHAPE, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    return {
        "setting": setting,
        "kind": "rank",
        "rows": [{**dataclasses.asdict(r), "deficiency": r.deficiency} for r in rows],
        "seconds": seconds,
    }


def _db(value: float | None) -> str:
    return "exact (inf)" if value is None else f"{value:.2f}"


def summary(records: list[dict], args, command: str) -> str:
    images = [r for r in records if r["kind"] == "image"]
    threads = images[0]["threads"] if images else torch.get_num_threads()
    lines = [
        f"# R-GAP: the lab beside breaching ({MODEL}, batch 1, CIFAR-10 test images)",
        "",
        "Threat model: honest-but-curious server, one client's FedSGD gradient of one image, "
        f"untrained {MODEL} (PyTorch's default init from seed {args.seed}, the same weights for "
        "every image) with CIFAR-10 input normalisation. breaching runs its own `cnn6` module "
        "with the lab's weights copied in (same layers; logits and gradient checked equal "
        "below); it is given the true label, the lab recovers it from the gradient. "
        f"Command: `{command}` ({threads} torch threads, CPU).",
        "",
        f"breaching's R-GAP notebook reports {NOTEBOOK_DB} dB on its CNN6 at batch 1 on "
        "CIFAR-10 (breaching repository, examples/, the R-GAP notebook); its image and "
        "weights are not these.",
        "",
        "| image | peer | PSNR dB | SSIM | max abs error | label right | seconds |",
        "|---|---|--:|--:|--:|:-:|--:|",
    ]
    by_image: dict[str, dict[str, dict]] = {}
    for r in images:
        by_image.setdefault(r["image"], {})[r["peer"]] = r
    for image, peers in by_image.items():
        for name in ("breaching", "lab"):
            if name in peers:
                r = peers[name]
                right = "given" if name == "breaching" else ("yes" if r["label_right"] else "no")
                lines.append(
                    f"| {image} | {name} | {_db(r['psnr'])} | {r['ssim']:.4f} | "
                    f"{r['max_error']:.2e} | {right} | {r['seconds']:.2f} |"
                )
    for name in ("breaching", "lab"):
        rs = [r for r in images if r["peer"] == name]
        if not rs:
            continue
        finite = [r["psnr"] for r in rs if r["psnr"] is not None]
        n_right = sum(r["label_right"] for r in rs)
        right = "given" if name == "breaching" else f"{n_right}/{len(rs)}"
        lines.append(
            f"| **mean ({len(rs)} images)** | {name} | "
            f"{statistics.fmean(finite):.2f} | {statistics.fmean(r['ssim'] for r in rs):.4f} | "
            f"{max(r['max_error'] for r in rs):.2e} (max) | {right} | "
            f"{statistics.fmean(r['seconds'] for r in rs):.2f} |"
        )
    peer = [r for r in images if r["peer"] == "breaching"]
    if peer:
        residuals = [r["lstsq_residuals"] for r in peer]
        first = [res[-1] for res in residuals if res and res[-1] is not None]
        lines += [
            "",
            "Same network: breaching's `cnn6` with the lab's weights gives logits within "
            f"{max(r['logit_diff'] for r in peer):.1e} and a gradient within "
            f"{max(r['grad_rel_diff'] for r in peer):.1e} (relative) of the lab's on every "
            "image. breaching's least-squares residuals per convolution (printed by its R-GAP, "
            "last convolution first; float32 NumPy `lstsq` on the dense system) on "
            f"{peer[0]['image']}: "
            + ", ".join(f"{v:.1e}" if v is not None else "-" for v in residuals[0])
            + (
                f"; at the first convolution {min(first):.1e} to {max(first):.1e}."
                if first
                else "."
            ),
        ]
    spread = [
        f"{name} {min(r['seconds'] for r in rs):.2f}-{max(r['seconds'] for r in rs):.2f} s "
        f"(median {statistics.median(r['seconds'] for r in rs):.2f})"
        for name in ("breaching", "lab")
        if (rs := [r for r in images if r["peer"] == name])
    ]
    if spread:
        lines += [
            "",
            "Seconds are wall time of the attack alone on a 2-core machine shared with other "
            "jobs, so they vary with its load: " + "; ".join(spread) + ".",
        ]
    lab = [r for r in images if r["peer"] == "lab"]
    if lab:
        worst = max(
            layer["forward_residual"]
            for r in lab
            for layer in r["layers"]
            if "forward_residual" in layer
        )
        solvers = sorted({layer["solver"] for r in lab for layer in r["layers"]})
        lines += [
            "",
            "The lab solves each layer's normal equations in float64 (solvers used: "
            f"{', '.join(solvers)}); largest relative forward residual over all layers and "
            f"images: {worst:.1e}.",
        ]
    rank = [r for r in records if r["kind"] == "rank"]
    if rank:
        lines += [
            "",
            f"## Rank analysis of {MODEL} at 32x32 (`leakage.attacks.rgap.rank_analysis`)",
            "",
            "Upper bounds on the constraints' rank from the counts, then the numerical rank "
            "and condition number of the stacked system with these weights and a random "
            f"output gradient ({rank[-1]['seconds']:.1f} s).",
            "",
            "| layer | kind | unknowns | forward constraints | gradient constraints | "
            "rank | condition | status |",
            "|---|---|--:|--:|--:|--:|--:|---|",
        ]
        for row in rank[-1]["rows"]:
            cond = "-" if row["condition"] is None else f"{row['condition']:.1f}"
            lines.append(
                f"| {row['name']} | {row['kind']} | {row['unknowns']} | "
                f"{row['forward_constraints']} | {row['gradient_constraints']} | "
                f"{row['rank']} | {cond} | {row['status']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default="../shared/datasets", help="holds cifar10/test/")
    p.add_argument(
        "--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="CLASS/FILE",
        help="CIFAR-10 test images under cifar10/test/ (default: <class>/0000.jpg, each class)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the victim's weights")
    p.add_argument("--breaching-path", default=None, help="a breaching checkout to import")
    p.add_argument("--no-peer", action="store_true", help="run the lab's R-GAP only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/rgap"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    folder = Path(args.data_root) / "cifar10" / "test"
    for name in args.images:
        if name.split("/")[0] not in CIFAR10_CLASSES:
            p.error(f"{name}: the first folder must be a CIFAR-10 class")
    paths = [folder / name for name in args.images]
    missing = [str(i) for i in paths if not i.is_file()]
    if missing:
        p.error(f"image(s) not found: {', '.join(missing)} (give --data-root with cifar10/test/)")
    breaching = None
    if not args.no_peer:
        breaching, why = import_breaching(args.breaching_path)
        if breaching is None:
            print(f"rgap: skipped: {why} (or pass --no-peer)", file=sys.stderr)
            return 2
        logging.getLogger("breaching").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    setting = {"model": MODEL, "seed": args.seed, "normalize": "cifar10"}
    records = [r for r in load_records(store) if r["setting"] == setting]
    if not any(r["kind"] == "rank" for r in records):
        append_record(store, rank_record(setting, args.seed))
    done = {(r["image"], r["peer"]) for r in records if r["kind"] == "image"}
    peers = ("lab",) if args.no_peer else ("breaching", "lab")
    todo = [(n, q) for n in args.images for q in peers if (n, q) not in done]
    bar = tqdm(total=len(todo), desc="rgap", disable=args.quiet)
    for name, path in zip(args.images, paths):
        if not any(n == name for n, _ in todo):
            continue
        label = CIFAR10_CLASSES.index(name.split("/")[0])
        _, obs, truth = victim_and_observation(path, label, args.seed)
        for peer in peers:
            if (name, peer) in done:
                continue
            if peer == "breaching":
                pixels, seconds, extra = run_breaching(breaching, obs, truth)
                labels = [label]
            else:
                pixels, labels, seconds, extra = run_lab(obs)
            s = score_images(pixels, truth.images, data_range=1.0)
            value = float(s.psnr[0])
            record = {
                "setting": setting,
                "kind": "image",
                "image": name,
                "peer": peer,
                "psnr": value if math.isfinite(value) else None,
                "ssim": float(s.ssim[0]),
                "max_error": float((pixels - truth.images).abs().max()),
                "label_right": labels == [label],
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                **extra,
            }
            append_record(store, record)
            bar.update()
            bar.write(f"{name} {peer}: {_db(record['psnr'])} dB, {seconds:.2f} s")
    bar.close()
    records = [r for r in load_records(store) if r["setting"] == setting]
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/rgap.py", *(a for a in given if a != "--quiet")])
    text = summary(records, args, command)
    write_atomic(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
