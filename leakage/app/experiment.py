"""One attack experiment, wired end to end through the FL core.

The target batch is split among one or more clients, who run one round
against the victim (FedSGD, or FedAvg with local steps), and the attacker
listens at the server: to the one client's update (threat models ``fedsgd``
and ``fedavg``), or only to the sample-weighted mean of all clients' updates
(``aggregate``, the secure-aggregation view). The attacker receives the
:class:`~fl_core.types.Observation`; the clients' data reaches only the
metrics, through the server's ground-truth channel.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from defenses.config import build_plan
from fl_core.checkpoint import load_checkpoint
from fl_core.client import Client
from fl_core.data import ImageData, dataset_normalization, load_dataset, load_image_files
from fl_core.models import MODEL_CONVERTERS, build_model
from fl_core.server import Server
from fl_core.types import GroundTruth, Observation

from ..attacks import ATTACKS
from ..metrics import (
    label_accuracy,
    label_set_accuracy,
    score_images,
)
from .checks import (  # noqa: F401  # noqa: F401
    BN_MODES,
    MAX_SEED,
    NORMALIZE_CHOICES,
    _got,
    check_device,
    check_flag,
    check_number,
    check_scorable,
    check_text,
    check_whole,
)
from .config import AttackConfig, load_config, make_config, read_config_file  # noqa: F401
from .report import plot_history, plot_reconstruction

__all__ = [
    "BN_MODES",
    "NORMALIZE_CHOICES",
    "AttackConfig",
    "dp_ready",
    "load_config",
    "observe",
    "observe_round",
    "run_attack",
    "victim_normalization",
]


def _target_batch(cfg: AttackConfig) -> tuple[ImageData, tuple | None, torch.Tensor | None]:
    """The attacked batch, the input normalisation of a victim trained on its source,
    and the source's other images (``None`` for image files): the public data a
    malicious server may know (:func:`reference_images`)."""
    b = cfg.effective_batch_size
    if cfg.images:
        if cfg.sample_seed is not None:
            raise ValueError("sample_seed draws from a dataset; leave it unset with image files")
        batch = load_image_files(
            list(cfg.images),
            labels=list(cfg.labels) or None,
            shape=cfg.shape or (3, 32, 32),
            num_classes=cfg.num_classes,
        )
        return batch, victim_normalization(cfg, None, batch), None
    data = load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        train=cfg.train_split,
        download=cfg.download,
        shape=cfg.shape,
        num_classes=cfg.num_classes,
    )
    if cfg.index + b > len(data):
        raise ValueError(
            f"dataset {cfg.dataset} has {len(data)} images; index {cfg.index} + batch size {b} "
            "runs past its end"
        )
    order = list(range(len(data)))
    if cfg.sample_seed is not None:
        g = torch.Generator().manual_seed(cfg.sample_seed)
        order = torch.randperm(len(data), generator=g).tolist()
    batch = data.subset(order[cfg.index : cfg.index + b])
    rest = order[: cfg.index] + order[cfg.index + b :]
    reference = data.images[torch.tensor(rest, dtype=torch.int64)] if rest else None
    if cfg.labels:
        batch = dataclasses.replace(batch, labels=torch.tensor(cfg.labels, dtype=torch.int64))
    labels = batch.labels.tolist()
    if min(labels) < 0 or max(labels) >= cfg.num_classes:
        raise ValueError(
            f"batch labels {labels} do not fit a victim with {cfg.num_classes} classes; "
            f"use --num-classes {max(labels) + 1} or labels below {cfg.num_classes}"
        )
    return batch, victim_normalization(cfg, cfg.dataset, data), reference


def server_modification(cfg: AttackConfig, attack: Any, reference: torch.Tensor | None):
    """The model modification a malicious server sends for ``attack`` (``None``: the
    attack assumes an honest server), set on ``reference``, the dataset's images
    outside the batch (the public data of the clients' distribution the
    server is assumed to know)."""
    modify = getattr(attack, "modification", None)
    if modify is None:
        return None
    if reference is None or len(reference) < 2:
        raise ValueError(
            f"attack {cfg.attack} (a malicious server) sets its model on public images of the "
            "clients' distribution: take the batch from a dataset with at least 2 other images "
            "(--dataset), not from image files"
        )
    return modify(reference)


def victim_normalization(cfg: AttackConfig, dataset: str | None, data: ImageData):
    """``(mean, std)`` for a victim of ``cfg`` trained on ``dataset`` (``None``: image
    files), or ``None`` when ``cfg.normalize`` is ``none``."""
    if cfg.normalize == "none" or (cfg.normalize == "auto" and dlg_victim(cfg)):
        return None
    return dataset_normalization(dataset, data)


def dlg_victim(cfg: AttackConfig) -> bool:
    """Whether the config's victim is the DLG paper's: LeNet with sigmoids (Zhu et al.
    2019 feed it ``ToTensor()`` pixels, no normalisation; its U(-0.5, 0.5) weights are
    kept too, see :mod:`fl_core.models`)."""
    return cfg.model == "lenet" and (cfg.activation or "sigmoid") == "sigmoid"


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages the numbers depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("leakage-lab", "torch", "torchvision", "numpy", "scipy", "scikit-image"):
        out[pkg] = _version(pkg)
    return out


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def default_out(cfg: AttackConfig) -> Path:
    """A new folder under ``results/`` named after the run."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("results") / f"{cfg.attack}-{cfg.model}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def prepare_out(path: str | Path) -> Path:
    """Create the output folder and check it is writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-writable entries of a checkpoint's metadata."""
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[str(k)] = v
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def observe(cfg: AttackConfig, model, batch: ImageData) -> tuple[Observation, GroundTruth]:
    """One round of the config's threat model on ``batch``: what the attacker sees, and the truth.

    The batch is split among ``cfg.effective_clients`` clients in order
    (contiguous, sizes differing by at most one). Under ``aggregate`` the
    attacker sees the weighted mean of their updates; the ground truth is the
    union of the samples they used, in client order.
    """
    obs, gt, _, _ = observe_round(cfg, model, batch)
    return obs, gt


