"""What the attacker of one ``leakage attack`` run sees: the attacked round.

The target batch and the public images beside it (:func:`target_batch`), the
victim's input normalisation, the model a malicious server sends instead of
the global one, and one round of the config's threat model through the FL core
(:func:`observe_round`): the clients compute, defenses and all, and the
attacker receives the :class:`~fl_core.types.Observation` while the clients'
data reaches only the ground-truth channel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from defenses.config import build_plan
from fl_core.client import Client
from fl_core.data import ImageData, dataset_normalization, load_dataset, load_image_files
from fl_core.models import MODEL_CONVERTERS
from fl_core.server import Server
from fl_core.types import GroundTruth, Observation

from .config import AttackConfig

__all__ = [
    "dlg_victim",
    "dp_ready",
    "observe",
    "observe_round",
    "server_modification",
    "target_batch",
    "victim_normalization",
]


def target_batch(cfg: AttackConfig) -> tuple[ImageData, tuple | None, torch.Tensor | None]:
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
