"""The lab's inverting gradients beside breaching's, on the same network, image and label.

For each CIFAR-10 image the script builds one victim (a registered lab
architecture with CIFAR-10's input normalisation, seeded weights), lets a lab
client compute its FedSGD gradient in the chosen BatchNorm mode, and hands the
*same* weights, buffers and gradient to both attackers, with the same
iteration budget:

* breaching's ``invertinggradients`` attacker (``case=1_single_image_small``,
  its defaults: TV 0.2, Adam 0.1 on signed gradients, step decay, N(0, 1)
  start in normalised coordinates; the true label given, as breaching's case
  provides it). The network it sees is the lab's without its normalisation
  layer, since breaching feeds normalised images and un-normalises with the
  same mean and std. Eval mode: the server's buffers are sent (breaching then
  runs the model in eval mode); train mode: no buffers (breaching then runs it
  in train mode with batch statistics, as the lab's client did).
* the lab's ``ig`` attack with its defaults, exactly as ``leakage attack
  --attack ig`` runs it (labels recovered from the gradient, not given).

Both reconstructions are scored by the lab in pixel space [0, 1] (PSNR and
SSIM of :func:`leakage.score_images`). Seconds per iteration are wall time of
the whole attack divided by the iterations; the lab's first iteration includes
``torch.compile``'s compilation (cached on disk after the first run), which is
reported separately as ``compile_seconds`` from a one-iteration warm-up run.
The two attackers alternate image by image in one process on the same
threads, so both see the same machine load.

breaching is not part of the lab: install the ``breaching`` package from the
package index (``pip install breaching==0.1.2``) or give a checkout with
``--breaching-path``; without either the script says so and exits with status
2 before any work. Records go to ``<out>/records.jsonl`` as each attack
finishes; a rerun resumes; ``<out>/summary-<model>-<mode>-<steps>.md`` is rebuilt at the end.

    python benchmarks/vs_breaching.py                             # resnet20, eval, 1,000 its
    python benchmarks/vs_breaching.py --bn-mode train --out benchmarks/results/vs_breaching/train

``--attacker seethrough`` compares GradInversion instead (Yin et al., "See
Through Gradients", CVPR 2021), on batches of B > 1 test images (``--batch-sizes``,
``--batches`` seeded draws per size, the draws of ``benchmarks/tuning.py``) and a
*trained* victim: the ResNet-20 checkpoint ``benchmarks/attack_suite.py`` trains
(``--checkpoint``; made with its settings if missing), BatchNorm in eval mode,
so the server's running statistics (the model's buffers) are the ones the
client used and the ones both attackers' BatchNorm priors match:

* breaching's ``seethroughgradients`` attacker with its configuration
  (Euclidean matching ×1e-4, Adam 0.1 unsigned, warm-up 50, cosine decay,
  Langevin noise 0.01, TV 1e-4, ℓ2 1e-6, DeepInversion 0.1 with the first
  layer ×10, N(0, 1) start in normalised coordinates, one trial), its case's
  mean and std set to the victim's input normalisation; its random start and
  noise come from torch's global generator, seeded per run;
* the lab's ``gradinversion`` attack with its defaults (the inverting-gradients
  loop with the tuned BatchNorm prior, ``leakage.attacks.gradinversion``).

Both are given the true labels (sorted; the order is free), so the comparison
measures the image reconstruction; both run the same number of iterations.
Records go to ``<out>/records.jsonl``, the summary to
``<out>/summary-seethrough-<steps>.md``, each run's reconstructions and originals
(8-bit) to ``<out>/images-<steps>-B<B>-<batch>-<peer>.pt``. ``--score-lpips``
scores those with LPIPS (AlexNet; its weights must be in the torch hub cache,
which needs network once) into ``<out>/lpips.jsonl`` and adds the column.

    python benchmarks/vs_breaching.py --attacker seethrough \
        --out benchmarks/results/vs_breaching/seethrough
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core import Client, LocalTraining, Server, build_model, load_image_files  # noqa: E402
from fl_core.data import NORMALIZATION  # noqa: E402
from leakage import ATTACKS, score_images  # noqa: E402
from leakage.app.experiment import AttackConfig, observe  # noqa: E402
from leakage.app.store import append_record, load_records  # noqa: E402
from leakage.attacks.inverting import COMPILE_STEPS  # noqa: E402

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DEFAULT_IMAGES = ("cat/0000.jpg", "ship/0000.jpg", "frog/0000.jpg")


def import_breaching(path: str | None):
    """The breaching package (from ``path`` if given), or ``None`` with the reason."""
    if path is not None:
        if not (Path(path) / "breaching" / "__init__.py").is_file():
            return None, f"--breaching-path {path} holds no breaching/__init__.py"
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import breaching  # noqa: F401
    except ImportError as e:
        return None, (
            f"breaching is not importable ({e}); pip install breaching==0.1.2 or pass "
            "--breaching-path CHECKOUT"
        )
    return breaching, None


def victim_and_gradient(model: str, image: Path, label: int, bn_mode: str, seed: int):
    """The victim (normalising, seeded), its FedSGD observation and the ground truth."""
    batch = load_image_files([image], labels=[label], shape=(3, 32, 32))
    victim = build_model(
        model,
        normalize=NORMALIZATION["cifar10"],
        generator=torch.Generator().manual_seed(seed),
    )
    seen, truth = [], []
    client = Client(0, batch.images, batch.labels, training=LocalTraining(bn_mode=bn_mode))
    Server(victim, [client], listeners=[seen.append], truth_listeners=[truth.append]).run_round()
    return victim, seen[0], truth[0]


def run_breaching(breaching, obs, label: int, steps: int, bn_mode: str):
    """breaching's IG on ``obs``'s weights and gradient; returns (pixels (1, C, H, W), seconds)."""
    cfg = breaching.get_config(overrides=["case=1_single_image_small", "attack=invertinggradients"])
    cfg.attack.optim.max_iterations = steps
    cfg.attack.optim.callback = steps  # its progress log, once
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    spec = dataclasses.replace(obs.model_spec, normalize=None)  # breaching normalises itself
    net = spec.build()
    with torch.no_grad():
        for p, v in zip(net.parameters(), obs.parameters):
            p.copy_(v)
        named = dict(net.named_buffers())
        for name, v in obs.buffers:
            named[name].copy_(v)
    attacker = breaching.attacks.prepare_attack(net, torch.nn.CrossEntropyLoss(), cfg.attack, setup)
    buffers = [v.clone() for _, v in obs.buffers] if bn_mode == "eval" else None
    payload = [dict(parameters=list(obs.parameters), buffers=buffers, metadata=cfg.case.data)]
    shared = [
        dict(
            gradients=[t.clone() for t in obs.update.tensors],
            buffers=None,
            metadata=dict(num_data_points=1, labels=torch.tensor([label]), local_hyperparams=None),
        )
    ]
    start = time.perf_counter()
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    mean = torch.tensor(cfg.case.data.mean)[None, :, None, None]
    std = torch.tensor(cfg.case.data.std)[None, :, None, None]
    return (rec["data"].detach() * std + mean).clamp(0, 1), seconds


def run_breaching_seethrough(breaching, obs, labels: torch.Tensor, steps: int, seed: int):
    """breaching's ``seethroughgradients`` on ``obs`` (eval mode, the server's buffers sent);
    returns (pixels (B, C, H, W), seconds)."""
    cfg = breaching.get_config(
        overrides=["case=1_single_image_small", "attack=seethroughgradients"]
    )
    cfg.attack.optim.max_iterations = steps
    cfg.attack.optim.callback = steps  # its progress log, once
    mean, std = obs.model_spec.normalize
    cfg.case.data.mean, cfg.case.data.std = list(mean), list(std)
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    spec = dataclasses.replace(obs.model_spec, normalize=None)  # breaching normalises itself
    net = spec.build()
    with torch.no_grad():
        for p, v in zip(net.parameters(), obs.parameters):
            p.copy_(v)
        named = dict(net.named_buffers())
        for name, v in obs.buffers:
            named[name].copy_(v)
    net.eval()
    attacker = breaching.attacks.prepare_attack(net, torch.nn.CrossEntropyLoss(), cfg.attack, setup)
    buffers = [v.clone() for _, v in obs.buffers]  # running statistics: eval mode
    payload = [dict(parameters=list(obs.parameters), buffers=buffers, metadata=cfg.case.data)]
    shared = [
        dict(
            gradients=[t.clone() for t in obs.update.tensors],
            buffers=None,
            metadata=dict(
                num_data_points=len(labels), labels=labels.clone(), local_hyperparams=None
            ),
        )
    ]
    torch.manual_seed(seed)  # breaching draws its start and its Langevin noise globally
    start = time.perf_counter()
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    m = torch.tensor(cfg.case.data.mean)[None, :, None, None]
    sd = torch.tensor(cfg.case.data.std)[None, :, None, None]
    return (rec["data"].detach() * sd + m).clamp(0, 1), seconds


def run_lab_gradinversion(obs, labels: torch.Tensor, steps: int, seed: int):
    """The lab's ``gradinversion`` attack with its defaults, the labels given."""
    from leakage.attacks.gradinversion import GradInversion
    from leakage.attacks.inverting import invert_gradients

    attack = GradInversion(steps=steps)
    options = {
        f.name: getattr(attack, f.name)
        for f in dataclasses.fields(attack)
        if f.name != "label_strategy"
    }
    warm = time.perf_counter()
    # one iteration, compiled as the real run will be: the compilation is timed here
    invert_gradients(
        obs, labels=labels, **{**options, "steps": 1, "compile": steps >= COMPILE_STEPS}
    )
    compile_seconds = time.perf_counter() - warm
    start = time.perf_counter()
    rec = invert_gradients(
        obs, labels=labels, generator=torch.Generator().manual_seed(seed), **options
    )
    seconds = time.perf_counter() - start
    return rec, seconds, compile_seconds, rec.options


