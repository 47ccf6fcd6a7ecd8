"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

The dummy images minimise

    1 − cos(Δ(x'), Δ)  +  α_TV · TV(z')

where Δ is the observed update, Δ(x') the update the dummy data would produce
under the observation's threat model (:mod:`leakage.simulate`; the paper's
"federated averaging" experiments simulate the local steps the same way), the
cosine is taken over all layers at once, and TV is the anisotropic total
variation (mean absolute difference of neighbouring pixels) of the images in
the coordinates the attack optimises. The optimiser is Adam on the *sign* of
the gradient, the step size falls ×0.1 at 3/8, 5/8 and 7/8 of the iterations,
and after every step the images are projected onto the valid pixel range (the
box constraint). Restarts are ranked by their matching loss.

Coordinates. A victim carries its input normalisation (``ModelSpec.normalize``,
the dataset's mean and std); with ``coordinates="normalized"`` the attack
optimises z = (x − mean) / std, the coordinates the network sees, as the
paper's code and breaching do: the step size and the TV weight are in those
units, and the box is [(0 − mean)/std, (1 − mean)/std]. With
``coordinates="pixel"`` it optimises x ∈ [0, 1] directly. Which one is the
default depends on the victim (:data:`TUNED`). Reconstructions are always
returned, and scored, in pixel space.

Where the lab departs from the paper's code, and why:

* defaults (coordinates, start, TV weight, step size, schedule, keep-best)
  are per victim family (:data:`TUNED`), chosen by the staged sweep in
  ``benchmarks/tuning.py`` on *training* images (CIFAR-10; Fashion-MNIST for
  grayscale LeNets) and reported on test images
  (``benchmarks/results/tuning/ig/``); one setting did not fit all: the
  ResNets in train-mode BatchNorm want small steps in normalised
  coordinates, in eval mode large steps in pixels, the sigmoid CNN no TV,
  raw-pixel LeNets small steps in pixels, and grayscale LeNets (dark
  backgrounds) little or no TV;
* ``keep_best``: each restart returns the iterate with the lowest objective
  seen, not the last one (breaching does the same; its check pairs the
  objective of one iterate with the next iterate, the lab's with the iterate
  it was evaluated at);
* labels come from any label strategy of :mod:`leakage.labels` (the paper
  assumes them known or recovered with iDLG's rule), or ``"joint"``;
* restarts run as one batched problem; Adam is element-wise and every
  restart's loss depends on its own images only, so each restart follows
  exactly the trajectory it would follow alone;
* the loop keeps its bookkeeping on the device (no host synchronisation per
  iteration, which matters on a GPU) and checks for non-finite restarts every
  :data:`CHECK_EVERY` iterations; a non-finite restart is frozen and keeps its
  best finite iterate.

Optional terms (all off by default; off, they cost nothing): GradInversion's
priors (Yin et al., CVPR 2021; :mod:`leakage.priors`) — BatchNorm-statistics
matching (``bn_prior``), group consistency over restarts (``group``), an image
ℓ2 norm (``l2``) — and its optimiser: the Euclidean matching loss
(``matching="euclidean"``, ``matching_scale``), Langevin noise on the gradient
(``langevin``), unsigned Adam (``signed=False``) and a linear warm-up
(``warmup``). :mod:`leakage.attacks.gradinversion` runs them as one attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import trange

from fl_core.types import Observation

from ..objectives import total_variation
from ..priors import group_consistency, l2_prior
from .base import ATTACKS, Reconstruction
from .inverting_defaults import FALLBACK, RAW, TUNED, tuned_options
from .inverting_loop import (
    CHECK_EVERY,
    COMPILE_STEPS,
    MATCHING,
    SCHEDULES,
    RestartResult,
    Space,
    Terms,
    VanishingGradientWarning,
    solve,
)
from .matching import OptimisationAttack, random_starts, resolve_init, setup

__all__ = [
    "CHECK_EVERY",
    "COORDINATES",
    "FALLBACK",
    "InvertingGradients",
    "MATCHING",
    "RAW",
    "SCHEDULES",
    "TUNED",
    "VanishingGradientWarning",
    "invert_gradients",
    "tuned_options",
]

COORDINATES = ("normalized", "pixel")


def invert_gradients(
    obs: Observation,
    *,
    labels: torch.Tensor | None,
    steps: int = 4800,
    restarts: int = 1,
    lr: float | None = None,
    tv: float | None = None,
    init: str | None = None,
    coordinates: str | None = None,
    schedule: str | None = None,
    keep_best: bool | None = None,
    signed: bool = True,
    dtype: str = "auto",
    batched: bool = True,
    compile: bool | None = None,
    channels_last: bool = True,
    matching: str = "cosine",
    matching_scale: float = 1.0,
    bn_prior: float = 0.0,
    bn_first: float = 10.0,
    group: float = 0.0,
    l2: float = 0.0,
    langevin: float = 0.0,
    warmup: int = 0,
    support: str = "all",
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
        restarts: random starts, batched; kept: lowest matching loss.
        lr: Adam's initial step size, in units of the optimised coordinates
            (paper: 0.1 in normalised coordinates).
        tv: weight of the total-variation prior, on the optimised coordinates.

            ``lr``, ``tv``, ``init``, ``coordinates``, ``schedule`` and
            ``keep_best`` left at ``None`` take the tuned default for the
            victim (:func:`tuned_options`); the values used are in the
            result's ``options``.
        init: ``"randn"`` (N(0, 1) in the optimised coordinates, the paper's),
            ``"uniform"`` (U[0, 1] in pixel space) or ``"auto"`` (``randn`` for a
            victim that normalises its input, ``uniform`` for one that does not,
            see :func:`~leakage.attacks.matching.resolve_init`).
        coordinates: ``"normalized"`` (z = (x − mean)/std with the victim's
            input normalisation; the same as pixels for a victim without one)
            or ``"pixel"``.
        schedule: ``"step"`` (×0.1 at 3/8, 5/8, 7/8 of ``steps``, the paper's),
            ``"cosine"`` (cosine annealing to 0) or ``"constant"``.
        keep_best: return each restart's iterate of lowest objective instead
            of its last.
        signed: step on the sign of the gradient (paper: yes).
        dtype: ``"auto"`` (float32), ``"float32"`` or ``"float64"``.
        batched: all restarts in one batched problem (default) or one by one.
        compile: evaluate the objective and its gradient through
            ``torch.compile`` (the whole double backward as one graph). The
            first call in a process compiles: 5-10 s with inductor's on-disk
            cache warm, about a minute for a ResNet the first time on a 2-core
            CPU; later attacks on the same architecture and shapes in the
            process reuse the graph. ``None`` (auto): compile from
            :data:`COMPILE_STEPS` iterations on (per iteration on 2 CPU cores,
            batch 1: ResNet-20 ~2x faster than eager, LeNet 2.2 -> 1.2 ms).
            Falls back to eager with a warning where compilation fails.
        channels_last: keep the dummy images and 4-D weights in channels-last
            memory on the CPU (faster convolutions; same values).
        matching: the gradient distance, ``"cosine"`` (the paper's) or
            ``"euclidean"`` (½‖Δ(x') − Δ‖², GradInversion's and DLG's).
        matching_scale: factor on the matching loss (GradInversion's recipe in
            breaching: 1e-4 on the Euclidean distance).
        bn_prior: weight of DeepInversion's BatchNorm-statistics prior
            (:func:`~leakage.priors.bn_statistics_distance`, summed over the
            victim's BatchNorm layers against the running statistics in the
            observation's buffers); needs a victim with BatchNorm.
        bn_first: factor of the first BatchNorm layer in that prior
            (DeepInversion's code and breaching: 10).
        group: weight of GradInversion's group consistency
            (:func:`~leakage.priors.group_consistency`, the restarts' distance
            from their mean, in the optimised coordinates); needs ``restarts``
            >= 2, batched.
        l2: weight of the image-norm prior (:func:`~leakage.priors.l2_prior`,
            in the optimised coordinates).
        langevin: Langevin noise: ``langevin · lr_t · N(0, 1)`` added to the
            images' gradient before each step (before the sign when
            ``signed``), drawn from ``generator`` (GradInversion; breaching's
            ``seethroughgradients``: 0.01).
        warmup: iterations of linear warm-up of the step size from 0 before
            ``schedule`` starts (breaching's ``seethroughgradients``: 50).
        support: ``"all"`` (match every entry) or ``"nonzero"`` (match only the
            entries the observed update kept: the adaptive attack on pruning,
            see :meth:`~leakage.simulate.UpdateSimulator.restrict_to_support`).
        generator: source of the random starts and the Langevin noise
            (default: seed 0).
        device: where to run (default: CPU).

    Returns:
        The restart with the lowest matching loss; ``history`` holds its
        objective (matching + priors) at every iteration.

    Raises:
        ValueError: for an unknown option value, ``bn_prior`` on a victim
            without BatchNorm or without running statistics, ``group`` with
            one restart or unbatched restarts.
    """
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be positive")
    if matching not in MATCHING:
        raise ValueError(f"matching must be one of {', '.join(MATCHING)}; got {matching!r}")
    if not matching_scale > 0:
        raise ValueError(f"matching_scale must be positive; got {matching_scale}")
    for name, value in (("bn_prior", bn_prior), ("group", group), ("l2", l2)):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative; got {value}")
    if not langevin >= 0 or warmup < 0:
        raise ValueError("langevin and warmup must be non-negative")
    if group and (restarts < 2 or not batched):
        raise ValueError(
            "group consistency compares restarts: use restarts >= 2 and batched=True (or group=0)"
        )
    family, tuned = tuned_options(obs.model_spec, obs.protocol.train_mode)
    given = dict(
        lr=lr, tv=tv, init=init, coordinates=coordinates, schedule=schedule, keep_best=keep_best
    )
    resolved = {k: tuned[k] if v is None else v for k, v in given.items()}
    lr, tv, init, coordinates = (resolved[k] for k in ("lr", "tv", "init", "coordinates"))
    schedule, keep_best = resolved["schedule"], resolved["keep_best"]
    if not lr > 0 or not tv >= 0:
        raise ValueError("lr must be positive and tv non-negative")
    if coordinates not in COORDINATES:
        raise ValueError(
            f"coordinates must be one of {', '.join(COORDINATES)}; got {coordinates!r}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    st = setup(obs, dtype=dtype, device=device, lbfgs=False, support=support)
    if bn_prior:
        st.sim.track_batch_norm(first_weight=bn_first)  # ValueError without BatchNorm
    x0, y0 = random_starts(
        obs, restarts, init=init, learn_labels=labels is None, generator=generator
    )
    space = Space(obs, coordinates, st)
    init = resolve_init(init, obs.model_spec)
    z0 = space.from_pixels(x0.to(st.device, st.dtype)) if init == "uniform" else x0
    fixed = None
    if labels is not None:
        k = obs.model_spec.num_classes
        fixed = torch.nn.functional.one_hot(labels.to(st.device), k).to(st.dtype)
    groups = [list(range(restarts))] if batched else [[r] for r in range(restarts)]
    results: list[RestartResult] = []
    priors = [
        (fn, w)
        for fn, w in ((total_variation, tv), (l2_prior, l2), (group_consistency, group))
        if w
    ]
    terms = Terms(MATCHING[matching], matching_scale, priors, bn_prior)
    noise = None
    if langevin:  # its own stream, seeded from the generator after the starts were drawn
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        noise = torch.Generator(device=st.device).manual_seed(seed)
    options = dict(steps=steps, lr=lr, terms=terms, schedule=schedule, keep_best=keep_best)
    options.update(langevin=langevin, noise=noise, warmup=warmup)
    if compile is None:
        compile = steps >= COMPILE_STEPS
    options["compile"] = compile
    options["channels_last"] = channels_last and st.device.type == "cpu"
    extra = dict(
        matching=matching,
        matching_scale=matching_scale,
        bn_prior=bn_prior,
        bn_first=bn_first,
        group=group,
        l2=l2,
        langevin=langevin,
        warmup=warmup,
        support=support,
    )
    defaults = dict(
        matching="cosine",
        matching_scale=1.0,
        bn_prior=0.0,
        bn_first=10.0,
        group=0.0,
        l2=0.0,
        langevin=0.0,
        warmup=0,
        support="all",
    )
    extra = {k: v for k, v in extra.items() if v != defaults[k]}  # IG's options as they were
    if options["channels_last"]:
        st.sim.to_channels_last()
    with trange(
        steps * len(groups), disable=not progress, desc="inverting gradients", leave=False
    ) as bar:
        for group in groups:
            with st.backend(len(group) * st.sim.num_samples):
                results += solve(
                    st,
                    space,
                    z0[group],
                    None if y0 is None else y0[group],
                    fixed,
                    signed=signed,
                    bar=bar,
                    **options,
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
        evaluations=sum(len(r.history) + 1 + keep_best for r in results),
        stopped=kept.stopped,
        options={
            **resolved,
            "init": init,
            "tuned_for": family,
            "compile": compile,
            "channels_last": options["channels_last"],
            **extra,
        },
    )


@dataclass(frozen=True)
class InvertingGradients(OptimisationAttack):
    """Inverting gradients (Geiping et al. 2020): cosine matching, TV prior, signed Adam.

    Args:
        steps: Adam iterations (paper: 4,800; its best CIFAR setting 24,000).
        restarts: random starts, batched (kept: lowest matching loss).
        lr: Adam's step size in the optimised coordinates.
        tv: total-variation weight on the optimised coordinates.
            (``lr`` to ``keep_best``: ``None`` takes the victim's tuned default,
            :data:`TUNED`.)
        init: ``"auto"``, ``"randn"`` (in the optimised coordinates) or ``"uniform"`` (pixels).
        coordinates: ``"normalized"`` (the victim's normalised inputs) or ``"pixel"``.
        schedule: ``"step"``, ``"cosine"`` or ``"constant"``.
        keep_best: return each restart's best iterate, not its last.
        signed: Adam on the gradient's sign.
        dtype: ``"auto"`` (float32), ``"float32"`` or ``"float64"``.
        label_strategy: a strategy of :mod:`leakage.labels` (default
            ``"auto"``) or ``"joint"`` (soft labels optimised too).
        batched: restarts batched (default) or run one by one.
        compile: the objective through ``torch.compile``; ``None``: when it pays
            (see :func:`invert_gradients`).
        channels_last: channels-last memory on the CPU.
        support: ``"all"`` or ``"nonzero"`` (match the kept entries only, against pruning).
        device: where the attack runs.

    The defaults come from ``benchmarks/tuning.py`` (see the module docstring).
    """

    solver = staticmethod(invert_gradients)

    steps: int = 4800
    restarts: int = 1
    lr: float | None = None
    tv: float | None = None
    init: str | None = None
    coordinates: str | None = None
    schedule: str | None = None
    keep_best: bool | None = None
    signed: bool = True
    dtype: str = "auto"
    label_strategy: str = "auto"
    batched: bool = True
    compile: bool | None = None
    channels_last: bool = True
    support: str = "all"
    device: str = "cpu"


ATTACKS.register("ig")(InvertingGradients)
