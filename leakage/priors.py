"""Image priors of GradInversion (Yin et al., "See Through Gradients: Image Batch
Recovery via GradInversion", CVPR 2021), as pure functions on tensors.

Each function maps dummy data with a leading restart dimension R to one value
per restart, (R,), so that an optimisation attack adds ``weight · term`` to its
per-restart objective:

* :func:`bn_statistics_distance`: DeepInversion's feature-distribution prior
  (Yin et al., "Dreaming to Distill", CVPR 2020), the first of GradInversion's
  fidelity terms: the batch mean and variance of the input of every BatchNorm
  layer should equal the running statistics the global model holds;
* :func:`group_consistency`: GradInversion's group-consistency term, the
  squared distance of each restart from the consensus of all restarts
  (the paper registers the restarts to each other before averaging them;
  here the plain pixel-wise mean is the consensus);
* :func:`l2_prior`: the image-norm prior (GradInversion's R_ℓ2), in the
  scaling of breaching's ``norm`` regulariser: ½ · mean(x²);
* the total variation lives in :mod:`leakage.objectives`
  (:func:`~leakage.objectives.total_variation`), as inverting gradients uses it.

The attack wires the BatchNorm term through the update simulator (it needs the
inputs of the BatchNorm layers in the dummy forward pass, see
:meth:`leakage.simulate.UpdateSimulator.track_batch_norm`); the others take the
dummy images (R, N, C, H, W) directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "batch_moments",
    "bn_statistics_distance",
    "group_consistency",
    "l2_prior",
]


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance, as a BatchNorm layer computes them.

    Args:
        x: (N, C, ...) the input of a BatchNorm layer (``BatchNorm1d`` (N, C) or
            (N, C, L), ``BatchNorm2d`` (N, C, H, W), ...).

    Returns:
        ``(mean, var)``, each (C,): over every dimension but the channel one,
        variance with 1/M (as BatchNorm normalises, and as DeepInversion matches it).
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)  # (C,)
    var = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().mean(dims)  # (C,)
    return mean, var


def bn_statistics_distance(
    moments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    running: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """DeepInversion's BatchNorm prior: Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂).

    Yin et al. (CVPR 2020, eq. 4), the R_BN fidelity term of GradInversion
    (Yin et al., CVPR 2021, eq. 5): μ_l and σ²_l are the batch mean and
    variance of the dummy batch at the input of BatchNorm layer l, μ̂_l and
    σ̂²_l the running statistics the server's model holds. The norms are plain
    Euclidean norms (not squared), as in both papers' code.

    Args:
        moments: per layer, the dummy batch's ``(mean, var)``, each (..., C_l)
            (any leading dimensions, e.g. (R, C_l) for R restarts).
        running: per layer, the running ``(mean, var)``, each (C_l,).
        weights: per layer, a factor (default 1 for all; DeepInversion's code
            and breaching weight the first layer 10).

    Returns:
        (...,) the distance, 0 exactly when every layer's statistics equal the
        running ones.
    """
    if len(moments) != len(running):
        raise ValueError(f"{len(moments)} layers of statistics for {len(running)} running ones")
    if not moments:
        raise ValueError("no BatchNorm statistics: the victim has no BatchNorm layer")
    weights = [1.0] * len(moments) if weights is None else list(weights)
    total = None
    for w, (mean, var), (r_mean, r_var) in zip(weights, moments, running):
        term = torch.linalg.vector_norm(mean - r_mean, dim=-1) + torch.linalg.vector_norm(
            var - r_var, dim=-1
        )  # (...,)
        total = w * term if total is None else total + w * term
    return total


def group_consistency(x: torch.Tensor) -> torch.Tensor:
    """GradInversion's group-consistency term: mean over pixels of (x_r − x̄)², per restart.

    Yin et al. (CVPR 2021, eq. 7): R_group = ‖x̂_r − E(x̂)‖₂ with E the
    consensus of the restarts. The paper registers the restarts to each other
    (pixel-wise alignment) before averaging them and uses a squared distance
    per pixel in its ablation; this is the plain consensus, x̄ = mean over
    restarts, without registration. Its gradient for restart r is 2(x_r − x̄)
    / M (the consensus depends on x_r too, but Σ_s (x_s − x̄) = 0 cancels it),
    so detaching x̄ would change nothing.

    Args:
        x: (R, N, C, H, W) R restarts of the dummy batch.

    Returns:
        (R,): 0 for identical restarts (and for R = 1).
    """
    return (x - x.mean(0, keepdim=True)).square().flatten(1).mean(-1)


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Image-norm prior: ½ · mean(x²) over each restart's images.

    GradInversion's R_ℓ2 (Yin et al., CVPR 2021, eq. 4), in the scaling of
    breaching's ``norm`` regulariser (p = 2: ½ · mean of x^p) so that its
    weights carry over.

    Args:
        x: (R, N, C, H, W), in the coordinates the attack optimises.

    Returns:
        (R,).
    """
    return 0.5 * x.square().flatten(1).mean(-1)