def save_images(path: Path, reconstructed: torch.Tensor, original: torch.Tensor) -> None:
    """Both batches as 8-bit pixels (atomically), so that a machine with LPIPS's
    AlexNet weights can score the runs later without re-running them."""
    as_bytes = lambda x: (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"reconstructed": as_bytes(reconstructed), "original": as_bytes(original)}, tmp)
    tmp.replace(path)


def score_saved_lpips(out: Path, records: list[dict]) -> None:
    """LPIPS (AlexNet) of every record's saved images not yet scored, into
    ``<out>/lpips.jsonl``; needs the AlexNet weights in the torch hub cache."""
    store = out / "lpips.jsonl"
    done = {r["saved"] for r in load_records(store)}
    for r in records:
        if r.get("saved") and r["saved"] not in done and (out / r["saved"]).is_file():
            saved = torch.load(out / r["saved"])
            x, y = (saved[k].float() / 255 for k in ("reconstructed", "original"))
            s = score_images(x, y, data_range=1.0, metrics="psnr,ssim,lpips")
            append_record(store, {"saved": r["saved"], "net": "alex", "lpips": s.lpips.tolist()})


def seethrough(args, breaching) -> int:
    """``--attacker seethrough``: GradInversion, breaching's beside the lab's, batches B > 1."""
    import copy

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tuning import images as draw_images
    from tuning_gradinversion import CHECKPOINT, trained_resnet20

    model, meta = trained_resnet20(args.checkpoint or CHECKPOINT, args.data_root)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    setting = {"attacker": "seethrough", "model": "resnet20-trained", "bn_mode": "eval"}
    setting.update(steps=args.steps, seed=args.seed)
    done = {
        (r["batch"], r["index"], r["peer"]) for r in load_records(store) if r["setting"] == setting
    }
    for size in args.batch_sizes:
        data = draw_images(args.data_root, "cifar10", False, size * args.batches, args.seed + size)
        for i in range(args.batches):
            batch = data.subset(list(range(i * size, (i + 1) * size)))
            obs, gt = observe(
                AttackConfig(bn_mode="eval", batch_size=size), copy.deepcopy(model), batch
            )
            labels = gt.labels.sort().values
            for peer in ("breaching", "lab"):
                if (size, i, peer) in done:
                    continue
                extra = {}
                if peer == "breaching":
                    quiet = io.StringIO()
                    stdout, sys.stdout = sys.stdout, quiet  # breaching prints its case and config
                    try:
                        images_rec, seconds = run_breaching_seethrough(
                            breaching, obs, labels, args.steps, args.seed + i
                        )
                    finally:
                        sys.stdout = stdout
                else:
                    rec, seconds, compile_seconds, options = run_lab_gradinversion(
                        obs, labels, args.steps, args.seed + i
                    )
                    images_rec = rec.images
                    extra = {"compile_seconds": compile_seconds, "options": options}
                s = score_images(images_rec, gt.images, data_range=1.0)
                saved = f"images-{args.steps}-B{size}-{i}-{peer}.pt"
                save_images(args.out / saved, images_rec, gt.images)
                record = {
                    "setting": setting,
                    "batch": size,
                    "index": i,
                    "images": list(batch.names),
                    "peer": peer,
                    "psnr": float(s.psnr.clamp(max=100).mean()),
                    "ssim": float(s.ssim.mean()),
                    "psnr_per_image": s.psnr.clamp(max=100).tolist(),
                    "saved": saved,
                    "seconds": seconds,
                    "s_per_it": seconds / args.steps,
                    "threads": torch.get_num_threads(),
                    **extra,
                }
                append_record(store, record)
                print(
                    f"B={size} batch {i} {peer}: {record['psnr']:.2f} dB, SSIM "
                    f"{record['ssim']:.3f}, {record['s_per_it'] * 1000:.1f} ms/iteration",
                    flush=True,
                )
    records = [r for r in load_records(store) if r["setting"] == setting]
    if args.score_lpips:
        score_saved_lpips(args.out, records)
    text = seethrough_summary(records, args, meta)
    name = f"summary-seethrough-{args.steps}.md"
    tmp = args.out / (name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out / name)
    print(text)
    return 0


