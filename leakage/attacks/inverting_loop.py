"""The inner loop of inverting gradients: the objective, signed Adam over batched restarts.

Restarts run as one batched problem and each follows the trajectory it would
follow alone; bookkeeping stays on the device (no host synchronisation per
iteration), and non-finite restarts are checked for every :data:`CHECK_EVERY`
iterations. :func:`leakage.attacks.inverting.invert_gradients` checks the
arguments and calls :func:`solve`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from fl_core.compiled import CompiledObjective
from fl_core.types import Observation

from ..objectives import cosine_distance, euclidean_distance
from .matching import Setup

__all__ = [
    "CHECK_EVERY",
    "COMPILE_STEPS",
    "MATCHING",
    "SCHEDULES",
    "VanishingGradientWarning",
    "solve",
]

MATCHING = {"cosine": cosine_distance, "euclidean": euclidean_distance}
"""Gradient-matching losses: (R, d) dummy updates, (d,) target -> (R,)."""


SCHEDULES = ("step", "cosine", "constant")


CHECK_EVERY = 100
"""Iterations between the loop's checks for restarts that all went non-finite."""


COMPILE_STEPS = 1000
"""Budget from which ``compile=None`` compiles the objective."""


class VanishingGradientWarning(RuntimeWarning):
    """The update the dummy data produce is exactly zero: the attack cannot move."""


class Space:
    """The optimised coordinates: z = (x − mean) / std per channel, and the box."""

    def __init__(self, obs: Observation, coordinates: str, st: Setup) -> None:
        mean, std = obs.model_spec.mean_std  # (C, 1, 1) each
        if coordinates == "pixel":
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        self.mean = mean.to(st.device, st.dtype)
        self.std = std.to(st.device, st.dtype)
        self.low = (0 - self.mean) / self.std  # (C, 1, 1)
        self.high = (1 - self.mean) / self.std

    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def project_(self, z: torch.Tensor) -> None:
        torch.maximum(z, self.low, out=z)
        torch.minimum(z, self.high, out=z)


@dataclass(frozen=True)
class Terms:
    """The objective of one restart: ``scale · matching(Δ(x'), Δ) + Σ w · prior(z) + bn · R_BN``.

    Attributes:
        matching: (R, d), (d,) -> (R,), a :data:`MATCHING` loss.
        scale: its factor.
        priors: (prior, weight) pairs; each prior maps the optimised images
            (R, N, C, H, W) to (R,); only non-zero weights are listed, so
            that an unused term costs nothing.
        bn: weight of the BatchNorm prior (0: the simulator is not asked for it).
    """

    matching: object
    scale: float
    priors: list
    bn: float

    def __call__(self, z, dummy, bn, target) -> torch.Tensor:
        value = self.matching(dummy, target)  # (R,)
        if self.scale != 1.0:
            value = self.scale * value
        for prior, weight in self.priors:
            value = value + weight * prior(z)  # (R,)
        if bn is not None:
            value = value + self.bn * bn  # (R,)
        return value


@dataclass
class RestartResult:
    """What one restart returns: its best images and labels, their loss, the loss history."""

    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    history: list[float]
    stopped: str


def _scheduler(opt: torch.optim.Optimizer, schedule: str, steps: int, warmup: int = 0):
    if warmup:  # linear from 0 over `warmup` iterations, then the schedule from its start
        milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        after = {
            "step": lambda t: 0.1 ** sum(t >= m for m in milestones),
            "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)),
            "constant": lambda t: 1.0,
        }[schedule]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: t / warmup if t < warmup else after(t - warmup)
        )
    if schedule == "step":
        milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return None


def _adam(variables: list[torch.Tensor], lr: float, device: torch.device):
    """Adam with the fastest implementation the device has (fused on CUDA, foreach on CPU).

    Not fused on the CPU: with torch 2.14 the fused CPU kernel stepped channels-last
    variables (the dummy images' default layout here) wrongly, up to 2.0 from the
    foreach result after 50 sign steps on a (2, 3, 8, 8) tensor, and IG on the
    ReLU LeNet fell from 16.8 to 8.0 dB; on contiguous tensors it was about 2x
    faster per step (81 against 166 µs for one 32x32 RGB image)."""
    if device.type == "cuda":
        return torch.optim.Adam(variables, lr=lr, fused=True)
    return torch.optim.Adam(variables, lr=lr, foreach=True)


def _objective(st: Setup, space: Space, fixed, terms: Terms, r: int, compiled: bool):
    """``step(z, y_logits) -> (objective (R,), gradients)``: the loss of R restarts and
    its gradient for the dummy variables (images, and label logits when learned)."""
    sim = st.sim
    bn = terms.bn > 0

    def targets(y: torch.Tensor | None) -> torch.Tensor:
        return fixed.expand(r, *fixed.shape) if y is None else y.softmax(-1)

    def objective(z, y_logits, out):
        dummy, prior = out if bn else (out, None)  # (R, d), (R,) or None
        return terms(z, dummy, prior, sim.target)  # (R,)

    def eager(z: torch.Tensor, y_logits: torch.Tensor | None):
        variables = [z] if y_logits is None else [z, y_logits]
        obj = objective(z, y_logits, sim(space.to_pixels(z), targets(y_logits), bn=bn))  # (R,)
        masked = torch.where(torch.isfinite(obj.detach()), obj, 0.0).sum()
        # gradients for the dummy data only (not for the victim's parameters)
        return obj.detach(), torch.autograd.grad(masked, variables)

    if not compiled:
        return eager

    def functional(z: torch.Tensor, y_logits: torch.Tensor | None):
        def f(zz, yy):
            obj = objective(zz, yy, sim.functional(space.to_pixels(zz), targets(yy), bn=bn))
            return torch.where(torch.isfinite(obj), obj, 0.0).sum(), obj

        argnums = 0 if y_logits is None else (0, 1)
        grads, obj = torch.func.grad(f, argnums=argnums, has_aux=True)(z, y_logits)
        return obj, (grads,) if y_logits is None else grads

    return CompiledObjective(functional, eager, "inverting gradients")


