"""iDLG's label rule: the class whose weight-gradient row sums lowest (batch size 1).

Reference:
    B. Zhao, K. R. Mopuri, H. Bilen, "iDLG: Improved Deep Leakage from Gradients",
    arXiv:2001.02610, 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LABEL_STRATEGIES, LastLayer, _check_num_labels

__all__ = ["idlg", "idlg_label"]


def idlg_label(weight_grad: Tensor) -> int:
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


@LABEL_STRATEGIES.register("idlg")
def idlg(
    layer: LastLayer,
    num_labels: int,
    *,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """iDLG (Zhao, Mopuri, Bilen 2020): the class whose weight-gradient row sums lowest.

    Exact at batch size 1 when the features entering the last layer are non-negative;
    see :func:`idlg_label`. ``model`` and ``generator`` are unused.

    Args:
        layer: the last layer, weight_grad (K, F).
        num_labels: must be 1.

    Returns:
        (1,) int64.

    Raises:
        ValueError: For ``num_labels`` > 1.
    """
    _check_num_labels(layer, num_labels)
    if num_labels != 1:
        raise ValueError(
            f"idlg reads one label (batch size 1), not {num_labels}; "
            "for batches use yin, llg, rlg, ilrg or auto"
        )
    return torch.tensor([idlg_label(layer.weight_grad)], dtype=torch.int64)