def seethrough_summary(records: list[dict], args, meta: dict) -> str:
    lines = [
        "# GradInversion (See Through Gradients): the lab beside breaching (trained ResNet-20, "
        f"eval-mode BatchNorm, {args.steps} iterations, CIFAR-10 test images)",
        "",
        "Threat model: honest-but-curious server, one client's FedSGD gradient of a batch of B "
        "images; the victim is the ResNet-20 `benchmarks/attack_suite.py` trains (test accuracy "
        f"{meta['accuracy']:.3f}), its running statistics sent as buffers. Same weights, "
        "gradient, images and iteration budget for both; both are given the true labels. "
        "breaching: `seethroughgradients` with its configuration; the lab: `gradinversion` with "
        "its defaults. Scores after matching reconstructions to originals (PSNR, SSIM of "
        "`leakage.score_images`); LPIPS (AlexNet, lower is better) where `--score-lpips` could "
        "load its weights, else n/a (each run's images are saved beside the records, so a "
        "machine with the weights scores them without re-running). "
        f"Command: `python benchmarks/vs_breaching.py --attacker seethrough --steps {args.steps} "
        f"--batch-sizes {' '.join(map(str, args.batch_sizes))} --batches {args.batches} --out "
        f"{args.out}` ({records[0]['threads']} torch threads, CPU shared with other jobs).",
        "",
        "| B | batch | peer | PSNR dB | SSIM | s / iteration |",
        "|--:|--:|---|--:|--:|--:|",
    ]
    for r in sorted(records, key=lambda r: (r["batch"], r["index"], r["peer"])):
        lines.append(
            f"| {r['batch']} | {r['index']} | {r['peer']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
            f"{r['s_per_it']:.4f} |"
        )
    scored = {
        r["saved"]: statistics.fmean(r["lpips"]) for r in load_records(args.out / "lpips.jsonl")
    }

    def lpips_of(rs: list[dict]) -> str:
        values = [scored.get(r.get("saved")) for r in rs]
        return "n/a" if None in values else f"{statistics.fmean(values):.3f}"

    lines += ["", "| B | peer | batches | mean PSNR dB | mean SSIM | mean LPIPS | s / iteration |"]
    lines += ["|--:|---|--:|--:|--:|--:|--:|"]
    for size in sorted({r["batch"] for r in records}):
        for peer in ("breaching", "lab"):
            rs = [r for r in records if r["batch"] == size and r["peer"] == peer]
            if rs:
                lines.append(
                    f"| {size} | {peer} | {len(rs)} | {statistics.fmean(r['psnr'] for r in rs):.2f}"
                    f" | {statistics.fmean(r['ssim'] for r in rs):.3f} | {lpips_of(rs)} | "
                    f"{statistics.fmean(r['s_per_it'] for r in rs):.4f} |"
                )
    lab = [r for r in records if r["peer"] == "lab"]
    if lab:
        lines += [
            "",
            f"The lab's compilation (`torch.compile`, timed apart): "
            f"{max(r['compile_seconds'] for r in lab):.1f} s at most. Lab options: "
            f"`{json.dumps(lab[0]['options'])}`.",
        ]
    return "\n".join(lines) + "\n"


