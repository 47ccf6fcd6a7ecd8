"""Gradient-matching objectives: what an attacker minimises.

Everything here works on *flat* gradients (one vector per model), so the
attack loop does one subtraction and one reduction per step instead of a Python
loop over parameter tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "cosine_distance",
    "euclidean_distance",
    "flat_gradient",
    "last_linear",
    "observed_gradient",
    "soft_cross_entropy",
    "squared_distance",
    "total_variation",
]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_k p_k log softmax(logits)_k.

    Args:
        logits: (B, K).
        targets: (B, K) probabilities (soft labels) or (B,) class indices.
    """
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def flat_gradient(
    loss: torch.Tensor, params: Sequence[torch.Tensor], *, create_graph: bool = False
) -> torch.Tensor:
    """dloss/dθ for all ``params``, concatenated into one vector (d,)."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def squared_distance(dummy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DLG's objective (Zhu et al. 2019, eq. 4): ‖∇θ' − ∇θ‖² summed over all entries."""
    return (dummy - target).square().sum()


def euclidean_distance(dummy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½ ‖∇θ' − ∇θ‖² per restart: GradInversion's gradient-matching loss.

    Yin et al. (CVPR 2021, eq. 3) match gradients with the squared Euclidean
    distance (DLG's, Zhu et al. 2019); the ½ is breaching's convention, so that
    its ``scale`` (1e-4 for ``seethroughgradients``) carries over.

    Args:
        dummy: (R, d) one flat update per restart.
        target: (d,) the observed update.

    Returns:
        (R,).
    """
    return 0.5 * (dummy - target).square().sum(-1)


def cosine_distance(dummy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Inverting gradients' objective (Geiping et al. 2020, eq. 4): 1 − cos(∇θ', ∇θ).

    Numerically safe for any magnitude: each vector is first divided by its
    largest absolute entry (a detached factor, which the cosine does not
    depend on), so neither the norms nor their product can underflow or
    overflow, even for gradients of ~1e-21 in float32 (a saturated victim),
    and the cosine is clamped to [−1, 1] against rounding. A vector of zeros
    (a vanished dummy gradient) has cosine 0 with everything: distance 1,
    gradient 0.

    Args:
        dummy: (R, d) one flat update per restart.
        target: (d,) the observed update.

    Returns:
        (R,) one distance per restart, in [0, 2].
    """
    tiny = torch.finfo(dummy.dtype).tiny
    d = dummy / dummy.detach().abs().amax(-1, keepdim=True).clamp_min(tiny)  # (R, d), max |.| 1
    t = target / target.abs().amax().clamp_min(tiny)  # (d,)
    norms = torch.linalg.vector_norm(d, dim=-1) * torch.linalg.vector_norm(t)  # (R,), >= 1 or 0
    cos = torch.where(norms > 0, (d @ t) / norms.clamp_min(1.0), 0.0)  # zero: no gradient
    return 1 - cos.clamp(-1.0, 1.0)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean |horizontal| + mean |vertical| pixel difference.

    As in Geiping et al. (2020). Args: x (..., C, H, W) with any leading
    dimensions (R, N); the first leading dimension is kept, so a batch of
    restarts (R, N, C, H, W) gives (R,).
    """
    dx = (x[..., :, :, 1:] - x[..., :, :, :-1]).abs()
    dy = (x[..., :, 1:, :] - x[..., :, :-1, :]).abs()
    return dx.flatten(1).mean(-1) + dy.flatten(1).mean(-1)


def observed_gradient(update_tensors: Sequence[torch.Tensor], kind: str, *, lr: float, steps: int):
    """The gradient an update reveals, flat (d,).

    A FedSGD update is the gradient itself. A FedAvg delta after *one* plain SGD
    step equals −lr·gradient, so it reveals the gradient exactly; more local
    steps need an attack that simulates them.
    """
    flat = torch.cat([t.reshape(-1) for t in update_tensors])
    if kind == "gradient":
        return flat
    if steps == 1 and lr > 0:
        return flat / -lr
    raise ValueError(
        f"this attack matches one gradient; the update is a delta after {steps} local steps "
        "(use a FedSGD round or one local step)"
    )


def last_linear(model: nn.Module) -> tuple[int, int | None]:
    """Indices in ``model.parameters()`` of the last Linear layer's weight and bias.

    Label recovery reads this layer's gradient: its weight gradient is (K, F)
    with K the number of classes.
    """
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("the model has no Linear layer to read labels from")
    layer = linear[-1]
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    bias = ids[id(layer.bias)] if layer.bias is not None else None
    return ids[id(layer.weight)], bias
