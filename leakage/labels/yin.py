"""GradInversion's label rule: distinct labels from the per-class minimum of the gradient.

Reference:
    H. Yin, A. Mallya, A. Vahdat, J. M. Alvarez, J. Kautz, P. Molchanov, "See through
    Gradients: Image Batch Recovery via GradInversion", CVPR 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LABEL_STRATEGIES, LastLayer, _check_num_labels
from .idlg import idlg_label

__all__ = ["per_class_minimum_labels", "yin"]


def per_class_minimum_labels(weight_grad: Tensor, batch_size: int) -> Tensor:
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


@LABEL_STRATEGIES.register("yin")
def yin(
    layer: LastLayer,
    num_labels: int,
    *,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """GradInversion's label rule (Yin et al., CVPR 2021, sec. 3.2): distinct labels.

    Takes the ``num_labels`` classes whose weight-gradient rows have the lowest
    minimum entry. It assumes the batch holds distinct labels (as in the paper's
    ImageNet batches), so it never repeats a label: a repeated label costs one
    correct count and adds one wrong class. ``model`` and ``generator`` are unused.

    Args:
        layer: the last layer, weight_grad (K, F).
        num_labels: labels to return, at most K.

    Returns:
        (num_labels,) int64, sorted, distinct.

    Raises:
        ValueError: If ``num_labels`` exceeds the number of classes.
    """
    _check_num_labels(layer, num_labels)
    k = layer.num_classes
    if num_labels > k:
        raise ValueError(
            f"yin returns distinct labels: {num_labels} labels do not fit {k} classes; "
            "use llg or ilrg, which count repeats"
        )
    return per_class_minimum_labels(layer.weight_grad, num_labels).to(torch.int64)
