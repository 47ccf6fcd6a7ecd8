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
* L-BFGS keeps 400 curvature pairs (600 with labels fixed) on one-image
  problems where torch's L-BFGS, which the paper's code uses, keeps 100: about
  half the evaluations (:data:`LONG_HISTORY`);
* L-BFGS sees the loss divided by ‖∇θ‖² and multiplied by
  :data:`OBJECTIVE_SCALE`, so its tolerances mean the same for every model and
  image (torch's L-BFGS, with its absolute yᵀs > 1e-10 test, silently degraded
  to gradient descent on the raw loss near convergence); the reported loss is
  the paper's, unscaled;
* restarts can run together as one batched problem (each keeps its own L-BFGS
  trajectory, see :func:`leakage.optim.step_together`) or one by one; a restart stops once
  its relative loss falls below ``tol`` (converged) or a step makes no progress
  (stalled); with ``early_stop`` all stop as soon as one has converged, and the
  one with the lowest matching loss is kept;
* a non-finite loss ends the restart cleanly with the last finite iterate;
* small victims (< :data:`SMALL_MODEL` parameters, e.g. LeNet) are attacked in
  float64, where L-BFGS keeps converging past the float32 floor, and on the CPU
  with the oneDNN convolution path switched off, which is up to twice as fast
  for their tiny double-backward graphs; larger victims (ResNet-18: 172 ms per
  evaluation in float32 with oneDNN, 383 ms in float64) run in float32;
* the matched update follows the observation's threat model
  (:mod:`leakage.simulate`): a FedSGD gradient, a FedAvg delta after simulated
  local steps, or the weighted mean of several clients' updates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fl_core.compiled import CompiledObjective
from fl_core.types import Observation

from ..optim import LBFGS, step_together
from .base import ATTACKS, Reconstruction
from .matching import (
    SMALL_MODEL,
    OptimisationAttack,
    Setup,
    random_starts,
    resolve_init,
    setup,
)

__all__ = [
    "DLG",
    "LONG_HISTORY",
    "LONG_HISTORY_UNKNOWNS",
    "OBJECTIVE_SCALE",
    "SHORT_HISTORY",
    "SMALL_MODEL",
    "match_gradients",
]

log = logging.getLogger(__name__)

OBJECTIVE_SCALE = 1e4
"""Value of the relative objective L-BFGS sees at ‖∇θ' − ∇θ‖² = ‖∇θ‖²."""

LONG_HISTORY = {"joint": 400, "fixed": 600}
"""``history=None``: curvature pairs L-BFGS keeps for problems of at most
:data:`LONG_HISTORY_UNKNOWNS` unknowns (one 32x32 RGB image and its label
logits), with labels learned jointly (DLG) or fixed (iDLG). Swept on
development images (``benchmarks/lbfgs_history.py``, CIFAR-10 training images,
sigmoid LeNet, batch 1, results in ``benchmarks/results/lbfgs_history/``):
against 100 pairs, DLG needed 1,044 evaluations instead of 2,313 at 400 pairs
and gained nothing at 600 or more; iDLG needed 680 instead of 1,704 at 600
pairs (648 at 800 or more, which keep its whole path; the longer history's
passes cost about what the 5% fewer evaluations save)."""

SHORT_HISTORY, LONG_HISTORY_UNKNOWNS = 100, 4096
"""Pairs kept above :data:`LONG_HISTORY_UNKNOWNS` unknowns: the earlier default.
Larger batches were not swept; each pass over the history costs m·n."""


