"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Dummy images and soft dummy labels are optimised with L-BFGS so that the
gradient they produce matches the observed one in squared L2 distance
(the paper's eq. 4).

Where the lab departs from the paper's code, and why (measured with
``benchmarks/dlg_speed.py``):

* dummy images start uniform in the valid pixel range [0, 1] instead of
  N(0, 1): from the original start about a third of 32x32 RGB runs end in a
  flat region of the sigmoid network (PSNR ≈ 5 dB);
* L-BFGS (:class:`leakage.optim.LBFGS`, compact form) uses a strong-Wolfe line
  search that treats a non-finite loss as a step too long, so one bad
  curvature estimate cannot throw the iterate to a non-finite loss;
* L-BFGS sees the loss divided by ‖∇θ‖² and multiplied by
  :data:`OBJECTIVE_SCALE`, so its tolerances mean the same for every model and
  image (torch's L-BFGS, with its absolute yᵀs > 1e-10 test, silently degraded
  to gradient descent on the raw loss near convergence); the reported loss is
  the paper's, unscaled;
* a restart stops once the relative loss falls below ``tol`` (converged) or a
  step makes no progress (stalled); further restarts run only while no restart
  has converged, and the one with the lowest matching loss is kept;
* a non-finite loss ends the restart cleanly with the last finite iterate;
* small victims (< :data:`SMALL_MODEL` parameters, e.g. LeNet) are attacked in
  float64, where L-BFGS keeps converging past the float32 floor, and on the CPU
  with the oneDNN convolution path switched off, which is up to twice as fast
  for their tiny double-backward graphs; larger victims (ResNet-18: 172 ms per
  evaluation in float32 with oneDNN, 383 ms in float64) run in float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fl_core.types import Observation

from ..objectives import flat_gradient, observed_gradient, soft_cross_entropy, squared_distance
from ..optim import LBFGS
from .base import ATTACKS, Reconstruction

__all__ = ["DLG", "OBJECTIVE_SCALE", "SMALL_MODEL", "match_gradients"]

log = logging.getLogger(__name__)

OBJECTIVE_SCALE = 1e4
"""Value of the relative objective L-BFGS sees at ‖∇θ' − ∇θ‖² = ‖∇θ‖²."""

SMALL_MODEL = 1_000_000
"""Parameter count below which ``dtype="auto"`` means float64 and the native CPU path."""


