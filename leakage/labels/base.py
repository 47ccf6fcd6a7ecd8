"""The last layer as the attacker sees it, the strategy registry, and shared helpers.

:class:`LastLayer` and :func:`last_layer` read the last linear layer's gradient and
global parameters from an Observation; :data:`LABEL_STRATEGIES` holds the strategies
(one module each in this package) and :func:`recover_labels` applies one. The
helpers check a strategy's inputs and turn real-valued class counts into labels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fl_core.registry import Registry
from fl_core.types import Observation

from ..objectives import last_linear

__all__ = ["LABEL_STRATEGIES", "LastLayer", "delta_coefficients", "last_layer", "recover_labels"]

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


def delta_coefficients(
    lr: float, local_steps: int, momentum: float = 0.0, weight_decay: float = 0.0
) -> tuple[float, float]:
    """``(a, c)`` with Δ = a·G + c·θ_0 after E steps of ``torch.optim.SGD`` at a constant G.

    The local steps of FedAvg (McMahan et al. 2017) as ``torch.optim.SGD`` takes
    them (dampening 0, no Nesterov): d_s = G + λ·θ_{s−1}, v_1 = d_1,
    v_s = μ·v_{s−1} + d_s, θ_s = θ_{s−1} − η·v_s. When the loss gradient G is
    the same at every step, every coordinate follows this linear recursion, so
    the delta Δ = θ_E − θ_0 is a·G + c·θ_0; the coefficients come from running
    it on the scalars (G, θ_0) = (1, 0) and (0, 1). Without weight decay c = 0
    and a = −η·Σ_{j=1..E} (1 − μ^j)/(1 − μ) (−η·E without momentum); one step
    gives a = −η, c = −η·λ whatever μ.

    Args:
        lr: η > 0.
        local_steps: E >= 1.
        momentum: μ >= 0.
        weight_decay: λ >= 0.

    Returns:
        ``(a, c)``, floats; ``a < 0``.
    """
    values = (lr, momentum, weight_decay)
    if not (
        all(math.isfinite(v) for v in values) and lr > 0 and momentum >= 0 and weight_decay >= 0
    ):
        raise ValueError(
            f"a FedAvg delta reveals a gradient only with a positive finite learning rate and "
            f"non-negative momentum and weight decay; the protocol says lr={lr}, "
            f"momentum={momentum}, weight_decay={weight_decay}"
        )
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(
            f"a FedAvg delta reveals a gradient only with its local step count; "
            f"the protocol says local_steps={local_steps}"
        )

    def delta(g: float, theta0: float) -> float:
        theta, v = theta0, 0.0
        for s in range(local_steps):
            d = g + weight_decay * theta
            v = d if s == 0 else momentum * v + d
            theta = theta - lr * v
        return theta - theta0

    a, c = delta(1.0, 0.0), delta(0.0, 1.0)
    if not (math.isfinite(a) and math.isfinite(c)) or a == 0:
        raise ValueError(
            f"lr={lr}, local_steps={local_steps}, momentum={momentum}, "
            f"weight_decay={weight_decay}: the local steps do not determine the gradient "
            "from the delta (the step sizes overflow); use the FedSGD gradient"
        )
    return a, c


def update_as_gradient(obs: Observation, index: int) -> Tensor:
    """Parameter ``index``'s update as the gradient it implies (see :func:`last_layer`).

    A FedSGD update is returned as it is; a FedAvg delta Δ becomes
    (Δ − c·θ_global) / a with :func:`delta_coefficients` of the revealed local
    settings.
    """
    t = obs.update.tensors[index].detach()
    if obs.update.kind == "gradient":
        return t
    p = obs.protocol
    a, c = delta_coefficients(p.lr, p.local_steps, p.momentum, p.weight_decay)
    theta0 = obs.parameters[index].detach().to(t)
    return (t - c * theta0) / a if c else t / a


def last_layer(obs: Observation, *, model: nn.Module | None = None) -> LastLayer:
    """The last linear layer's gradient and global parameters, read from an Observation.

    A FedSGD update is the gradient. A FedAvg delta Δ = θ_local − θ_global is turned
    into the gradient G it implies with everything the protocol reveals about the
    local steps (lr η, steps E, momentum μ, weight decay λ): G = (Δ − c·θ_global) / a
    with the coefficients of :func:`delta_coefficients` (the constant-gradient model
    of E ``torch.optim.SGD`` steps). That is −Δ/(η·E) for plain SGD. It is exact
    after one step (G = −Δ/η − λ·θ_global, with or without momentum, whose buffer
    starts at the first gradient); after several it estimates the mean of gradients
    taken at moving parameters. An aggregate of clients with the same local
    settings (the secure-aggregation view) gives the weighted mean of their G.

    Args:
        obs: what the server saw of one client (or of an aggregate).
        model: the global model rebuilt from ``obs`` (``obs.model()``), to skip a
            rebuild when the caller already has it; only its structure is read.

    Returns:
        :class:`LastLayer` with float tensors as stored in the update.

    Raises:
        ValueError: If the model has no Linear layer, or a delta comes without a
            positive learning rate, a step count, or with local settings that do
            not determine the gradient.
    """
    model = obs.model() if model is None else model
    w_idx, b_idx = last_linear(model)
    return LastLayer(
        weight_grad=update_as_gradient(obs, w_idx),
        bias_grad=None if b_idx is None else update_as_gradient(obs, b_idx),
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