def solve(
    st: Setup,
    space: Space,
    z0,
    y0,
    fixed,
    *,
    steps,
    lr,
    terms,
    schedule,
    keep_best,
    signed,
    compile,
    channels_last,
    bar,
    langevin=0.0,
    noise=None,
    warmup=0,
) -> list[RestartResult]:
    """Run R restarts (z0: (R, N, C, H, W) in the optimised coordinates) for ``steps``."""
    sim = st.sim
    r = len(z0)
    z = z0.to(st.device, st.dtype).clone()
    if channels_last and z.dim() == 5:  # (R, N, C, H, W) stored as (R, N, H, W, C)
        z = z.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    space.project_(z)
    z.requires_grad_(True)
    variables = [z]
    y_logits = None
    if y0 is not None:
        y_logits = y0.to(st.device, st.dtype).requires_grad_(True)
        variables.append(y_logits)
    opt = _adam(variables, lr, st.device)
    sched = _scheduler(opt, schedule, steps, warmup)

    def targets(y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            return fixed.expand(r, *fixed.shape)
        return y.softmax(-1)

    history = torch.empty(steps, r, dtype=st.dtype, device=st.device)
    alive = torch.ones(r, dtype=torch.bool, device=st.device)
    best = torch.full((r,), math.inf, dtype=st.dtype, device=st.device)
    best_z = z.detach().clone()
    best_y = None if y_logits is None else y_logits.detach().clone()
    step = _objective(st, space, fixed, terms, r, compile)
    with torch.enable_grad():
        _warn_if_vanished(sim(space.to_pixels(z.detach()), targets(y_logits)).detach())
    keep_shape = (-1, *([1] * (z.dim() - 1)))
    done = 0
    for it in range(steps):
        value, grads = step(z, y_logits)  # (R,), one gradient per variable
        alive &= torch.isfinite(value)
        with torch.no_grad():
            if langevin:  # GradInversion's Langevin noise, scaled by the current step size
                scale = langevin * opt.param_groups[0]["lr"]
                g0 = grads[0]
                draw = torch.randn(g0.shape, generator=noise, device=g0.device, dtype=g0.dtype)
                grads = (g0 + scale * draw, *grads[1:])
            for v, g in zip(variables, grads):
                g = g.sign_() if signed else g
                shape = (-1, *([1] * (g.dim() - 1)))
                v.grad = torch.where(alive.view(shape), g, 0.0)  # a dead restart gets no step
            if keep_best:
                better = alive & (value < best)  # in place: no new buffers per iteration
                torch.where(better, value, best, out=best)
                torch.where(better.view(keep_shape), z.detach(), best_z, out=best_z)
                if best_y is not None:
                    torch.where(better[:, None, None], y_logits.detach(), best_y, out=best_y)
        history[it] = value
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            space.project_(z)
        bar.update(1)
        done = it + 1
        if done % CHECK_EVERY == 0 and not bool(alive.any()):
            break

    def evaluate(zz: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
        """Matching loss (R,) at given points (the simulator needs autograd on)."""
        with torch.enable_grad():
            return terms.matching(sim(space.to_pixels(zz), targets(yy)), sim.target).detach()

    def full(zz: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
        """The whole objective (R,) at given points."""
        with torch.enable_grad():
            out = sim(space.to_pixels(zz), targets(yy), bn=terms.bn > 0)
            dummy, prior = out if terms.bn > 0 else (out, None)
            return terms(zz, dummy, prior, sim.target).detach()

    final_z = best_z if keep_best else z.detach()
    final_y = best_y if keep_best else (None if y_logits is None else y_logits.detach())
    if keep_best:  # the last step's result was never evaluated: compare it too
        last = full(z.detach(), None if y_logits is None else y_logits.detach())
        better = alive & torch.isfinite(last) & (last < best)
        final_z = torch.where(better.view(-1, *([1] * (z.dim() - 1))), z.detach(), final_z)
        if final_y is not None:
            final_y = torch.where(better[:, None, None], y_logits.detach(), final_y)
    final = evaluate(final_z, final_y)  # (R,): the matching loss of the kept iterates ranks them
    images = space.to_pixels(final_z).clamp(0, 1)
    labels = fixed.argmax(-1).expand(r, -1) if final_y is None else final_y.argmax(-1)
    histories = history[:done].T.tolist()
    ok = (torch.isfinite(final) & (alive | torch.isfinite(best))).tolist()
    stopped_alive = alive.tolist()
    out = []
    for i in range(r):
        loss = float(final[i])
        out.append(
            RestartResult(
                images=images[i].detach().float().cpu(),
                labels=labels[i].detach().cpu(),
                loss=loss if ok[i] else math.inf,
                history=histories[i],
                stopped="steps" if stopped_alive[i] else "non-finite",
            )
        )
    return out


def _warn_if_vanished(dummy: torch.Tensor) -> None:
    """Warn once when some restart's simulated update is exactly zero (one host sync)."""
    zero = dummy.detach().abs().amax(-1) == 0  # (R,)
    if bool(zero.any()):
        warnings.warn(
            f"the update of {int(zero.sum())} of {len(zero)} dummy starts is exactly zero "
            "(a saturated victim: the loss underflows); the attack cannot move from there. "
            "Try precision float64 or another start",
            VanishingGradientWarning,
            stacklevel=3,
        )
