"""The ``auto`` strategy: iDLG at batch size 1, iLRG for batches, LLG without a bias."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LABEL_STRATEGIES, LastLayer, _check_num_labels
from .idlg import idlg
from .ilrg import ilrg
from .llg import llg

__all__: list[str] = []


@LABEL_STRATEGIES.register("auto")
def _auto(
    layer: LastLayer,
    num_labels: int,
    *,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`idlg` at batch size 1, :func:`ilrg` for batches (:func:`llg` without a bias)."""
    _check_num_labels(layer, num_labels)
    if num_labels == 1:
        return idlg(layer, 1)
    if layer.bias_grad is None:
        return llg(layer, num_labels, model=model, generator=generator)
    return ilrg(layer, num_labels)