def run_lab(obs, steps: int, seed: int):
    """The lab's IG with its defaults (as ``leakage attack --attack ig``)."""
    attack = ATTACKS.build("ig", steps=steps)
    warm = time.perf_counter()
    # one iteration, compiled as the real run will be (compile=None compiles from
    # COMPILE_STEPS on): the compilation, or the on-disk cache's load, is timed here
    warm_up = dataclasses.replace(attack, steps=1, compile=steps >= COMPILE_STEPS)
    warm_up.reconstruct(obs)
    compile_seconds = time.perf_counter() - warm
    start = time.perf_counter()
    rec = attack.reconstruct(obs, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    return rec, seconds, compile_seconds, rec.options


def summary(records: list[dict], args) -> str:
    lines = [
        f"# Inverting gradients: the lab beside breaching ({args.model}, BatchNorm "
        f"{args.bn_mode} mode, {args.steps} iterations, batch 1, CIFAR-10 test images)",
        "",
        "Threat model: honest-but-curious server, one client's FedSGD gradient, untrained "
        "victim with CIFAR-10 input normalisation. Same weights, gradient and budget for both; "
        "breaching is given the true label, the lab recovers it from the gradient. "
        f"Command: `python benchmarks/vs_breaching.py --model {args.model} --bn-mode "
        f"{args.bn_mode} --steps {args.steps}` ({records[0]['threads']} torch threads, CPU).",
        "",
        "| image | peer | PSNR dB | SSIM | label right | s / iteration | lab speed-up |",
        "|---|---|--:|--:|:-:|--:|--:|",
    ]
    by_image: dict[str, dict[str, dict]] = {}
    for r in records:
        by_image.setdefault(r["image"], {})[r["peer"]] = r
    ratios = []
    for image, peers in by_image.items():
        both = "lab" in peers and "breaching" in peers
        ratio = peers["breaching"]["s_per_it"] / peers["lab"]["s_per_it"] if both else None
        if ratio:
            ratios.append(ratio)
        for name in ("breaching", "lab"):
            if name not in peers:
                continue
            r = peers[name]
            speed = f"{ratio:.2f}x" if (name == "lab" and ratio) else ""
            lines.append(
                f"| {image} | {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                f"{'yes' if r['label_right'] else 'no'} | {r['s_per_it']:.4f} | {speed} |"
            )
    for name in ("breaching", "lab"):
        rs = [r for r in records if r["peer"] == name]
        if rs:
            lines.append(
                f"| **mean** | {name} | {statistics.fmean(r['psnr'] for r in rs):.2f} | "
                f"{statistics.fmean(r['ssim'] for r in rs):.3f} | "
                f"{sum(r['label_right'] for r in rs)}/{len(rs)} | "
                f"{statistics.fmean(r['s_per_it'] for r in rs):.4f} | "
                + (
                    f"{statistics.median(ratios):.2f}x (median) |"
                    if name == "lab" and ratios
                    else "|"
                )
            )
    lab = [r for r in records if r["peer"] == "lab"]
    if lab:
        lines += [
            "",
            f"The lab's first call compiles the objective (`torch.compile`): "
            f"{max(r['compile_seconds'] for r in lab):.1f} s at most here (once per architecture; "
            "later runs load inductor's on-disk cache). Lab options: "
            f"`{json.dumps(lab[0]['options'])}`.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-root", default="../shared/datasets", help="holds cifar10/test/")
    p.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="CLASS/FILE")
    p.add_argument("--model", default="resnet20", help="a lab victim (default resnet20)")
    p.add_argument("--bn-mode", default="eval", choices=("train", "eval"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the victim's weights")
    p.add_argument("--breaching-path", default=None, help="a breaching checkout to import")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_breaching"))
    p.add_argument(
        "--attacker",
        default="ig",
        choices=("ig", "seethrough"),
        help="ig: inverting gradients, batch 1; seethrough: GradInversion, batches",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8], help="seethrough only")
    p.add_argument("--batches", type=int, default=2, help="seethrough: batches per size")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="seethrough: the trained ResNet-20"
    )
    p.add_argument(
        "--score-lpips",
        action="store_true",
        help="seethrough: score the saved images with LPIPS (needs AlexNet's weights)",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be positive")
    folder = Path(args.data_root) / "cifar10" / "test"
    images = [folder / name for name in args.images]
    missing = [str(i) for i in images if not i.is_file()]
    if missing:
        p.error(f"image(s) not found: {', '.join(missing)} (give --data-root with cifar10/test/)")
    for name in args.images:
        if name.split("/")[0] not in CIFAR10_CLASSES:
            p.error(f"{name}: the first folder must be a CIFAR-10 class")
    breaching, why = import_breaching(args.breaching_path)
    if breaching is None:
        print(f"vs_breaching: skipped: {why}", file=sys.stderr)
        return 2
    logging.getLogger("breaching").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attacker == "seethrough":
        if min(args.batch_sizes) < 1 or args.batches < 1:
            p.error("--batch-sizes and --batches must be positive")
        return seethrough(args, breaching)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    setting = {"model": args.model, "bn_mode": args.bn_mode, "steps": args.steps, "seed": args.seed}
    done = {(r["image"], r["peer"]) for r in load_records(store) if r["setting"] == setting}
    for name, path in zip(args.images, images):
        label = CIFAR10_CLASSES.index(name.split("/")[0])
        _, obs, truth = victim_and_gradient(args.model, path, label, args.bn_mode, args.seed)
        for peer in ("breaching", "lab"):
            if (name, peer) in done:
                continue
            extra = {}
            if peer == "breaching":
                quiet = io.StringIO()
                stdout, sys.stdout = sys.stdout, quiet  # breaching prints its case and config
                try:
                    images_rec, seconds = run_breaching(
                        breaching, obs, label, args.steps, args.bn_mode
                    )
                finally:
                    sys.stdout = stdout
                labels = [label]
            else:
                rec, seconds, compile_seconds, options = run_lab(obs, args.steps, args.seed)
                images_rec, labels = rec.images, rec.labels.tolist()
                extra = {"compile_seconds": compile_seconds, "options": options}
            s = score_images(images_rec, truth.images, data_range=1.0)
            record = {
                "setting": setting,
                "image": name,
                "peer": peer,
                "psnr": float(s.psnr.clamp(max=100).mean()),
                "ssim": float(s.ssim.mean()),
                "label_right": labels == [label],
                "seconds": seconds,
                "s_per_it": seconds / args.steps,
                "threads": torch.get_num_threads(),
                **extra,
            }
            append_record(store, record)
            print(
                f"{name} {peer}: {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}, "
                f"{record['s_per_it'] * 1000:.1f} ms/iteration",
                flush=True,
            )
    records = [r for r in load_records(store) if r["setting"] == setting]
    text = summary(records, args)
    name = f"summary-{args.model}-{args.bn_mode}-{args.steps}.md"
    tmp = args.out / (name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out / name)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
