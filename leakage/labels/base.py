"""The last layer as the attacker sees it, the strategy registry, and shared helpers.

:class:`LastLayer` and :func:`last_layer` read the last linear layer's gradient and
global parameters from an Observation; :data:`LABEL_STRATEGIES` holds the strategies
(one module each in this package) and :func:`recover_labels` applies one. The
helpers check a strategy's inputs and turn real-valued class counts into labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fl_core.registry import Registry
from fl_core.types import Observation

from ..objectives import last_linear

__all__ = ["LABEL_STRATEGIES", "LastLayer", "last_layer", "recover_labels"]

log = logging.getLogger(__name__)

LABEL_STRATEGIES: Registry[Tensor] = Registry("label strategy")
"""Strategies by name: ``auto``, ``idlg``, ``ilrg``, ``llg``, ``rlg``, ``yin``."""


# ---------------------------------------------------------------- the last layer


@dataclass(frozen=True, eq=False)
class LastLayer:
    """The last linear layer as the attacker sees it: its gradient and its global weights.

    Attributes:
        weight_grad: (K, F) gradient of the mean loss with respect to the weight.
        bias_grad: (K,) gradient with respect to the bias; ``None`` without a bias.
        weight: (K, F) the global weight the client received.
        bias: (K,) the global bias; ``None`` without a bias.
    """

    weight_grad: Tensor
    bias_grad: Tensor | None
    weight: Tensor
    bias: Tensor | None

    def __post_init__(self) -> None:
        if self.weight_grad.ndim != 2:
            raise ValueError(
                f"weight_grad must be (classes, features); got {tuple(self.weight_grad.shape)}"
            )
        if self.weight.shape != self.weight_grad.shape:
            raise ValueError(
                f"weight {tuple(self.weight.shape)} and weight_grad "
                f"{tuple(self.weight_grad.shape)} must have the same (K, F) shape"
            )
        if (self.bias_grad is None) != (self.bias is None):
            raise ValueError("pass both bias and bias_grad, or neither (a layer without bias)")
        k = self.weight.shape[0]
        for name in ("bias_grad", "bias"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (k,):
                raise ValueError(f"{name} must be ({k},) for {k} classes; got {tuple(t.shape)}")

    @property
    def num_classes(self) -> int:
        """K, the number of classes (rows)."""
        return self.weight.shape[0]


def last_layer(obs: Observation, *, model: nn.Module | None = None) -> LastLayer:
    """The last linear layer's gradient and global parameters, read from an Observation.

    A FedSGD update is the gradient. A FedAvg delta Δ = θ_local − θ_global implies the
    gradient −Δ / (lr · local_steps): exact after one plain SGD step (with or without
    momentum, whose buffer starts at the first gradient), an approximation after
    several, where it is the mean of gradients taken at moving parameters.

    Args:
        obs: what the server saw of one client (or of an aggregate).
        model: the global model rebuilt from ``obs`` (``obs.model()``), to skip a
            rebuild when the caller already has it; only its structure is read.

    Returns:
        :class:`LastLayer` with float tensors as stored in the update.

    Raises:
        ValueError: If the model has no Linear layer, or a delta comes without a
            positive learning rate.
    """
    model = obs.model() if model is None else model
    w_idx, b_idx = last_linear(model)
    tensors = obs.update.tensors
    if obs.update.kind == "gradient":
        scale = 1.0
    else:
        lr, steps = obs.protocol.lr, obs.protocol.local_steps
        if not lr > 0 or steps < 1:
            raise ValueError(
                f"a FedAvg delta reveals a gradient only with the local learning rate and "
                f"step count; the protocol says lr={lr}, local_steps={steps}"
            )
        scale = -1.0 / (lr * steps)
    return LastLayer(
        weight_grad=tensors[w_idx].detach() * scale,
        bias_grad=None if b_idx is None else tensors[b_idx].detach() * scale,
        weight=obs.parameters[w_idx].detach(),
        bias=None if b_idx is None else obs.parameters[b_idx].detach(),
    )


# ---------------------------------------------------------------- shared helpers


def _check_num_labels(layer: LastLayer, num_labels: int) -> None:
    if not isinstance(layer, LastLayer):
        raise ValueError(f"layer must be a LastLayer; got {type(layer)!r}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels {num_labels!r}: use a positive integer")


def _counts_to_labels(counts: Tensor) -> Tensor:
    """(K,) integer counts -> sorted (Σ counts,) int64 labels with repeats."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts.long().cpu())


def _round_counts(x: Tensor, total: int) -> Tensor:
    """Non-negative integer counts summing to ``total``, close to the real (K,) ``x``.

    Clamps to [0, total], rounds, then moves single units where the rounding error is
    largest until the sum is right (a greedy largest-remainder rule).
    """
    x = torch.nan_to_num(x.double(), nan=0.0).clamp(0.0, float(total))
    n = x.round()
    while n.sum() > total:
        excess = torch.where(n > 0, n - x, torch.full_like(x, -torch.inf))
        n[int(excess.argmax())] -= 1
    while n.sum() < total:
        n[int((x - n).argmax())] += 1
    return n.long()


# ---------------------------------------------------------------- applying a strategy


def recover_labels(
    obs: Observation, strategy: str = "auto", *, generator: torch.Generator | None = None
) -> Tensor:
    """The labels behind an update, by a strategy of :data:`LABEL_STRATEGIES`.

    Args:
        obs: what the server saw; ``obs.protocol.num_samples`` labels are recovered
            (the total over clients for an aggregate).
        strategy: ``auto``, ``idlg``, ``ilrg``, ``llg``, ``rlg`` or ``yin``.
        generator: randomness for strategies that draw (llg's dummy inputs).

    Returns:
        (num_samples,) int64 labels, sorted.

    Raises:
        ValueError: For an unknown strategy (the message lists the valid ones) or a
            strategy that cannot handle this observation.
    """
    fn = LABEL_STRATEGIES.get(strategy)
    model = obs.model()
    layer = last_layer(obs, model=model)
    labels = fn(layer, obs.protocol.num_samples, model=model, generator=generator)
    log.debug("labels by %s: %s", strategy, labels.tolist())
    return labels
