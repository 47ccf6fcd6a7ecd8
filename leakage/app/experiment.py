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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from defenses.config import build_plan, normalize_defenses
from fl_core.checkpoint import load_checkpoint
from fl_core.client import Client, LocalTraining
from fl_core.data import ImageData, dataset_normalization, load_dataset, load_image_files
from fl_core.models import MODEL_CONVERTERS, MODELS, build_model
from fl_core.server import Server
from fl_core.types import GroundTruth, Observation

from ..attacks import ATTACKS
from ..labels import LABEL_STRATEGIES
from ..metrics import (
    DEFAULT_METRICS,
    LPIPS_NETS,
    check_metrics,
    label_accuracy,
    label_set_accuracy,
    score_images,
)
from ..simulate import THREAT_MODELS
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

NORMALIZE_CHOICES = ("auto", "dataset", "none")
BN_MODES = ("train", "eval")
MAX_SEED = 2**63 - 1
"""Seeds are whole numbers in [0, MAX_SEED] (torch's and numpy's generators both take them)."""


# ----------------------------------------------------------------- value checks
#
# One-line ValueErrors naming the key and what it takes, for values read from YAML
# files and --set flags (any YAML type may arrive: text, lists, dates, ...).


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_whole(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
) -> int | None:
    """``value`` as an int: a whole number (``2.0`` is 2) within ``[low, high]``.

    Booleans, text and fractional numbers are refused; ``None`` only when ``optional``.
    """
    if value is None and optional:
        return None
    bounds = (
        f" in [{low}, {high}]"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    what = f"{name} must be a whole number{bounds}{' or null' if optional else ''}"
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{what}; got {_got(value)}")
    return number


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    above: bool = False,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float, at least ``low`` (more than ``low`` with ``above``).

    Text that reads as a number is taken (YAML reads ``1e-4`` as text); booleans,
    NaN and infinities are refused; ``None`` only when ``optional``.
    """
    if value is None and optional:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if above else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    what = f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}"
    what += " or null" if optional else ""
    number = None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
    except (ValueError, OverflowError):
        number = None
    if (
        number is None
        or not math.isfinite(number)
        or (low is not None and (number <= low if above else number < low))
        or (high is not None and number > high)
    ):
        raise ValueError(f"{what}; got {_got(value)}")
    return number


def check_text(
    name: str, value: Any, *, choices: Sequence[str] | None = None, optional: bool = False
) -> str | None:
    """``value`` as non-empty text (one of ``choices`` when given); ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"unknown {name} {_got(value)}; valid: {', '.join(choices)}")
        return value
    if not isinstance(value, str) or not value.strip():
        what = "non-empty text" + (" or null" if optional else "")
        raise ValueError(f"{name} must be {what}; got {_got(value)}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool: YAML's true or false only."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {_got(value)}")
    return value


def check_device(name: str, value: Any) -> str:
    """A torch device name that this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    check_text(name, value)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {value!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {value!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: no CUDA device here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 .. cuda:N-1"
        )
    return value


def check_scorable(
    shape: Sequence[int],
    what: str = "shape",
    *,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    lpips_net: str = "alex",
) -> None:
    """Raise a one-line error unless images of ``shape`` (C, H, W) can be scored.

    Runs :func:`~leakage.metrics.score_images` with ``metrics`` on one blank pair of
    that shape (cheap; capped at 64 x 64, as they need a minimum size only), so what
    the metrics need (SSIM's window and LPIPS's backbone fitting in the image) is
    checked before any attack is run, not after it. With ``lpips`` among the metrics
    this also loads the LPIPS network (kept for the scoring), so a missing ``lpips``
    package (ImportError) or backbone weights that cannot be downloaded (OSError)
    are found here too.

    Raises:
        ValueError: If the metrics cannot score images of ``shape``.
        ImportError, OSError: If LPIPS is asked for and its package or weights are
            missing (one-line messages from :func:`~leakage.metrics.lpips`).
    """
    c, h, w = (int(s) for s in shape)
    blank = torch.zeros(1, c, min(h, 64), min(w, 64))  # the metrics need a minimum size only
    try:
        score_images(blank, blank, data_range=1.0, metrics=metrics, lpips_net=lpips_net)
    except ValueError as e:
        text = " ".join(str(s) for s in shape)
        raise ValueError(f"{what} {text} cannot be scored: {str(e).splitlines()[0]}") from None


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
    valid = [f.name for f in dataclasses.fields(AttackConfig)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    return AttackConfig(**values)


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
