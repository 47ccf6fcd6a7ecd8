"""The configuration of one ``leakage attack`` run: :class:`AttackConfig`, read from
YAML (:func:`load_config`) or a mapping (:func:`make_config`), every value checked
before any work (:mod:`leakage.app.checks`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from defenses.config import normalize_defenses
from fl_core.client import LocalTraining
from fl_core.models import MODELS

from ..attacks import ATTACKS
from ..labels import LABEL_STRATEGIES
from ..metrics import (
    DEFAULT_METRICS,
    LPIPS_NETS,
    check_metrics,
)
from ..simulate import THREAT_MODELS
from .checks import (
    BN_MODES,
    MAX_SEED,
    NORMALIZE_CHOICES,
    _got,
    build_checked,
    check_device,
    check_flag,
    check_number,
    check_scorable,
    check_text,
    check_whole,
)


@dataclass(frozen=True)
class AttackConfig:
    """Everything one ``leakage attack`` run depends on (YAML keys = field names).

    Attributes:
        attack: attack name (see ``leakage.attacks.ATTACKS``).
        model: victim name (see ``fl_core.models.MODELS``).
        activation: victim activation (``None``: the victim's default).
        num_classes: classes of the victim's output layer.
        dataset: ``samples`` (embedded photographs), a torchvision dataset name
            or a folder of class sub-folders; ignored when ``images`` is set.
        data_root: where torchvision datasets live.
        download: allow torchvision downloads.
        train_split: take images from the training split.
        images: the user's own image files (the batch).
        labels: labels of the batch (default: the dataset's; for ``images``,
            file i gets label i mod num_classes).
        index: position in the dataset of the batch's first image.
        shape: image shape (C, H, W); ``None``: (3, 32, 32) for samples and
            files, the native shape for datasets.
        batch_size: images in the batch (``None``: 1, or the number of ``images``);
            under ``aggregate`` the union of all clients' images.
        threat: ``fedsgd`` (one client's batch gradient), ``fedavg`` (one
            client's parameter delta after ``local_steps`` SGD steps) or
            ``aggregate`` (the weighted mean of ``clients`` updates).
        local_steps: local SGD steps of a FedAvg client (``fedavg``, or
            ``aggregate`` with more than one step).
        local_lr: local learning rate of FedAvg clients.
        local_batch_size: local batch size of FedAvg clients (``None``: all
            their images).
        clients: clients behind an ``aggregate`` update (``None``: one client
            per image); the batch is split among them in order.
        label_strategy: where the attack takes its labels: ``joint``
            (optimised), or a strategy of ``leakage.labels`` (``None``: the
            attack's default).
        checkpoint: a victim saved by ``leakage train``; its architecture
            (input normalisation included) replaces ``model``, ``activation``,
            ``num_classes`` and ``normalize``.
        normalize: the victim's input normalisation: ``dataset``
            (``(x - mean) / std`` with the dataset's published statistics,
            ImageNet's for the photographs and image files, a folder's own
            statistics, see :func:`fl_core.data.dataset_normalization`),
            ``none`` (pixels in [0, 1] go in as they are, as in DLG's code) or
            ``auto`` (the default: ``none`` for DLG's victim, the sigmoid
            LeNet, whose paper feeds it raw pixels, ``dataset`` for every
            other victim).
        bn_mode: how the client runs BatchNorm: ``train`` (the default, what
            FL clients do: batch statistics) or ``eval`` (the global model's
            running statistics, the setting of the gradient-inversion papers).
            Part of the threat model: the protocol records it and the attacks
            simulate it.
        steps: optimiser steps of the attack (``None``: the attack's default).
        restarts: random restarts of the attack (``None``: the attack's default).
        tv: total-variation weight (attack ``ig``; ``None``: default).
        bins: rows of a malicious server's imprint or trap block (attacks
            ``imprint``, ``trap``; ``None``: the attack's default).
        target_class: the class a fishing server fishes for (attack ``fishing``;
            ``None``: the label of the batch's first image, the targeted
            client's).
        sample_seed: take the batch from a random order of the dataset drawn
            with this seed (``index`` counts in that order) instead of the
            file order (``None``; a class-folder dataset lists its classes one
            after the other, so a contiguous batch holds one class).
        defenses: the clients' and server's defenses, a list applied in order
            (``[{clip: {max_norm: 1.0}}, {gaussian: {sigma: 0.01}}]``; see
            :mod:`defenses.config`); the attacker sees the defended update.
        precision: the attack's float precision: ``auto`` (float64 for L-BFGS on
            small victims such as LeNet, float32 otherwise), ``float32``, ``float64``.
        metrics: the image metrics to report (see :func:`~leakage.metrics.check_metrics`):
            a list or comma-separated text of ``psnr``, ``ssim``, ``lpips``; PSNR and
            SSIM always are. ``lpips`` needs the ``lpips`` package and, on first use,
            network to download its backbone's ImageNet weights.
        lpips_net: LPIPS backbone: ``alex`` (the default, the paper's recommended
            metric), ``vgg`` or ``squeeze``; used only with ``lpips`` in ``metrics``.
        seed: seed of the victim's weights and of the attack's random start.
        device: ``cpu`` or ``cuda``.
        out: output folder (``None``: a new folder under ``results/``).
    """

    attack: str = "dlg"
    model: str = "lenet"
    activation: str | None = None
    num_classes: int = 10
    dataset: str = "samples"
    data_root: str = "data"
    download: bool = False
    train_split: bool = False
    images: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    index: int = 0
    shape: tuple[int, int, int] | None = None
    batch_size: int | None = None
    threat: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 0.01
    local_batch_size: int | None = None
    clients: int | None = None
    label_strategy: str | None = None
    checkpoint: str | None = None
    steps: int | None = None
    restarts: int | None = None
    tv: float | None = None
    bins: int | None = None
    target_class: int | None = None
    sample_seed: int | None = None
    defenses: tuple[Any, ...] = ()
    precision: str = "auto"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    lpips_net: str = "alex"
    normalize: str = "auto"
    bn_mode: str = "train"
    seed: int = 0
    device: str = "cpu"
    out: str | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size}: use a positive integer")
        if self.images and self.batch_size is not None and self.batch_size != len(self.images):
            raise ValueError(
                f"{len(self.images)} image files given but batch size is {self.batch_size}: "
                "give one file per image of the batch"
            )
        if self.labels and len(self.labels) != self.effective_batch_size:
            raise ValueError(
                f"{len(self.labels)} labels given for a batch of {self.effective_batch_size}"
            )
        MODELS.get(self.model)
        ATTACKS.get(self.attack)
        if (self.steps is not None and self.steps < 1) or (
            self.restarts is not None and self.restarts < 1
        ):
            raise ValueError("steps and restarts must be positive integers")
        if self.threat not in THREAT_MODELS:
            raise ValueError(
                f"unknown threat model {self.threat!r}; valid: {', '.join(THREAT_MODELS)}"
            )
        if self.local_steps < 1 or self.local_lr <= 0:
            raise ValueError("local_steps must be a positive integer and local_lr positive")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ValueError(f"local batch size {self.local_batch_size}: use a positive integer")
        if self.clients is not None:
            if self.threat != "aggregate":
                raise ValueError("clients applies to --threat aggregate only")
            if not 1 <= self.clients <= self.effective_batch_size:
                raise ValueError(
                    f"{self.clients} clients cannot share a batch of {self.effective_batch_size} "
                    "images: each client needs at least one"
                )
        if any(name == "dpsgd" for name, _ in self.defenses) and self._subsampled():
            raise ValueError(
                "dpsgd samples each local batch (Poisson, rate batch/images), so the attacked "
                "samples would be random: set --local-batch-size to at least the images per "
                "client, or leave it unset"
            )
        if self.label_strategy not in (None, "joint"):
            LABEL_STRATEGIES.get(self.label_strategy)
        if self.precision not in ("auto", "float32", "float64"):
            raise ValueError(f"unknown precision {self.precision!r}; valid: auto, float32, float64")
        if self.index < 0:
            raise ValueError(f"index {self.index}: use a non-negative integer")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ValueError(
                f"unknown normalize {self.normalize!r}; valid: {', '.join(NORMALIZE_CHOICES)}"
            )
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {self.bn_mode!r}; valid: {', '.join(BN_MODES)}")
        if self.shape is not None:
            check_scorable(self.shape)

    def _check_types(self) -> None:
        """Every field of the right type (values from YAML may be anything), coerced."""

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("attack", "model", "dataset", "data_root", "threat"):
            put(name, check_text(name, getattr(self, name)))
        for name in ("activation", "label_strategy", "checkpoint", "out"):
            put(name, check_text(name, getattr(self, name), optional=True))
        for name in ("precision", "normalize", "bn_mode"):
            if not isinstance(getattr(self, name), str):
                check_text(name, getattr(self, name))  # the choices are checked below
        for name in ("download", "train_split"):
            put(name, check_flag(name, getattr(self, name)))
        put("num_classes", check_whole("num_classes", self.num_classes, low=2))
        put("index", check_whole("index", self.index))
        put("local_steps", check_whole("local_steps", self.local_steps))
        for name in ("batch_size", "local_batch_size", "clients", "steps", "restarts"):
            put(name, check_whole(name, getattr(self, name), optional=True))
        put("local_lr", check_number("local_lr", self.local_lr))
        put("tv", check_number("tv", self.tv, low=0, optional=True))
        put("seed", check_whole("seed", self.seed, low=0, high=MAX_SEED))
        put("bins", check_whole("bins", self.bins, low=2, optional=True))
        put(
            "sample_seed",
            check_whole("sample_seed", self.sample_seed, low=0, high=MAX_SEED, optional=True),
        )
        put("target_class", check_whole("target_class", self.target_class, low=0, optional=True))
        put("device", check_device("device", self.device))
        put("metrics", check_metrics(self.metrics))
        put("lpips_net", check_text("lpips_net", self.lpips_net, choices=LPIPS_NETS))
        for name in ("images", "labels"):
            value = getattr(self, name)
            if value is None:
                value = ()
            if not isinstance(value, (list, tuple)):
                kind = "file paths" if name == "images" else "whole numbers"
                raise ValueError(f"{name} must be a list of {kind}; got {_got(value)}")
            put(name, tuple(value))
        put("images", tuple(check_text("images", v) for v in self.images))
        put("labels", tuple(check_whole("labels", v, low=0) for v in self.labels))
        if self.shape is not None:
            shape = self.shape
            if not isinstance(shape, (list, tuple)) or len(shape) != 3:
                raise ValueError(f"shape must be three whole numbers C H W; got {_got(shape)}")
            c, h, w = (check_whole("shape", v, low=1) for v in shape)
            if c not in (1, 3):
                raise ValueError(f"shape {c} {h} {w}: C (channels) must be 1 or 3")
            put("shape", (c, h, w))
        if self.defenses is not None and not isinstance(self.defenses, (list, tuple)):
            raise ValueError("defenses must be a list, e.g. [{clip: {max_norm: 1.0}}]")
        put("defenses", normalize_defenses(self.defenses or ()))

    def _subsampled(self) -> bool:
        """Whether some client's local batch is smaller than its share of the batch."""
        b = self.local_training().batch_size
        largest = math.ceil(self.effective_batch_size / self.effective_clients)
        return b is not None and b < largest

    @property
    def effective_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return len(self.images) if self.images else 1

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["images"], d["labels"] = list(self.images), list(self.labels)
        d["metrics"] = list(self.metrics)
        d["defenses"] = [{name: dict(params)} for name, params in self.defenses]
        d["shape"] = list(self.shape) if self.shape else None
        d["batch_size"] = self.effective_batch_size
        return d

    @property
    def effective_clients(self) -> int:
        if self.threat != "aggregate":
            return 1
        return self.clients if self.clients is not None else self.effective_batch_size

    def local_training(self) -> LocalTraining:
        """How the clients compute their updates under this threat model."""
        fedavg = self.threat == "fedavg" or (self.threat == "aggregate" and self.local_steps > 1)
        if not fedavg:
            return LocalTraining("fedsgd", bn_mode=self.bn_mode)
        return LocalTraining(
            "fedavg",
            batch_size=self.local_batch_size,
            local_steps=self.local_steps,
            lr=self.local_lr,
            bn_mode=self.bn_mode,
        )

    def attack_options(self) -> dict[str, Any]:
        """The options this config sets for the attack (unset ones keep its defaults)."""
        options = {
            "steps": self.steps,
            "restarts": self.restarts,
            "tv": self.tv,
            "bins": self.bins,
            "target": self.target_class,
            "label_strategy": self.label_strategy,
            "dtype": self.precision,
            "device": self.device,
        }
        accepted = {f.name for f in dataclasses.fields(ATTACKS.get(self.attack))}
        defaults = {"dtype": "auto", "device": "cpu"}
        out = {}
        for name, value in options.items():
            if value is None or (name not in accepted and defaults.get(name) == value):
                continue
            if name not in accepted:
                flag = {"dtype": "precision", "target": "target_class"}.get(name, name)
                flag = flag.replace("_", "-")
                raise ValueError(f"attack {self.attack} takes no --{flag}; leave it unset")
            out[name] = value
        return out


def load_config(path: str | Path, **overrides: Any) -> AttackConfig:
    """Read a YAML config (keys: the fields of :class:`AttackConfig`, ``-`` or ``_``).

    Unknown keys are rejected with the list of valid ones; ``overrides`` (e.g.
    command-line options) win over the file.
    """
    return make_config({**read_config_file(path), **overrides})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, keys with ``-`` written ``_``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(values: dict[str, Any]) -> AttackConfig:
    """An :class:`AttackConfig` from a dict, rejecting unknown keys."""
    return build_checked(AttackConfig, values)
