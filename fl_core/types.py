"""The values that cross the FL core's boundaries.

* :class:`Update` is what leaves a client: tensors in ``model.parameters()``
  order, a gradient (FedSGD) or a parameter delta (FedAvg).
* :class:`Observation` is what the server legitimately sees about one client
  in one round: the global model it sent, the client's update (after the
  client's own defenses) and the metadata the protocol reveals. Attackers
  receive Observations and nothing else.
* :class:`GroundTruth` is the data a client actually used. It travels on a
  separate channel, to the metrics only; no Observation refers to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch
from torch import nn

from .models import ModelSpec

__all__ = ["GroundTruth", "Observation", "Protocol", "RoundRecord", "Update", "UpdateKind"]

UpdateKind = Literal["gradient", "delta"]
SERVERS = ("honest", "malicious")
"""The server threat models: honest but curious, or malicious (it modifies the model it sends)."""


@dataclass(frozen=True, eq=False)
class Update:
    """One client's update for one round.

    Attributes:
        tensors: one tensor per model parameter, in ``model.parameters()`` order.
        kind: ``"gradient"`` (FedSGD: dL/dθ of one batch) or ``"delta"``
            (FedAvg: θ_local − θ_global after local steps).
        num_samples: number of distinct samples the update was computed on (a
            FedSGD batch, or the ``min(n_k, b·E)`` samples E FedAvg steps of
            batch b visit); what an attacker reconstructs.
        client_id: the client that sent it.
        round: the round it belongs to.
        buffers: the client's floating-point buffers (BatchNorm statistics)
            after local computation, in ``model.buffers()`` order; empty when
            the model has none.
        weight: the aggregation weight the client reports with it. Clients of
            :class:`~fl_core.client.Client` send their dataset size n_k, the
            weight of McMahan et al. 2017 (AISTATS, Algorithm 1: n_k / n), or
            ``num_samples`` under ``LocalTraining(weighting="processed")``.
            ``None`` (the default for hand-made updates): ``num_samples``.
    """

    tensors: tuple[torch.Tensor, ...]
    kind: UpdateKind
    num_samples: int
    client_id: int = 0
    round: int = 0
    buffers: tuple[torch.Tensor, ...] = ()
    weight: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "delta"):
            raise ValueError(f"update kind must be 'gradient' or 'delta'; got {self.kind!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive; got {self.num_samples}")
        if self.weight is None:
            object.__setattr__(self, "weight", self.num_samples)
        elif not self.weight > 0:
            raise ValueError(f"weight must be positive (a sample count); got {self.weight}")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "buffers", tuple(self.buffers))

    @cached_property
    def flat(self) -> torch.Tensor:
        """All tensors concatenated into one vector (d,), computed once."""
        return torch.cat([t.reshape(-1) for t in self.tensors])

    def norm(self) -> float:
        """L2 norm of the whole update."""
        return float(self.flat.norm())

    def with_tensors(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Update:
        """Same metadata, new tensors (shapes must match)."""
        tensors = tuple(tensors)
        if len(tensors) != len(self.tensors) or any(
            a.shape != b.shape for a, b in zip(tensors, self.tensors)
        ):
            raise ValueError("replacement tensors must match the update's shapes one to one")
        return replace(self, tensors=tensors)

    def with_flat(self, flat: torch.Tensor) -> Update:
        """Same metadata, tensors cut from a flat vector (d,)."""
        if flat.numel() != self.flat.numel():
            raise ValueError(
                f"flat vector has {flat.numel()} entries; expected {self.flat.numel()}"
            )
        parts = torch.split(flat, [t.numel() for t in self.tensors])
        return self.with_tensors([p.view_as(t) for p, t in zip(parts, self.tensors)])


@dataclass(frozen=True)
class Protocol:
    """What the FL protocol reveals about how a client computed its update.

    Attributes:
        algorithm: ``"fedsgd"`` or ``"fedavg"``.
        num_samples: distinct samples the update was computed on
            (``Update.num_samples``: the FedSGD batch, ``min(n_k, b·E)`` for
            FedAvg); the number of samples an attack reconstructs.
        batch_size: local batch size.
        local_steps: local optimiser steps (1 for FedSGD).
        lr: local learning rate (FedAvg).
        momentum: local SGD momentum μ (FedAvg; ``torch.optim.SGD``'s heavy
            ball, dampening 0, the buffer starting at the first gradient).
        loss: the training loss (``"cross_entropy"``, mean over the batch).
        train_mode: whether the model ran in train mode (BatchNorm uses batch
            statistics).
        client_samples: for an aggregate of several clients' updates (the
            secure-aggregation view), the number of samples behind each
            client's update, in client order; empty for a single client.
        weight_decay: local SGD weight decay λ (FedAvg): ``λ·θ`` added to every
            step's gradient, as ``torch.optim.SGD(weight_decay=λ)`` does.
        weight: the aggregation weight sent with the update (``Update.weight``):
            the dataset size n_k (McMahan et al. 2017, Algorithm 1) or the
            samples processed, see ``LocalTraining.weighting``; ``None``:
            ``num_samples``.
        client_weights: for an aggregate, each client's weight in the mean, in
            client order; empty for a single client.
        server: the server the client talked to: ``"honest"`` (honest but
            curious: it sent the true global model and only looks at what it
            receives) or ``"malicious"`` (it sent a model it modified to make
            the update leak, see :mod:`fl_core.malicious`; the modification is
            the ``modification`` entry of the observation's ``model_spec``). The
            client's computation and defenses are the same under both.
    """

    algorithm: Literal["fedsgd", "fedavg"]
    num_samples: int
    batch_size: int
    local_steps: int = 1
    lr: float = 0.0
    momentum: float = 0.0
    loss: str = "cross_entropy"
    train_mode: bool = True
    client_samples: tuple[int, ...] = ()
    weight_decay: float = 0.0
    weight: int | None = None
    client_weights: tuple[int, ...] = ()

    server: Literal["honest", "malicious"] = "honest"

    def __post_init__(self) -> None:
        if self.weight is None:
            object.__setattr__(self, "weight", self.num_samples)
        if self.server not in SERVERS:
            raise ValueError(f"server must be one of {', '.join(SERVERS)}; got {self.server!r}")


@dataclass(frozen=True, eq=False)
class Observation:
    """What the server sees of one client in one round: the attacker's whole input.

    Treat it as read-only: its tensors are shared with the server (the update
    is the one it aggregates; the global parameters are one snapshot per round).

    Attributes:
        round: round index.
        client_id: the sending client.
        model_spec: the architecture of the global model.
        parameters: the global parameters sent to the client, detached copies
            in ``model.parameters()`` order.
        buffers: the global model's buffers (name, tensor) as sent.
        update: the client's update as received (after client-side defenses).
        protocol: what the protocol reveals about local computation.
    """

    round: int
    client_id: int
    model_spec: ModelSpec
    parameters: tuple[torch.Tensor, ...]
    buffers: tuple[tuple[str, torch.Tensor], ...]
    update: Update
    protocol: Protocol

    def model(self, *, device: torch.device | str | None = None) -> nn.Module:
        """A fresh copy of the global model the client received, in train mode."""
        model = self.model_spec.build()
        with torch.no_grad():
            for p, v in zip(model.parameters(), self.parameters, strict=True):
                p.copy_(v)
            named = dict(model.named_buffers())
            for name, v in self.buffers:
                named[name].copy_(v)
        model.train(self.protocol.train_mode)
        return model.to(device) if device is not None else model


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The data behind one client's update: for metrics only, never for attackers.

    Attributes:
        images: (N, C, H, W) the images the update was computed on, in [0, 1].
        labels: (N,) their labels.
        client_id: the client.
        round: the round.
    """

    images: torch.Tensor
    labels: torch.Tensor
    client_id: int
    round: int


@dataclass
class RoundRecord:
    """Summary of one round, as returned by :meth:`fl_core.server.Server.run`.

    Attributes:
        round: round index.
        client_ids: the sampled clients.
        num_samples: samples behind each sampled client's update.
        update_norms: L2 norm of each update as received by the server.
        metrics: whatever the evaluation callback returned (e.g. test accuracy).
    """

    round: int
    client_ids: list[int]
    num_samples: list[int]
    update_norms: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
