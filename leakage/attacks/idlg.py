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
from .base import ATTACKS, Reconstruction
from .dlg import match_gradients

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
class IDLG:
    """iDLG: analytic labels, then L-BFGS on the images only.

    Args: as for :class:`~leakage.attacks.dlg.DLG`.
    """

    steps: int = 300
    restarts: int = 4
    max_iter: int = 20
    lr: float = 1.0
    init: str = "uniform"
    tol: float = 1e-8
    dtype: str = "float64"
    device: str = "cpu"

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """Invert ``obs``'s gradient; returns images (B, C, H, W) and labels (B,)."""
        return match_gradients(
            obs,
            labels=recover_labels(obs),
            steps=self.steps,
            restarts=self.restarts,
            max_iter=self.max_iter,
            lr=self.lr,
            init=self.init,
            tol=self.tol,
            dtype=self.dtype,
            device=self.device,
            generator=generator,
            progress=progress,
        )


ATTACKS.register("idlg")(IDLG)
