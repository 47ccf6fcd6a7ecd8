"""Label-recovery metrics: per-position accuracy, count accuracy and set accuracy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["label_accuracy", "label_count_accuracy", "label_set_accuracy"]


def _as_label_list(labels: Tensor | np.ndarray | Iterable[Any], name: str) -> list[Any]:
    if isinstance(labels, (Tensor, np.ndarray)):
        return labels.reshape(-1).tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise ValueError(f"{name} must be a tensor or a sequence of labels; got {type(labels)!r}")
    return [item.item() if isinstance(item, (Tensor, np.generic)) else item for item in labels]


def label_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of true labels recovered, ignoring order.

    Label-inference attacks (e.g. iDLG, Zhao et al., 2020) recover the multiset of labels in
    a batch but not which image each belongs to, so this counts the multiset overlap:
    ``sum_c min(#c in predicted, #c in true) / len(true)``. For example predicted
    ``[1, 1, 2]`` against true ``[1, 2, 2]`` gives 2/3.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence, length ``P``.
        true: Ground-truth labels, a tensor of any shape or a sequence, length ``N >= 1``.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    pred_list = _as_label_list(predicted, "predicted")
    true_list = _as_label_list(true, "true")
    if not true_list:
        raise ValueError("true must contain at least one label")
    overlap = Counter(pred_list) & Counter(true_list)
    return sum(overlap.values()) / len(true_list)


def label_count_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of the batch's labels recovered with their counts: ``Σ_c min(n̂_c, n_c) / B``.

    The multiset overlap of :func:`label_accuracy`, under the name used next to
    :func:`label_set_accuracy`; it is iLRG's instance-level recall (Ma et al., ICLR
    2023, "IRec"). For example predicted ``[1, 1, 2]`` against true ``[1, 2, 2]``
    gives 2/3.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence.
        true: Ground-truth labels, a tensor of any shape or a sequence, ``B >= 1`` long.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    return label_accuracy(predicted, true)


def label_set_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of the distinct true classes that the recovered labels contain.

    Label existence, as in iLRG (Ma et al., ICLR 2023, "LeAcc"), counted over the
    classes present in the batch: ``|set(predicted) ∩ set(true)| / |set(true)|``.
    iLRG's LeAcc scores the existence decision of every one of the K classes, absent
    ones included; this one needs no K and ignores counts, so ``[1, 1, 2]`` against
    ``[1, 2, 2]`` gives 1.0 and ``[1, 1, 1]`` against ``[1, 2]`` gives 0.5. Recovered
    labels come ``B`` at a time, so extra classes cost through the missed ones.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence.
        true: Ground-truth labels, a tensor of any shape or a sequence, ``B >= 1`` long.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    pred_set = set(_as_label_list(predicted, "predicted"))
    true_set = set(_as_label_list(true, "true"))
    if not true_set:
        raise ValueError("true must contain at least one label")
    return len(pred_set & true_set) / len(true_set)
