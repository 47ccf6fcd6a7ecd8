"""Clients: hold data, compute an update from the global model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .types import GroundTruth, Protocol, Update

__all__ = ["Client", "LocalTraining", "WEIGHTINGS", "float_buffers"]

WEIGHTINGS = ("dataset", "processed")
"""The aggregation weights a client may report (see :attr:`LocalTraining.weighting`)."""


@dataclass(frozen=True)
class LocalTraining:
    """How a client turns the global model into an update.

    Attributes:
        algorithm: ``"fedsgd"`` sends the gradient of the mean cross-entropy on
            one batch; ``"fedavg"`` runs ``local_steps`` SGD steps and sends the
            parameter delta θ_local − θ_global (McMahan et al. 2017).
        batch_size: local batch size; ``None`` uses all the client's data.
        local_steps: SGD steps per round (FedAvg only).
        lr: local learning rate (FedAvg only).
        momentum: local SGD momentum (FedAvg only).
        weight_decay: local SGD weight decay, L2 added to the gradient (FedAvg only).
        bn_mode: ``"train"`` (the default, what FL clients do in practice:
            BatchNorm normalises with the batch's own statistics and updates
            its running statistics) or ``"eval"`` (BatchNorm uses the global
            model's running statistics, as the gradient-inversion papers'
            victims do). Recorded in the protocol, so attacks simulate it.
        weighting: the aggregation weight the client reports with its update
            (``Update.weight``, the server's FedAvg weight): ``"dataset"`` (the
            default) its dataset size n_k, the weight n_k / n of McMahan et
            al. 2017 (AISTATS, "Communication-Efficient Learning of Deep
            Networks from Decentralized Data", Algorithm 1) for FedSGD and
            FedAvg alike; ``"processed"`` the distinct samples this round's
            computation used (the FedSGD batch b, ``min(n_k, b·E)`` for
            FedAvg), which weights clients by the work done rather than by the
            data held.
    """

    algorithm: Literal["fedsgd", "fedavg"] = "fedsgd"
    batch_size: int | None = None
    local_steps: int = 1
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    bn_mode: Literal["train", "eval"] = "train"
    weighting: Literal["dataset", "processed"] = "dataset"

    def __post_init__(self) -> None:
        if self.algorithm not in ("fedsgd", "fedavg"):
            raise ValueError(f"algorithm must be 'fedsgd' or 'fedavg'; got {self.algorithm!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size}: use a positive integer")
        if self.local_steps < 1:
            raise ValueError(f"local_steps {self.local_steps}: use a positive integer")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, momentum and weight_decay non-negative")
        if self.bn_mode not in ("train", "eval"):
            raise ValueError(f"bn_mode must be 'train' or 'eval'; got {self.bn_mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"weighting must be 'dataset' (n_k) or 'processed' (samples used); "
                f"got {self.weighting!r}"
            )


def float_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's floating-point buffers (BatchNorm running statistics)."""
    return [b for b in model.buffers() if b.is_floating_point()]


class Client:
    """A federated client holding a local dataset.

    Args:
        client_id: the client's id.
        images: (N, C, H, W) local images.
        labels: (N,) local labels.
        training: how updates are computed.
    """

    def __init__(
        self,
        client_id: int,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        training: LocalTraining | None = None,
    ) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError("client data must be images (N, C, H, W) and labels (N,)")
        if len(images) == 0:
            raise ValueError(f"client {client_id} has no data")
        self.client_id = client_id
        self.images = images
        self.labels = labels
        self.training = training or LocalTraining()

    def __len__(self) -> int:
        return len(self.labels)

    def _batch_size(self) -> int:
        b = self.training.batch_size
        return len(self) if b is None else min(b, len(self))

    def protocol(self) -> Protocol:
        """What the protocol reveals about this client's local computation.

        ``num_samples`` is the number of distinct samples behind the update,
        ``weight`` the aggregation weight sent with it (n_k, or that number
        under ``weighting="processed"``).
        """
        t = self.training
        b = self._batch_size()
        train_mode = t.bn_mode == "train"
        if t.algorithm == "fedsgd":
            weight = len(self) if t.weighting == "dataset" else b
            return Protocol(
                "fedsgd", num_samples=b, batch_size=b, train_mode=train_mode, weight=weight
            )
        seen = min(len(self), b * t.local_steps)
        return Protocol(
            "fedavg",
            seen,
            b,
            local_steps=t.local_steps,
            lr=t.lr,
            momentum=t.momentum,
            train_mode=train_mode,
            weight_decay=t.weight_decay,
            weight=len(self) if t.weighting == "dataset" else seen,
        )

    def _batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Index batches for this round: reshuffled each epoch, drawn from ``generator``."""
        n, b = len(self), self._batch_size()
        steps = 1 if self.training.algorithm == "fedsgd" else self.training.local_steps
        if b == n:
            return [torch.arange(n)] * steps
        order = torch.empty(0, dtype=torch.long)
        out = []
        for _ in range(steps):
            if len(order) < b:
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            out.append(order[:b])
            order = order[b:]
        return out

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """Compute this round's update.

        Args:
            model: a working copy holding the global weights; the client may
                change it (the server reloads it for the next client).
            round: round index, recorded in the update.
            generator: the client's randomness for this round (batch choice).

        Returns:
            ``(update, ground_truth)``: the update leaves for the server, the
            ground truth (the samples used) for the metrics only.
        """
        device = next(model.parameters()).device
        params = [p for p in model.parameters()]
        batches = self._batches(generator)
        model.train(self.training.bn_mode == "train")
        if self.training.algorithm == "fedsgd":
            idx = batches[0]
            x, y = self.images[idx].to(device), self.labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            tensors = torch.autograd.grad(loss, params)
            kind = "gradient"
            used = idx
        else:
            start = [p.detach().clone() for p in params]
            t = self.training
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            for idx in batches:
                x, y = self.images[idx].to(device), self.labels[idx].to(device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            tensors = tuple(p.detach() - s for p, s in zip(params, start))
            kind = "delta"
            used = torch.unique(torch.cat(batches))
        update = Update(
            tuple(t.detach() for t in tensors),
            kind,
            num_samples=len(used),
            client_id=self.client_id,
            round=round,
            buffers=tuple(b.detach().clone() for b in float_buffers(model)),
            weight=self.protocol().weight,
        )
        truth = GroundTruth(self.images[used], self.labels[used], self.client_id, round)
        return update, truth
