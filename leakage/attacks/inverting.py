"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

The dummy images minimise

    1 − cos(Δ(x'), Δ)  +  α_TV · TV(x')

where Δ is the observed update, Δ(x') the update the dummy data would produce
under the observation's threat model (:mod:`leakage.simulate`; the paper's
"federated averaging" experiments simulate the local steps the same way), the
cosine is taken over all layers at once, and TV is the anisotropic total
variation (mean absolute difference of neighbouring pixels). The optimiser is
Adam (lr 0.1) on the *sign* of the gradient, the step size falls ×0.1 at 3/8,
5/8 and 7/8 of the iterations, and after every step the images are clipped to
the valid pixel range. Restarts are ranked by their final cosine loss.

Where the lab departs from the paper's code, and why:

* images live in the pixel range [0, 1] (the victims take unnormalised
  images); the paper's code works in normalised coordinates and clips to the
  same range there, so its TV weight corresponds to ≈4x ours for CIFAR
  statistics (std ≈ 0.25);
* the default TV weight is 1e-4, the paper's "ours" CIFAR setting; at budgets
  of about a thousand iterations heavier TV (1e-2, or breaching's 0.2) gives
  blocky images (see ``REFERENCES.md``, "Inverting gradients");
* dummy images start uniform in [0, 1] like the lab's DLG (the paper draws
  N(0, 1) in normalised coordinates, i.e. mostly inside the same range);
* labels come from any label strategy of :mod:`leakage.labels` (the paper
  assumes them known or recovered with iDLG's rule), or ``"joint"``;
* restarts run as one batched problem; Adam is element-wise and every
  restart's loss depends on its own images only, so each restart follows
  exactly the trajectory it would follow alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import trange

from fl_core.types import Observation

from ..objectives import cosine_distance, total_variation
from .base import ATTACKS, Reconstruction
from .matching import OptimisationAttack, Setup, random_starts, setup

__all__ = ["InvertingGradients", "invert_gradients"]


def invert_gradients(
    obs: Observation,
    *,
    labels: torch.Tensor | None,
    steps: int = 4800,
    restarts: int = 1,
    lr: float = 0.1,
    tv: float = 1e-4,
    init: str = "uniform",
    signed: bool = True,
    dtype: str = "auto",
    batched: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Reconstruction:
    """Cosine update matching with a TV prior, Adam on signed gradients.

    Args:
        obs: the observation to invert; N = ``obs.protocol.num_samples`` images.
        labels: (N,) labels held fixed, or ``None`` to optimise soft labels too.
        steps: Adam iterations per restart (the paper: 4,800; 24,000 for its
            best CIFAR results).
        restarts: random starts, batched; kept: lowest final cosine loss.
        lr: Adam's initial step size (paper: 0.1).
        tv: weight of the total-variation prior.
        init: ``"uniform"`` or ``"randn"``, see :func:`~leakage.attacks.matching.random_starts`.
        signed: step on the sign of the gradient (paper: yes).
        dtype: ``"auto"`` (float32), ``"float32"`` or ``"float64"``.
        batched: all restarts in one batched problem (default) or one by one.
        generator: source of the random starts (default: seed 0).
        device: where to run (default: CPU).

    Returns:
        The restart with the lowest final cosine loss; ``history`` holds its
        objective (cosine + TV) after every iteration.
    """
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be positive")
    if lr <= 0 or tv < 0:
        raise ValueError("lr must be positive and tv non-negative")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    st = setup(obs, dtype=dtype, device=device, lbfgs=False)
    x0, y0 = random_starts(
        obs, restarts, init=init, learn_labels=labels is None, generator=generator
    )
    fixed = None
    if labels is not None:
        k = obs.model_spec.num_classes
        fixed = torch.nn.functional.one_hot(labels.to(st.device), k).to(st.dtype)
    groups = [list(range(restarts))] if batched else [[r] for r in range(restarts)]
    results: list[_Result] = []
    with trange(
        steps * len(groups), disable=not progress, desc="inverting gradients", leave=False
    ) as bar:
        for group in groups:
            with st.backend(len(group) * st.sim.num_samples):
                results += _solve(
                    st,
                    x0[group],
                    None if y0 is None else y0[group],
                    fixed,
                    steps=steps,
                    lr=lr,
                    tv=tv,
                    signed=signed,
                    bar=bar,
                )
    kept = min(results, key=lambda r: r.loss)
    return Reconstruction(
        images=kept.images,
        labels=kept.labels,
        loss=kept.loss,
        history=kept.history,
        restart_losses=[r.loss for r in results],
        steps=len(kept.history),
        total_steps=sum(len(r.history) for r in results),
        evaluations=sum(len(r.history) + 1 for r in results),
        stopped=kept.stopped,
    )


@dataclass
class _Result:
    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    history: list[float]
    stopped: str


def _solve(st: Setup, x0, y0, fixed, *, steps, lr, tv, signed, bar) -> list[_Result]:
    """Run R restarts (x0: (R, N, C, H, W)) together for ``steps`` iterations."""
    sim = st.sim
    r = len(x0)
    x = x0.to(st.device, st.dtype).requires_grad_(True)
    variables = [x]
    if y0 is not None:
        y_logits = y0.to(st.device, st.dtype).requires_grad_(True)
        variables.append(y_logits)
    opt = torch.optim.Adam(variables, lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def targets() -> torch.Tensor:
        if y0 is None:
            return fixed.expand(r, *fixed.shape)
        return y_logits.softmax(-1)

    histories: list[list[float]] = [[] for _ in range(r)]
    alive = torch.ones(r, dtype=torch.bool, device=st.device)
    all_alive = True
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        matching = cosine_distance(sim(x, targets()), sim.target)  # (R,)
        objective = matching + tv * total_variation(x) if tv else matching
        values = objective.tolist()  # the one host sync per iteration
        if not all(map(math.isfinite, values)):
            alive &= torch.isfinite(objective)
            all_alive = False
            if not bool(alive.any()):
                break
        if all_alive:
            objective.sum().backward()
        else:
            objective[alive].sum().backward()
            with torch.no_grad():
                for v in variables:
                    v.grad[~alive] = 0.0  # a non-finite restart stays where it was
        if signed:
            with torch.no_grad():
                for v in variables:
                    v.grad.sign_()
        opt.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        for h, v in zip(histories, values):
            h.append(v)
        bar.update(1)
    final = cosine_distance(sim(x.detach(), targets().detach()), sim.target).detach()  # (R,)
    labels = fixed.argmax(-1).expand(r, -1) if y0 is None else y_logits.argmax(-1)
    out = []
    for i in range(r):
        loss = float(final[i])
        ok = bool(alive[i]) and math.isfinite(loss)
        out.append(
            _Result(
                images=x[i].detach().clamp(0, 1).float().cpu(),
                labels=labels[i].detach().cpu(),
                loss=loss if ok else math.inf,
                history=histories[i],
                stopped="steps" if ok else "non-finite",
            )
        )
    return out


@dataclass(frozen=True)
class InvertingGradients(OptimisationAttack):
    """Inverting gradients (Geiping et al. 2020): cosine matching, TV prior, signed Adam.

    Args:
        steps: Adam iterations (paper: 4,800; its best CIFAR setting 24,000).
        restarts: random starts, batched (kept: lowest final cosine loss).
        lr: Adam's step size (0.1).
        tv: total-variation weight (1e-4).
        init: ``"uniform"`` or ``"randn"``.
        signed: Adam on the gradient's sign.
        dtype: ``"auto"`` (float32), ``"float32"`` or ``"float64"``.
        label_strategy: a strategy of :mod:`leakage.labels` (default
            ``"auto"``) or ``"joint"`` (soft labels optimised too).
        batched: restarts batched (default) or run one by one.
        device: where the attack runs.
    """

    solver = staticmethod(invert_gradients)

    steps: int = 4800
    restarts: int = 1
    lr: float = 0.1
    tv: float = 1e-4
    init: str = "uniform"
    signed: bool = True
    dtype: str = "auto"
    label_strategy: str = "auto"
    batched: bool = True
    device: str = "cpu"


ATTACKS.register("ig")(InvertingGradients)
