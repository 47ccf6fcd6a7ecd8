"""Analytic inversion of a first fully connected layer (Phong et al. 2017).

For a first layer z = W·x + b, the gradient of the loss of one sample is
∂L/∂W_i = (∂L/∂z_i)·x and ∂L/∂b_i = ∂L/∂z_i, so every row with a non-zero
bias gradient gives x = (∂L/∂W_i) / (∂L/∂b_i) exactly (Phong, Aono, Hayashi,
Wang, Moriai, "Privacy-preserving deep learning via additively homomorphic
encryption", 2017; used at scale by Fowl et al., "Robbing the Fed", 2022). At
batch size 1 the attack takes the least-squares solution over all rows,
x = Σ_i b_i·W_i / Σ_i b_i², which is the same x and robust to rows whose bias
gradient is tiny.

For a batch, a row mixes the samples whose neuron i is active. With ReLU,
each sample switches off about half of the neurons, so some rows carry one
sample only and return it exactly; those rows agree with each other. The
attack clusters the per-row candidates and returns the N largest clusters'
centres. With an activation that never switches off (sigmoid) every row is a
mixture and the batch is not recovered; the attack still returns its best
candidates, and the scores will say so.

The layer reads the victim's *normalised* input when the victim carries an
input normalisation (``ModelSpec.normalize``); the attack maps it back to
pixels with the published mean and std, which the attacker knows from the
architecture.

A FedAvg delta is first turned into the gradient it implies with the local
settings the protocol reveals (:func:`leakage.labels.update_as_gradient`:
exact after one step, weight decay and momentum included; the ratio alone
cancels η but not weight decay's λ·θ term); after several steps the rows mix
the successive iterates and the result is an approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fl_core.types import Observation

from ..labels import update_as_gradient
from .base import ATTACKS, Reconstruction
from .matching import attack_labels

__all__ = ["Analytic", "first_linear_layer", "invert_linear"]


def first_linear_layer(model: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """Indices in ``model.parameters()`` of the first layer's weight and bias.

    The model's first parameters must belong to an ``nn.Linear`` with bias that
    reads the flattened input (e.g. the ``mlp`` victim).
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear) or first.bias is None:
        raise ValueError(
            "the analytic attack needs a victim whose first layer is fully connected with "
            "a bias (use --model mlp)"
        )
    if first.in_features != math.prod(in_shape):
        raise ValueError(
            f"the first linear layer reads {first.in_features} features, not the "
            f"{math.prod(in_shape)} input pixels; the analytic attack cannot apply"
        )
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    return ids[id(first.weight)], ids[id(first.bias)]


def invert_linear(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor, count: int, *, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a linear layer from its gradients.

    Args:
        weight_grad: (H, D) gradient (or update) of the weight.
        bias_grad: (H,) gradient (or update) of the bias.
        count: number of inputs N to return.
        tol: candidates closer than ``tol``·‖candidate‖ count as the same input.

    Returns:
        ``(inputs, spread)``: inputs (N, D) and, per input, the mean relative
        distance of its cluster's members to it (0 when the rows agree exactly;
        1-row clusters get NaN).
    """
    w, b = weight_grad.double(), bias_grad.double()
    scale = b.abs().max()
    if not scale > 0:
        raise ValueError("the first layer's bias gradient is zero: nothing to invert")
    if count == 1:
        x = (b[:, None] * w).sum(0) / b.square().sum()
        res = (w - b[:, None] * x).norm() / w.norm().clamp_min(1e-300)
        return x[None].float(), torch.tensor([float(res)])
    rows = b.abs() > 1e-6 * scale
    cand = w[rows] / b[rows, None]  # (M, D)
    norms = cand.norm(dim=1).clamp_min(1e-300)
    dist = torch.cdist(cand, cand)  # (M, M)
    close = dist <= tol * norms[:, None]
    chosen, spread = [], []
    free = torch.ones(len(cand), dtype=torch.bool)
    for _ in range(min(count, len(cand))):
        counts = (close & free[None, :]).sum(1).masked_fill(~free, -1)
        i = int(counts.argmax())
        members = close[i] & free
        chosen.append(cand[members].mean(0))
        m = int(members.sum())
        rel = float((dist[i, members] / norms[i]).sum() / (m - 1)) if m > 1 else math.nan
        spread.append(rel)
        free &= ~members
    while len(chosen) < count:  # fewer distinct rows than inputs
        chosen.append(chosen[-1] if chosen else torch.zeros(w.shape[1], dtype=w.dtype))
        spread.append(math.nan)
    return torch.stack(chosen).float(), torch.tensor(spread)


@dataclass(frozen=True)
class Analytic:
    """Closed-form inversion of a first linear layer with bias (``mlp`` victims).

    Args:
        label_strategy: label-recovery strategy of :mod:`leakage.labels`
            (default ``"auto"``); labels are not part of the closed form.
        tol: relative distance under which per-row candidates are one input.
    """

    label_strategy: str = "auto"
    tol: float = 1e-4

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """Images (N, C, H, W) read off the first layer's update; labels from the strategy."""
        if self.label_strategy == "joint":
            raise ValueError("the analytic attack reads labels with a strategy, not 'joint'")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        spec = obs.model_spec
        w_idx, b_idx = first_linear_layer(spec.build(), spec.in_shape)
        n = obs.protocol.num_samples
        weight, bias = (update_as_gradient(obs, i) for i in (w_idx, b_idx))
        x, spread = invert_linear(weight, bias, n, tol=self.tol)
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        finite = spread[torch.isfinite(spread)]
        loss = float(finite.mean()) if len(finite) else math.inf
        mean, std = spec.mean_std  # (C, 1, 1): the layer saw (x - mean) / std
        images = (x.double().view(n, *spec.in_shape) * std + mean).float()
        return Reconstruction(
            images=images.clamp(0, 1),
            labels=labels,
            loss=loss,
            restart_losses=[loss],
            stopped="closed-form",
        )


ATTACKS.register("analytic")(Analytic)
