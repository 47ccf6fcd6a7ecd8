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

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import trange

from fl_core.types import Observation

from ..objectives import cosine_distance, euclidean_distance, total_variation
from ..priors import group_consistency, l2_prior
from .base import ATTACKS, Reconstruction
from .matching import OptimisationAttack, Setup, random_starts, resolve_init, setup

__all__ = [
    "CHECK_EVERY",
    "COORDINATES",
    "FALLBACK",
    "MATCHING",
    "SCHEDULES",
    "TUNED",
    "InvertingGradients",
    "invert_gradients",
    "tuned_options",
]

COORDINATES = ("normalized", "pixel")
MATCHING = {"cosine": cosine_distance, "euclidean": euclidean_distance}
"""Gradient-matching losses: (R, d) dummy updates, (d,) target -> (R,)."""
SCHEDULES = ("step", "cosine", "constant")
CHECK_EVERY = 100
"""Iterations between the loop's checks for restarts that all went non-finite."""
COMPILE_STEPS = 1000
"""Budget from which ``compile=None`` compiles the objective."""


TUNED: dict[str, dict] = {
    # victim family -> the setting the development sweep chose for it
    # (benchmarks/tuning.py, 1,000 iterations, batch 1, CIFAR-10 victims with
    # input normalisation unless "-raw", Fashion-MNIST for "-gray"; results and
    # test-set numbers in benchmarks/results/tuning/ig/summary.md).
    "lenet-sigmoid": dict(
        coordinates="normalized", init="uniform", lr=0.3, tv=0.1, schedule="cosine", keep_best=False
    ),
    "lenet": dict(
        coordinates="normalized",
        init="uniform",
        lr=0.1,
        tv=0.03,
        schedule="constant",
        keep_best=True,
    ),
    "cnn": dict(
        coordinates="pixel", init="uniform", lr=0.3, tv=0.0, schedule="cosine", keep_best=False
    ),
    "resnet-train": dict(
        coordinates="normalized", init="randn", lr=0.03, tv=0.1, schedule="cosine", keep_best=False
    ),
    "resnet-eval": dict(
        coordinates="pixel", init="uniform", lr=0.3, tv=0.03, schedule="step", keep_best=True
    ),
    # Victims without input normalisation ([0, 1] pixels, as DLG's LeNet) and
    # grayscale ones (swept on Fashion-MNIST, 1x28x28) want their own settings:
    # the CIFAR-10-normalised ones carried to pixel units lost 16.7 dB on raw
    # Fashion-MNIST (privacy-utility sweep, ig-carried-settings/).
    "lenet-sigmoid-raw": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.03, schedule="step", keep_best=False
    ),
    "lenet-raw": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.1, schedule="cosine", keep_best=True
    ),
    "lenet-gray": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.0, schedule="step", keep_best=False
    ),
    "lenet-gray-raw": dict(
        coordinates="pixel", init="randn", lr=0.03, tv=0.001, schedule="step", keep_best=True
    ),
    # Not swept: sigmoid ResNets keep the lab's earlier pixel-space loop, which
    # the swept ReLU settings do not beat there (astronaut, ResNet-18, train
    # BatchNorm, 100 iterations: 17.1 dB against 11.4 with resnet-train's).
    "resnet-sigmoid": dict(
        coordinates="pixel", init="uniform", lr=0.1, tv=1e-4, schedule="step", keep_best=True
    ),
}
"""Tuned defaults per victim family (see :func:`tuned_options`)."""
FALLBACK = dict(
    coordinates="normalized", init="auto", lr=0.1, tv=0.05, schedule="step", keep_best=True
)
"""Defaults for victims the sweep did not cover (the MLP): the paper's loop
(normalised coordinates, step schedule, lr 0.1) with a moderate TV weight."""
RAW = dict(coordinates="pixel", init="uniform", lr=0.1, tv=1e-4, schedule="step", keep_best=False)
"""Defaults for victims without input normalisation whose family was tuned in
normalised coordinates only (the MLP, ReLU ResNets in train mode): the lab's
earlier pixel-space loop, not known to fail on raw victims. The raw LeNets have
their own swept settings."""


