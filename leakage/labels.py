"""Label recovery from the last layer's gradient: plain functions on tensors."""

from __future__ import annotations

import torch

__all__ = ["idlg_label", "per_class_minimum_labels"]


def idlg_label(weight_grad: torch.Tensor) -> int:
    """The label of a single sample (iDLG; Zhao, Mopuri, Bilen 2020, sec. 3.2).

    With cross-entropy and non-negative features entering the last layer, the
    weight-gradient row of the true class is ≤ 0 and every other row ≥ 0, so the
    true class is the row with the smallest sum.

    Args:
        weight_grad: (K, F) gradient of the last linear layer's weight.
    """
    if weight_grad.ndim != 2:
        raise ValueError(f"weight_grad must be (classes, features); got {tuple(weight_grad.shape)}")
    return int(weight_grad.sum(dim=1).argmin())


def per_class_minimum_labels(weight_grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` distinct labels: the classes whose gradient rows reach the lowest minimum.

    GradInversion's rule (Yin et al., CVPR 2021, sec. 3.2): a present class has a
    strongly negative entry in its weight-gradient row. Assumes distinct labels
    in the batch; for batch size 1 it agrees with :func:`idlg_label` in the
    usual case.

    Args:
        weight_grad: (K, F) gradient of the last linear layer's weight.
        batch_size: number of labels to return (≤ K).

    Returns:
        (batch_size,) int64 labels, sorted.
    """
    k = weight_grad.shape[0]
    if not 1 <= batch_size <= k:
        raise ValueError(f"batch_size must be in [1, {k}] for {k} classes; got {batch_size}")
    if batch_size == 1:
        return torch.tensor([idlg_label(weight_grad)])
    return weight_grad.min(dim=1).values.argsort()[:batch_size].sort().values