def match_gradients(
    obs: Observation,
    *,
    labels: torch.Tensor | None,
    steps: int,
    restarts: int,
    max_iter: int = 20,
    lr: float = 1.0,
    history: int | None = None,
    history_dtype: str = "float32",
    init: str = "uniform",
    coordinates: str = "pixel",
    tol: float = 1e-8,
    dtype: str = "auto",
    batched: bool = False,
    early_stop: bool = True,
    support: str = "all",
    compile: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Reconstruction:
    """L-BFGS update matching shared by DLG (``labels=None``: soft labels
    optimised jointly) and iDLG (``labels`` fixed).

    Args:
        obs: the observation to invert; N = ``obs.protocol.num_samples`` images.
        labels: (N,) known labels, or ``None`` to optimise dummy label logits.
        steps: L-BFGS steps per restart (each up to ``max_iter`` evaluations).
        restarts: random starts.
        max_iter, lr: L-BFGS settings.
        history: curvature pairs L-BFGS keeps; ``None``: :data:`LONG_HISTORY`
            (400 with labels learned, 600 with labels fixed) for problems of at
            most :data:`LONG_HISTORY_UNKNOWNS` unknowns, :data:`SHORT_HISTORY` above.
        history_dtype: ``"float32"`` (default) or ``"float64"``: precision of
            the stored pairs, never above the attack's ``dtype`` (see
            :class:`~leakage.optim.LBFGS`). On 8 development images (CIFAR-10
            training images, sigmoid LeNet, batch 1,
            ``benchmarks/results/lbfgs_rows/summary.md``) float32 pairs under
            a float64 attack took the same evaluations as float64 ones (DLG
            1,111 against 1,116 on average, iDLG 722 against 728), every run
            succeeding either way with PSNRs within 0.9 dB of each other, in
            6% less time for DLG and 17% for iDLG (eager, one run): L-BFGS's
            passes over 400-600 pairs read half the memory.
        init: ``"uniform"`` (U[0, 1], the lab's default) or ``"randn"`` (N(0, 1),
            the paper's code).
        tol: a restart has converged when the matching loss, relative to
            ‖∇θ‖², falls below ``tol``.
        dtype: ``"float64"``, ``"float32"`` or ``"auto"`` (float64 below
            :data:`SMALL_MODEL` parameters). In float32 L-BFGS stalled near a
            relative loss of 1e-7 on detailed images (the astronaut sample:
            28.6 dB, measured with torch's L-BFGS); in float64 it goes on
            converging, at about the same cost per evaluation for LeNet-sized
            victims on the CPU.
        batched: run all restarts as one batched problem, or one after the
            other (default); each restart follows the same trajectory either
            way. With L-BFGS the first restart from a uniform start nearly
            always converges (DLG on LeNet: 12 of 12 runs, docs/benchmarks.md), so
            one-by-one with ``early_stop`` is cheaper on the CPU; batching pays
            off when many restarts must run anyway (``early_stop=False``, hard
            cases) and on a GPU.
        early_stop: stop every restart once one has converged (sequentially:
            do not start further restarts).
        support: ``"all"`` or ``"nonzero"``: match only the entries the observed
            update kept (against pruning; see :func:`~leakage.attacks.matching.setup`).
        compile: evaluate one restart's matching loss and its gradient through
            ``torch.compile`` (:class:`~fl_core.compiled.CompiledObjective`;
            batched restarts stay eager). Pays over many attacks in one process:
            the first compiles (DLG's first attack on the sigmoid LeNet took
            8.4 s with inductor's on-disk cache warm, longer cold), later ones
            on the same architecture, protocol and shapes reuse the graph, and
            skip dynamo's guards while it is the only graph of its function
            (``lean``, see :class:`~fl_core.compiled.CompiledObjective`). The
            objective then took 1.36 ms instead of 3.37 ms (one thread), and a
            whole attack 1.6x less time per success (5.1 s against 8.3 s), as
            L-BFGS's own work is not compiled
            (``benchmarks/results/hot_paths/summary.md``).
        generator: source of the random starts (default: seed 0).
        device: where to run (default: CPU).

    Returns:
        The restart with the lowest final matching loss.
    """
    if steps < 1 or restarts < 1 or max_iter < 1:
        raise ValueError("steps, restarts and max_iter must be positive")
    if history is not None and history < 1:
        raise ValueError(f"history must be a positive number of pairs or None; got {history}")
    if history_dtype not in ("float64", "float32"):
        raise ValueError(f"history_dtype must be 'float64' or 'float32'; got {history_dtype!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    st = setup(obs, dtype=dtype, device=device, lbfgs=True, support=support)
    x0, y0 = random_starts(
        obs, restarts, init=init, learn_labels=labels is None, generator=generator
    )
    if coordinates not in ("auto", "pixel", "normalized"):
        raise ValueError(
            f"coordinates must be 'auto', 'pixel' or 'normalized'; got {coordinates!r}"
        )
    if coordinates == "auto":
        coordinates = "normalized" if obs.model_spec.normalize else "pixel"
    spec = obs.model_spec if coordinates == "normalized" else None
    problem = _Problem(st, labels, spec, compiled=compile)
    if resolve_init(init, obs.model_spec) == "uniform":  # pixel draws, optimised coordinates
        x0 = problem.from_pixels(x0.to(st.dtype)).to(x0.dtype)
    if history is None:
        n = problem.nx + (0 if labels is not None else math.prod(problem.y_shape))
        long = LONG_HISTORY["joint" if labels is None else "fixed"]
        history = long if n <= LONG_HISTORY_UNKNOWNS else SHORT_HISTORY
    rows = torch.float32 if history_dtype == "float32" else st.dtype
    runs = [
        problem.run(x0[r], None if y0 is None else y0[r], lr, history, rows)
        for r in range(restarts)
    ]
    groups = [list(range(restarts))] if batched else [[r] for r in range(restarts)]
    with (
        tqdm(
            total=steps * restarts, disable=not progress, desc="gradient matching", leave=False
        ) as bar,
    ):
        for group in groups:
            with st.backend(len(group) * st.sim.num_samples):
                problem.solve([runs[r] for r in group], steps, max_iter, tol, early_stop, bar)
            if early_stop and any(r.stopped == "converged" for r in runs):
                break
    tried = [r for r in runs if r.history or r.stopped != "not-run"]
    kept = min(tried, key=lambda r: r.loss)
    for i, r in enumerate(tried):
        log.debug("restart %d: loss %.3g after %d steps (%s)", i, r.loss, r.steps, r.stopped)
    return Reconstruction(
        images=kept.images(),
        labels=kept.labels(),
        loss=kept.loss,
        history=kept.history,
        restart_losses=[r.loss for r in tried],
        steps=kept.steps,
        total_steps=sum(r.steps for r in tried),
        evaluations=sum(r.opt.evaluations for r in tried),
        stopped=kept.stopped,
    )


class _Run:
    """One restart: its L-BFGS state and what it has reached."""

    def __init__(
        self, problem: _Problem, z: torch.Tensor, lr: float, history: int, rows: torch.dtype
    ) -> None:
        self.problem = problem
        self.z = z
        self.opt = LBFGS(None, z, lr=lr, history=history, history_dtype=rows)
        self.history: list[float] = []
        self.good = z.clone()
        self.stopped = "not-run"
        self.active = True

    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def loss(self) -> float:
        return self.history[-1] if self.history else math.inf

    def images(self) -> torch.Tensor:
        p = self.problem
        return p.to_pixels(self.good[: p.nx].view(p.x_shape)).clamp(0, 1).float().cpu()

    def labels(self) -> torch.Tensor:
        p = self.problem
        if p.labels is not None:
            return p.labels.cpu()
        return self.good[p.nx :].view(p.y_shape).argmax(-1).cpu()

    def after_step(self, start_loss: float, start: torch.Tensor, tol: float) -> None:
        """Book-keeping after one L-BFGS step that began at ``start`` (loss ``start_loss``)."""
        p = self.problem
        self.stopped = "steps"
        loss = start_loss / p.scale
        if not math.isfinite(loss):
            self.stopped, self.active = "non-finite", False
            return
        self.history.append(loss)
        self.good = start
        if loss <= tol * p.norm2:
            self.stopped, self.active = "converged", False
            return
        end = self.opt.f
        if end is not None and end / p.scale <= tol * p.norm2:  # converged by the step's end:
            self.stopped, self.active = "steps", False  # keep that point, run no further step
            self.finish(tol)
            return
        if self.opt.stopped or (len(self.history) > 1 and self.history[-2] - loss <= 1e-12 * loss):
            self.stopped, self.active = "stalled", False
            self.finish(tol)

    def finish(self, tol: float) -> None:
        """Record the point the last step reached, if it is better than its start."""
        p = self.problem
        f = self.opt.f
        if f is not None and math.isfinite(f) and (not self.history or f / p.scale < self.loss):
            self.history.append(f / p.scale)
            self.good = self.z.clone()
        if self.history and self.history[-1] <= tol * p.norm2:
            self.stopped = "converged"


class _Problem:
    """Gradient matching for one observation: R restarts' objective, batched."""

    def __init__(
        self, st: Setup, labels: torch.Tensor | None, spec=None, *, compiled: bool = False
    ) -> None:
        self.st = st
        sim = st.sim
        if spec is None:
            self.mean = self.std = None
        else:
            mean, std = spec.mean_std  # (C, 1, 1)
            self.mean, self.std = mean.to(st.device, st.dtype), std.to(st.device, st.dtype)
        spec_shape = (sim.num_samples, *sim.model.spec.in_shape)
        k = sim.model.spec.num_classes
        self.x_shape, self.y_shape = spec_shape, (sim.num_samples, k)
        self.nx = math.prod(spec_shape)
        self.labels = None if labels is None else labels.to(st.device)
        self.fixed = (
            None
            if labels is None
            else torch.nn.functional.one_hot(self.labels, k).to(st.dtype)  # (N, K)
        )
        self.norm2 = max(float(sim.target.square().sum()), 1e-30)
        self.scale = OBJECTIVE_SCALE / self.norm2
        # DLG's graph (labels learnt) and iDLG's (labels fixed) through two functions,
        # so that each is the one graph of its function (lean calls need that)
        functional = self._functional if self.fixed is None else self._functional_fixed
        self._one = (
            CompiledObjective(functional, self._eager, "DLG", lean=True) if compiled else None
        )

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Optimised coordinates -> pixels."""
        return x if self.mean is None else x * self.std.to(x) + self.mean.to(x)

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean is None else (x - self.mean.to(x)) / self.std.to(x)

    def run(self, x0, y0, lr: float, history: int, rows: torch.dtype) -> _Run:
        """A restart from images ``x0`` and label logits ``y0`` (or ``None``)."""
        parts = [x0.reshape(-1)] if y0 is None else [x0.reshape(-1), y0.reshape(-1)]
        z = torch.cat(parts).to(self.st.device, self.st.dtype)
        return _Run(self, z, lr, history, rows)

    def _inputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dummy images (k, N, C, H, W) and soft labels (k, N, K) at k points (k, n)."""
        k = len(z)
        x = self.to_pixels(z[:, : self.nx].view(k, *self.x_shape))
        if self.fixed is None:
            return x, z[:, self.nx :].view(k, *self.y_shape).softmax(-1)
        return x, self.fixed.expand(k, *self.y_shape)

    def _functional(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled losses (k,) and their gradients (k, n), through :mod:`torch.func`
        only (for ``torch.compile``; the scale stays outside the graph, so a new
        observation's scale does not recompile it)."""
        sim = self.st.sim

        def total(zz):
            losses = (sim.functional(*self._inputs(zz)) - sim.target).square().sum(-1)
            return losses.sum(), losses

        grads, losses = torch.func.grad(total, has_aux=True)(z)
        return losses, grads

    def _functional_fixed(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_functional` with the labels fixed (iDLG), a function of its own."""
        return self._functional(z)

    def objective(self, z: torch.Tensor, which: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled matching losses (k,) and their gradients (k, n) at k trial points (k, n)."""
        one = self._one
        if one is not None and len(z) == 1:
            out = one(z)
            if one.fn is one.eager:  # compilation failed: the eager result
                return out
            losses, grads = out
            if bool(torch.isfinite(losses).all()):
                return losses * self.scale, grads * self.scale
        return self._eager(z)  # a non-finite loss: the eager path zeroes its gradient

    def _eager(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        losses = (self.st.sim(*self._inputs(z)) - self.st.sim.target).square().sum(-1) * self.scale
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return losses.detach(), torch.autograd.grad(losses.sum(), z)[0]
        if not bool(finite.any()):
            return losses.detach(), torch.zeros_like(z)
        grads = torch.autograd.grad(losses[finite].sum(), z)[0]
        return losses.detach(), torch.where(finite[:, None], grads, 0.0)

    def solve(self, runs: list[_Run], steps, max_iter, tol, early_stop, bar) -> None:
        """Run ``steps`` L-BFGS steps of ``runs`` together (each stops on its own)."""
        active = list(runs)
        for _ in range(steps):
            starts = [r.z.clone() for r in active]
            losses = step_together([r.opt for r in active], self.objective, max_iter)
            for r, loss, start in zip(active, losses, starts):
                r.after_step(loss, start, tol)
            bar.update(len(active))
            active = [r for r in active if r.active]
            if not active or (early_stop and any(r.stopped == "converged" for r in runs)):
                break
        for r in runs:
            if r.active and r.stopped == "steps":
                r.finish(tol)
                r.active = False


@dataclass(frozen=True)
class DLG(OptimisationAttack):
    """Deep Leakage from Gradients (Zhu et al. 2019): images and soft labels jointly.

    Args:
        steps: L-BFGS steps per restart (the paper: 300, each up to 20 evaluations).
        restarts: random starts, run as one batched problem (kept: lowest
            matching loss).
        max_iter: evaluations per L-BFGS step.
        lr: L-BFGS step size.
        history: curvature pairs L-BFGS keeps (``None``: by problem size, see
            :data:`LONG_HISTORY`).
        history_dtype: precision of the stored pairs, see :func:`match_gradients`.
        init: dummy image start, ``"uniform"`` or ``"randn"`` (paper).
        tol: relative matching loss that counts as converged.
        dtype: precision of the attack, see :func:`match_gradients`.
        label_strategy: ``"joint"`` (DLG: soft labels optimised with the
            images) or a label-recovery strategy of :mod:`leakage.labels`
            whose labels are then held fixed.
        batched: restarts batched, or run one after the other (default, see
            :func:`match_gradients`).
        early_stop: stop once one restart has converged.
        support: ``"all"`` or ``"nonzero"`` (match the kept entries only).
        compile: one restart's objective through ``torch.compile`` (pays over
            many attacks in one process, see :func:`match_gradients`).
        device: where the attack runs.
    """

    solver = staticmethod(match_gradients)

    steps: int = 300
    restarts: int = 4
    max_iter: int = 20
    lr: float = 1.0
    history: int | None = None
    history_dtype: str = "float32"
    init: str = "uniform"
    coordinates: str = "pixel"
    tol: float = 1e-8
    dtype: str = "auto"
    label_strategy: str = "joint"
    batched: bool = False
    early_stop: bool = True
    support: str = "all"
    compile: bool = False
    device: str = "cpu"


ATTACKS.register("dlg")(DLG)