def observe_round(cfg: AttackConfig, model, batch: ImageData, modification=None):
    """:func:`observe`, also returning the clients (DP-SGD-wrapped where the config says so,
    for :func:`defenses.privacy_report`) and the :class:`defenses.DefensePlan`.

    ``modification``: a malicious server's (:func:`server_modification`); the
    clients then compute, defenses and all, on the model it sends."""
    k = cfg.effective_clients
    plan = build_plan(cfg.defenses)
    n = len(batch.labels)
    sizes = [n // k + (i < n % k) for i in range(k)]
    bounds = [sum(sizes[:i]) for i in range(k + 1)]
    training = cfg.local_training()
    clients = plan.wrap_clients(
        [
            Client(
                i,
                batch.images[bounds[i] : bounds[i + 1]],
                batch.labels[bounds[i] : bounds[i + 1]],
                training=training,
            )
            for i in range(k)
        ]
    )
    seen: list[Observation] = []
    truth: list[GroundTruth] = []
    listen = {"aggregate_listeners" if cfg.threat == "aggregate" else "listeners": [seen.append]}
    server = Server(
        model,
        clients,
        truth_listeners=[truth.append],
        seed=cfg.seed,
        modification=modification,
        **listen,
        **plan.server_kwargs(),
    )
    server.run_round()
    gt = GroundTruth(
        torch.cat([t.images for t in truth]),
        torch.cat([t.labels for t in truth]),
        client_id=seen[0].client_id,
        round=0,
    )
    return seen[0], gt, clients, plan


def dp_ready(model, defenses) -> tuple[Any, bool]:
    """``model``, converted by Opacus's ModuleValidator when ``defenses`` train with DP-SGD.

    Args:
        model: a victim from ``build_model`` or a checkpoint. Convolution and
            linear weights are kept; a converted BatchNorm becomes a GroupNorm
            with weight 1 and bias 0 (its trained affine parameters and running
            statistics are dropped), so a converted checkpoint is a different
            network from the one trained.
        defenses: a normalised defense list (``AttackConfig.defenses``).

    Returns:
        ``(model, converted)``; ``converted`` says whether BatchNorm was replaced
        by GroupNorm (the spec then names the ``opacus`` converter, so the
        attacker rebuilds the same architecture).
    """
    if not any(name == "dpsgd" for name, _ in defenses):
        return model, False
    from defenses.dpsgd import dp_compatible

    spec, converted = dp_compatible(model.spec)
    if converted:
        model = MODEL_CONVERTERS.get(spec.convert)(model)
        model.spec = spec
    return model, converted


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed run created, deepest first, while they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


SMALL_VICTIM_PARAMS = 100_000
"""Victims with fewer parameters (the LeNets, 13-16k; the small CNN, 29-35k)
attack on one CPU thread under ``threads="auto"``: their kernels are
too small for a second OpenMP thread to pay, and on a shared machine a second
thread that spins at every barrier is what makes a run slow down many times
beside another busy process (``benchmarks/results/threads/``)."""


def resolve_threads(threads: int | str | None, model: torch.nn.Module, device: str) -> int | None:
    """The torch thread count an attack on ``model`` runs with; ``None``: leave torch's.

    ``threads``: a positive count, ``"auto"`` (one thread for a victim with
    fewer than :data:`SMALL_VICTIM_PARAMS` parameters on the CPU, torch's
    default otherwise) or ``None`` (torch's default). Threads do not change
    what an attack computes beyond float rounding of parallel reductions.
    """
    if threads is None:
        return None
    if threads == "auto":
        small = sum(p.numel() for p in model.parameters()) < SMALL_VICTIM_PARAMS
        return 1 if small and str(device).startswith("cpu") else None
    return check_whole("threads", threads, low=1)


RECOVERED_PSNR = 30.0
"""An image counts as recovered at this PSNR (dB) or above (``summary.recovered_fraction``):
at 30 dB a CIFAR-10 reconstruction is a visual copy of the original."""


def run_attack(
    cfg: AttackConfig, *, progress: bool = False, threads: int | str | None = None
) -> dict[str, Any]:
    """Run one experiment and write ``results.json``, ``reconstruction.png`` and ``history.png``.

    Everything that can be checked is checked before the attack runs (the
    configuration, the data, the victim, the round the attacker observes, that
    the metrics can score images of the batch's shape and, with ``lpips`` among
    ``cfg.metrics``, that its package and network weights are there), and the output
    folder is created only then: bad input leaves no folder behind. The reconstruction is
    saved (``reconstruction.pt``: images and labels) as soon as the attack
    returns, before it is scored, so a failure while scoring or plotting never
    loses a finished attack. Every file is written atomically.

    ``threads`` sets torch's CPU threads for the attack (see
    :func:`resolve_threads`; restored afterwards) and is recorded in
    ``results.json`` as ``threads``.

    Returns:
        The dict written to ``results.json``: per image and in ``summary`` the PSNR
        and SSIM, and the LPIPS distance (``lpips``, lower is better) when
        ``cfg.metrics`` asks for it.
    """
    from .store import atomic_path, write_atomic

    victim, checkpoint_meta = None, None
    if cfg.checkpoint:
        victim, checkpoint_meta = load_checkpoint(cfg.checkpoint)
        spec = victim.spec
        cfg = dataclasses.replace(
            cfg,
            model=spec.name,
            activation=spec.activation,
            num_classes=spec.num_classes,
            shape=tuple(spec.in_shape),
            normalize="dataset" if spec.normalize else "none",
        )
    attack = ATTACKS.build(cfg.attack, **cfg.attack_options())
    batch, normalization, reference = _target_batch(cfg)
    if "target" in {f.name for f in dataclasses.fields(attack)} and cfg.target_class is None:
        attack = dataclasses.replace(attack, target=int(batch.labels[0]))  # the targeted client
    modification = server_modification(cfg, attack, reference)
    # the metrics score this shape; LPIPS's network is loaded here, before any work
    check_scorable(batch.shape, "images of shape", metrics=cfg.metrics, lpips_net=cfg.lpips_net)
    if victim is None:
        victim = build_model(
            cfg.model,
            num_classes=cfg.num_classes,
            in_shape=batch.shape,
            activation=cfg.activation,
            normalize=normalization,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    dp = any(name == "dpsgd" for name, _ in cfg.defenses)
    victim, converted = dp_ready(victim, cfg.defenses)
    model = victim.to(cfg.device)
    count = resolve_threads(threads, model, cfg.device)  # checked before any output
    obs, gt, clients, plan = observe_round(cfg, model, batch, modification)
    privacy = None
    if dp:
        from defenses.dpsgd import privacy_report

        privacy = privacy_report(clients, plan.delta)
        privacy["victim_converted"] = (
            "BatchNorm replaced by GroupNorm (weight 1, bias 0) with Opacus's ModuleValidator"
            + (
                "; the checkpoint's BatchNorm parameters and statistics were dropped"
                if cfg.checkpoint
                else ""
            )
            if converted
            else None
        )

    target = Path(cfg.out or default_out(cfg))
    created = _missing_folders(target)
    out = prepare_out(target)
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    start = time.perf_counter()
    try:
        rec = attack.reconstruct(
            obs, generator=torch.Generator().manual_seed(cfg.seed), progress=progress
        )
    except BaseException:
        _remove_if_empty(created)  # nothing written: bad input leaves no folder
        raise
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(previous)
    seconds = time.perf_counter() - start
    with atomic_path(out / "reconstruction.pt") as tmp:  # kept whatever happens next
        torch.save({"images": rec.images.detach().cpu(), "labels": rec.labels.detach().cpu()}, tmp)

    result = {
        "config": {**cfg.to_dict(), "out": str(out), "activation": model.spec.activation},
        "attack_options": {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)},
        "victim": model.spec.to_dict(),
        "observation": {
            "threat": cfg.threat,
            "bn_mode": "train" if obs.protocol.train_mode else "eval",
            "clients": cfg.effective_clients,
            "server": obs.protocol.server,
            "sent_model": obs.model_spec.to_dict() if obs.protocol.server == "malicious" else None,
            "protocol": dataclasses.asdict(obs.protocol),
        },
        "defenses": [{name: dict(params)} for name, params in cfg.defenses],
        "privacy": privacy,
        "checkpoint": None
        if checkpoint_meta is None
        else {"path": cfg.checkpoint, **_plain(checkpoint_meta)},
        "seed": cfg.seed,
        "versions": package_versions(),
        "seconds": seconds,
        "threads": used,
        "images": [],
        "summary": None,
        "attack": {
            "loss": _finite(rec.loss),
            "steps": rec.steps,
            "evaluations": rec.evaluations,
            "stopped": rec.stopped,
            "options": _plain(rec.options),
            "restart_losses": [_finite(v) for v in rec.restart_losses],
            "history": [_finite(v) for v in rec.history],
        },
    }
    try:
        scores = score_images(
            rec.images,
            gt.images.cpu(),
            data_range=1.0,
            metrics=cfg.metrics,
            lpips_net=cfg.lpips_net,
            candidates=rec.candidates,
        )
    except (ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        result["scoring_error"] = reason
        write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
        raise ValueError(
            f"the attack finished but its reconstruction could not be scored ({reason}); "
            f"it is saved in {out / 'reconstruction.pt'}"
        ) from None
    order = scores.order.tolist()
    recovered = [int(rec.labels[j]) for j in order]
    result["images"] = [
        {
            "name": batch.names[i] if len(gt.labels) == len(batch.labels) else f"sample {i}",
            "psnr": _finite(float(scores.psnr[i])),
            "ssim": float(scores.ssim[i]),
            "mse": float(scores.mse[i]),
            "true_label": int(gt.labels[i]),
            "recovered_label": recovered[i],
        }
        for i in range(len(gt.labels))
    ]
    result["summary"] = {
        "psnr": _finite(float(scores.psnr.mean())),
        "ssim": float(scores.ssim.mean()),
        "label_accuracy": label_accuracy(rec.labels.tolist(), gt.labels.tolist()),
        "label_set_accuracy": label_set_accuracy(rec.labels.tolist(), gt.labels.tolist()),
        "recovered_fraction": float((scores.psnr >= RECOVERED_PSNR).float().mean()),
    }
    if scores.lpips is not None:  # asked for: lower is better, 0 for identical images
        for entry, value in zip(result["images"], scores.lpips.tolist()):
            entry["lpips"] = _finite(value)
        result["summary"]["lpips"] = _finite(float(scores.lpips.mean()))
        result["versions"]["lpips"] = _version("lpips")
    write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    title = f"{cfg.attack} on {cfg.model} ({model.spec.activation})"
    with atomic_path(out / "reconstruction.png") as tmp:
        plot_reconstruction(
            gt.images.cpu(),
            rec.images[order],
            tmp,
            psnr=scores.psnr.tolist(),
            ssim=scores.ssim.tolist(),
            true_labels=gt.labels.tolist(),
            recovered_labels=recovered,
            title=title,
        )
    with atomic_path(out / "history.png") as tmp:
        plot_history(rec.history, tmp, title=title)
    return result