@contextlib.contextmanager
def _native_cpu(device: torch.device, small: bool):
    """Switch oneDNN off on the CPU for small models (faster there); no-op otherwise."""
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def match_gradients(
    obs: Observation,
    *,
    labels: torch.Tensor | None,
    steps: int,
    restarts: int,
    max_iter: int = 20,
    lr: float = 1.0,
    init: str = "uniform",
    tol: float = 1e-8,
    dtype: str = "auto",
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Reconstruction:
    """L-BFGS gradient matching shared by DLG (``labels=None``: soft labels
    optimised jointly) and iDLG (``labels`` fixed).

    Args:
        obs: the observation to invert (batch size = ``obs.protocol.batch_size``).
        labels: (B,) known labels, or ``None`` to optimise dummy label logits.
        steps: L-BFGS steps per restart (each up to ``max_iter`` evaluations).
        restarts: random starts tried at most; stops early once one converges.
        max_iter, lr: L-BFGS settings.
        init: ``"uniform"`` (U[0, 1], the lab's default) or ``"randn"`` (N(0, 1),
            the paper's code).
        tol: a restart has converged when the matching loss, relative to
            ‖∇θ‖², falls below ``tol``.
        dtype: precision of the attack: ``"float64"``, ``"float32"`` or
            ``"auto"`` (float64 below :data:`SMALL_MODEL` parameters). In
            float32 L-BFGS stalled near a relative loss of 1e-7 on detailed
            images (the astronaut sample: 28.6 dB, measured with torch's
            L-BFGS); in float64 it goes on converging, at about the same cost
            per evaluation for LeNet-sized victims on the CPU.
        generator: source of the random starts (default: seed 0).
        device: where to run (default: CPU).

    Returns:
        The restart with the lowest final matching loss.
    """
    if steps < 1 or restarts < 1 or max_iter < 1:
        raise ValueError("steps, restarts and max_iter must be positive")
    if init not in ("uniform", "randn"):
        raise ValueError(f"init must be 'uniform' or 'randn'; got {init!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if dtype not in ("auto", "float32", "float64"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'float64'; got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = obs.model(device=device)
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    dt = getattr(torch, dtype) if dtype != "auto" else (torch.float64 if small else torch.float32)
    model = model.to(dt)
    proto = obs.protocol
    target = observed_gradient(
        obs.update.tensors, obs.update.kind, lr=proto.lr, steps=proto.local_steps
    ).to(device, dt)  # (d,)
    if labels is not None:
        labels = labels.to(device)
    problem = _Problem(model, target, labels)

    kept: Reconstruction | None = None
    losses: list[float] = []
    evaluations = total_steps = 0
    with (
        _native_cpu(device, small),
        tqdm(
            total=steps * restarts, disable=not progress, desc="gradient matching", leave=False
        ) as bar,
    ):
        for r in range(restarts):
            draw = torch.rand if init == "uniform" else torch.randn
            x0 = draw((proto.batch_size, *obs.model_spec.in_shape), generator=generator)
            y0 = torch.randn(proto.batch_size, obs.model_spec.num_classes, generator=generator)
            rec = problem.solve(x0.to(device, dt), y0.to(device, dt), steps, max_iter, lr, tol, bar)
            evaluations += rec.evaluations
            total_steps += rec.steps
            losses.append(rec.loss)
            log.debug(
                "restart %d: loss %.3g after %d steps (%s)", r, rec.loss, rec.steps, rec.stopped
            )
            if kept is None or rec.loss < kept.loss:
                kept = rec
            if kept.stopped == "converged":
                break
    assert kept is not None
    return Reconstruction(
        images=kept.images,
        labels=kept.labels,
        loss=kept.loss,
        history=kept.history,
        restart_losses=losses,
        steps=kept.steps,
        total_steps=total_steps,
        evaluations=evaluations,
        stopped=kept.stopped,
    )


class _Problem:
    """One gradient-matching problem: the model, the target and what is known."""

    def __init__(self, model, target, labels) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.target = target  # (d,)
        self.labels = labels  # (B,) or None
        self.norm2 = max(float(target.square().sum()), 1e-30)
        self.scale = OBJECTIVE_SCALE / self.norm2

    def solve(self, x0, y0, steps, max_iter, lr, tol, bar) -> Reconstruction:
        """One restart from images x0 (B, C, H, W) and label logits y0 (B, K)."""
        nx = x0.numel()
        learn_labels = self.labels is None
        z = torch.cat([x0.reshape(-1), y0.reshape(-1)]) if learn_labels else x0.reshape(-1).clone()

        def objective(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = z.detach().requires_grad_(True)
            x = z[:nx].view_as(x0)  # (B, C, H, W)
            targets = z[nx:].view_as(y0).softmax(-1) if learn_labels else self.labels
            dummy = flat_gradient(
                soft_cross_entropy(self.model(x), targets), self.params, create_graph=True
            )  # (d,)
            loss = squared_distance(dummy, self.target) * self.scale
            if not torch.isfinite(loss):
                return loss.detach(), torch.zeros_like(z)
            return loss.detach(), torch.autograd.grad(loss, z)[0]

        optimizer = LBFGS(objective, z, lr=lr)
        history: list[float] = []
        stopped = "steps"
        good = z.clone()
        for _ in range(steps):
            start = z.clone()
            loss = optimizer.step(max_iter) / self.scale  # the loss at `start`
            if not math.isfinite(loss):
                stopped = "non-finite"
                break
            history.append(loss)
            good = start
            bar.update(1)
            if loss <= tol * self.norm2:
                stopped = "converged"
                break
            if optimizer.stopped or (len(history) > 1 and history[-2] - loss <= 1e-12 * loss):
                stopped = "stalled"
                if optimizer.f is not None and optimizer.f / self.scale < loss:
                    history.append(optimizer.f / self.scale)
                    good = z.clone()
                break
        else:
            if optimizer.f is not None and math.isfinite(optimizer.f):
                history.append(optimizer.f / self.scale)  # the point the last step reached
                good = z.clone()
        if history and history[-1] <= tol * self.norm2:
            stopped = "converged"
        images = good[:nx].view_as(x0)
        labels = self.labels if not learn_labels else good[nx:].view_as(y0).argmax(-1)
        return Reconstruction(
            images=images.clamp(0, 1).float().cpu(),
            labels=labels.detach().cpu(),
            loss=history[-1] if history else math.inf,
            history=history,
            steps=len(history),
            evaluations=optimizer.evaluations,
            stopped=stopped,
        )


@dataclass(frozen=True)
class DLG:
    """Deep Leakage from Gradients (Zhu et al. 2019): images and soft labels jointly.

    Args:
        steps: L-BFGS steps per restart (the paper: 300, each up to 20 evaluations).
        restarts: random starts tried at most (kept: lowest matching loss).
        max_iter: evaluations per L-BFGS step.
        lr: L-BFGS step size.
        init: dummy image start, ``"uniform"`` or ``"randn"`` (paper).
        tol: relative matching loss that counts as converged.
        dtype: precision of the attack, see :func:`match_gradients`.
        device: where the attack runs.
    """

    steps: int = 300
    restarts: int = 4
    max_iter: int = 20
    lr: float = 1.0
    init: str = "uniform"
    tol: float = 1e-8
    dtype: str = "auto"
    device: str = "cpu"

    def labels(self, obs: Observation) -> torch.Tensor | None:
        """Known labels (B,) for the attack, or ``None``: DLG optimises soft labels."""
        return None

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
            labels=self.labels(obs),
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


ATTACKS.register("dlg")(DLG)
