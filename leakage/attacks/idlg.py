"""Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen 2020).

The label is read analytically from the last layer's gradient (exact at batch
size 1 when the features entering that layer are non-negative), then only the
images are optimised, with the same L-BFGS gradient matching as DLG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_core.types import Observation

from ..labels import per_class_minimum_labels
from ..objectives import last_linear, observed_gradient
from .base import ATTACKS
from .dlg import DLG

__all__ = ["IDLG", "recover_labels"]


def recover_labels(obs: Observation) -> torch.Tensor:
    """Labels revealed by the last linear layer's gradient, (B,) int64.

    Batch size 1: iDLG's rule. Larger batches: the per-class minimum of
    GradInversion (Yin et al. 2021), which assumes distinct labels.
    """
    model = obs.model()
    w_idx, _ = last_linear(model)
    proto = obs.protocol
    flat = observed_gradient(
        obs.update.tensors, obs.update.kind, lr=proto.lr, steps=proto.local_steps
    )
    sizes = [p.numel() for p in model.parameters()]
    weight_grad = torch.split(flat, sizes)[w_idx].view_as(list(model.parameters())[w_idx])
    return per_class_minimum_labels(weight_grad, proto.batch_size)


@dataclass(frozen=True)
class IDLG(DLG):
    """iDLG: the label read off the last layer's gradient, then L-BFGS on the images only.

    Same parameters as :class:`~leakage.attacks.dlg.DLG`.
    """

    def labels(self, obs: Observation) -> torch.Tensor:
        """Labels revealed by the gradient, see :func:`recover_labels`."""
        return recover_labels(obs)


ATTACKS.register("idlg")(IDLG)
