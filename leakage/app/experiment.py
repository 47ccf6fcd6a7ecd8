"""One attack experiment, wired end to end through the FL core.

The target batch is split among one or more clients, who run one round
against the victim (FedSGD, or FedAvg with local steps), and the attacker
listens at the server: to the one client's update (threat models ``fedsgd``
and ``fedavg``), or only to the sample-weighted mean of all clients' updates
(``aggregate``, the secure-aggregation view). The attacker receives the
:class:`~fl_core.types.Observation`; the clients' data reaches only the
metrics, through the server's ground-truth channel.

:func:`run_attack` is the run: checks, the attacked round
(:mod:`leakage.app.attacked_round`), the attack, the scores and the files
(``results.json``, figures) in the output folder (:mod:`leakage.app.outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from fl_core.checkpoint import load_checkpoint
from fl_core.models import build_model

from ..attacks import ATTACKS
from ..metrics import (
    label_accuracy,
    label_set_accuracy,
    score_images,
)
from .attacked_round import (  # noqa: F401  (the benchmarks import these from here)
    dlg_victim,
    dp_ready,
    observe,
    observe_round,
    server_modification,
    target_batch,
    victim_normalization,
)
from .checks import BN_MODES, NORMALIZE_CHOICES, check_scorable, check_whole
from .config import AttackConfig, load_config, make_config, read_config_file  # noqa: F401
from .outputs import (  # noqa: F401
    default_out,
    missing_folders,
    package_versions,
    prepare_out,
    remove_if_empty,
    version_of,
)
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
    batch, normalization, reference = target_batch(cfg)
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
    created = missing_folders(target)
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
        remove_if_empty(created)  # nothing written: bad input leaves no folder
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
        result["versions"]["lpips"] = version_of("lpips")
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