def tuned_options(spec, train_mode: bool) -> tuple[str, dict]:
    """``(family, options)``: the tuned IG defaults for a victim.

    Families: the sigmoid LeNet; any other LeNet (ReLU, tanh...); each of
    them without input normalisation (``-raw``); grayscale LeNets of any
    activation (``lenet-gray``, swept on the sigmoid one on Fashion-MNIST), with
    and without normalisation; the small CNN; the non-sigmoid ResNets
    (ResNet-20 was swept; ResNet-18 takes its setting) in train or eval
    BatchNorm mode, which change what the gradient shows enough to need
    different settings; the sigmoid ResNets; everything else gets
    :data:`FALLBACK`.

    The CNN and ResNet settings were tuned on CIFAR-10-normalised RGB victims;
    a victim of theirs without input normalisation gets :data:`RAW` (family
    ``"raw"``) unless its family's setting is already in pixel space (the CNN,
    the eval-mode and sigmoid ResNets), and a grayscale one takes the RGB
    setting (not swept).
    """
    activation = spec.activation or "sigmoid"
    raw = spec.normalize is None
    if spec.name == "lenet":
        if spec.in_shape[0] == 1:
            family = "lenet-gray"
        else:
            family = "lenet-sigmoid" if activation == "sigmoid" else "lenet"
        family += "-raw" if raw else ""
        return family, dict(TUNED[family])
    if spec.name == "cnn":
        family = "cnn"
    elif spec.name.startswith("resnet"):
        if activation == "sigmoid":
            family = "resnet-sigmoid"
        else:
            family = "resnet-train" if train_mode else "resnet-eval"
    else:
        family = "fallback"
    options = dict(TUNED.get(family, FALLBACK))
    if raw and options["coordinates"] == "normalized":
        return "raw", dict(RAW)
    return family, options


class VanishingGradientWarning(RuntimeWarning):
    """The update the dummy data produce is exactly zero: the attack cannot move."""


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
    space = _Space(obs, coordinates, st)
    init = resolve_init(init, obs.model_spec)
    z0 = space.from_pixels(x0.to(st.device, st.dtype)) if init == "uniform" else x0
    fixed = None
    if labels is not None:
        k = obs.model_spec.num_classes
        fixed = torch.nn.functional.one_hot(labels.to(st.device), k).to(st.dtype)
    groups = [list(range(restarts))] if batched else [[r] for r in range(restarts)]
    results: list[_Result] = []
    priors = [
        (fn, w)
        for fn, w in ((total_variation, tv), (l2_prior, l2), (group_consistency, group))
        if w
    ]
    terms = _Terms(MATCHING[matching], matching_scale, priors, bn_prior)
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
                results += _solve(
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


class _Space:
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
class _Terms:
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
class _Result:
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
    """Adam with the fastest implementation the device has (fused on CUDA, foreach on CPU)."""
    if device.type == "cuda":
        return torch.optim.Adam(variables, lr=lr, fused=True)
    return torch.optim.Adam(variables, lr=lr, foreach=True)


def _objective(st: Setup, space: _Space, fixed, terms: _Terms, r: int, compiled: bool):
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

    # one compiled graph per victim architecture, threat model and shape; a sweep over
    # many of them in one process must not fall back to eager after dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fast = torch.compile(functional, dynamic=False)
    state = {"fn": None}

    def step(z: torch.Tensor, y_logits: torch.Tensor | None):
        if state["fn"] is None:
            try:
                out = fast(z.detach(), None if y_logits is None else y_logits.detach())
                state["fn"] = fast
                return out
            except Exception as e:  # an unsupported victim or threat model: run eager
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "inverting gradients runs eager",
                    RuntimeWarning,
                    stacklevel=2,
                )
                state["fn"] = eager
        if state["fn"] is eager:
            return eager(z, y_logits)
        return fast(z.detach(), None if y_logits is None else y_logits.detach())

    return step


def _solve(
    st: Setup,
    space: _Space,
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
) -> list[_Result]:
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
            _Result(
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
