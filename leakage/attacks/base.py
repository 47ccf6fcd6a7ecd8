"""What every attack shares: the result type and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from fl_core.registry import Registry
from fl_core.types import Observation

__all__ = ["ATTACKS", "Attack", "Reconstruction", "build_attack"]


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """An attack's output.

    Attributes:
        images: (B, C, H, W) reconstructed images, clipped to [0, 1].
        labels: (B,) recovered labels.
        loss: final matching loss of the kept restart.
        history: matching loss after each optimiser step of the kept restart.
        restart_losses: final matching loss of every restart tried.
        steps: optimiser steps taken by the kept restart.
        total_steps: optimiser steps over all restarts.
        evaluations: objective evaluations (forward + double backward) over all restarts.
        stopped: why the kept restart stopped (``"converged"``, ``"steps"``,
            ``"non-finite"``).
        options: the settings the solver ran with once defaults that depend on
            the victim were resolved (empty where a solver has none).
        candidates: how many of ``images`` (the first ones) are reconstructions
            when the rest are placeholders that keep the batch size (an attack
            that found fewer images than the batch holds); ``None``: all are.
            Scoring matches the reconstructions first
            (:func:`leakage.metrics.score_images`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    history: list[float] = field(default_factory=list)
    restart_losses: list[float] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    evaluations: int = 0
    stopped: str = "steps"
    options: dict = field(default_factory=dict)
    candidates: int | None = None


def sent_modification(obs: Observation, name: str) -> dict:
    """The settings of the modification ``name`` a malicious server sent, read from the
    observation; one-line errors for an honest observation, another modification, or
    an update of several local steps (the malicious-server attacks read one gradient)."""
    settings = dict(obs.model_spec.modification)
    if obs.protocol.server != "malicious" or settings.get("name") != name:
        raise ValueError(
            f"the {name} attack needs a malicious server that sent its {name} modification; "
            f"this observation's model has none (leakage attack --attack {name} sends one)"
        )
    if obs.protocol.local_steps > 1:
        raise ValueError(
            f"the {name} attack reads one gradient; this update took "
            f"{obs.protocol.local_steps} local steps (use FedSGD or one local step)"
        )
    return settings


def block_gradients(obs: Observation, rows: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a sent block's ``rows`` measuring rows (weight (rows, d), bias
    (rows,)): the first two parameters of the model a malicious server sent."""
    from ..labels import update_as_gradient

    weight, bias = update_as_gradient(obs, 0), update_as_gradient(obs, 1)
    if weight.shape[0] != rows or bias.shape != (rows,):
        raise ValueError(f"the observation's first parameters are not the {name} block's rows")
    return weight, bias


def padded(found: torch.Tensor, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``found`` (R, ...) as R images of ``shape`` in [0, 1], then mid-grey placeholders up
    to ``n`` (an attack that found fewer images than the batch holds; see
    :attr:`Reconstruction.candidates`)."""
    images = found.reshape(len(found), *shape).float().clamp(0, 1)
    if len(images) >= n:
        return images
    return torch.cat([images, torch.full((n - len(images), *shape), 0.5)])


class Attack(Protocol):
    """An attack: one call from what the server sees to a reconstruction."""

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction: ...


ATTACKS: Registry[Attack] = Registry("attack")


def build_attack(name: str, **params) -> Attack:
    """Build the attack registered as ``name`` with its parameters."""
    return ATTACKS.build(name, **params)
