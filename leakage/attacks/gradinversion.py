"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov, "See Through
Gradients: Image Batch Recovery via GradInversion", CVPR 2021) on the lab's
inverting-gradients loop.

The dummy batch minimises

    s · D(Δ(x'), Δ)  +  α_TV · TV(z')  +  α_ℓ2 · ½ mean(z'²)
                     +  α_BN · Σ_l (‖μ_l(x') − μ̂_l‖₂ + ‖σ²_l(x') − σ̂²_l‖₂)
                     +  α_group · mean (z'_r − z̄')²

with D the cosine (inverting gradients) or the Euclidean distance
(GradInversion's), μ̂_l, σ̂²_l the running statistics of BatchNorm layer l in
the server's model, and z̄' the mean over the restarts (the paper registers
the restarts before averaging; here the plain mean: see
:func:`leakage.priors.group_consistency`). Labels come from GradInversion's
per-class minimum of the last layer's weight gradient (``label_strategy
"yin"``) by default.

Everything but the defaults is :func:`~leakage.attacks.inverting.invert_gradients`:
the same batched restarts, box constraint, keep-best and ``torch.compile``
(which also compiles the BatchNorm hooks). The defaults are the
inverting-gradients loop's tuned settings for the victim plus the BatchNorm
prior weights of :data:`TUNED_PRIORS`, chosen by a development sweep on CIFAR-10
*training* images (``benchmarks/tuning_gradinversion.py``); on the lab's
trained ResNet-20 that sweep found the BatchNorm prior *hurts* at every weight
it tried, so it is off by default and ``bn_prior`` turns it on.
:data:`RECIPE` is GradInversion's own recipe as breaching's ``seethroughgradients`` sets it
(Euclidean matching scaled 1e-4, unsigned Adam 0.1 with warm-up, cosine decay
and Langevin noise, TV 1e-4, ℓ2 1e-6, BatchNorm 0.1, normalised coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ATTACKS
from .inverting import InvertingGradients

__all__ = ["RECIPE", "TUNED_PRIORS", "GradInversion"]

TUNED_PRIORS = dict(bn_prior=0.0, l2=1e-2, group=0.0)
"""Prior weights of the attack, chosen by the development sweep
``benchmarks/tuning_gradinversion.py --steps 2000 --stage dev`` (trained
ResNet-20, eval-mode BatchNorm, batch 4, two batches of CIFAR-10 *training*
images; ``benchmarks/results/tuning/gradinversion/summary.md``): mean PSNR
11.68 dB with ℓ2 1e-2 and no BatchNorm prior, 11.67 dB with neither, and
9.98 / 9.13 / 8.92 dB with the BatchNorm prior at 1e-3 / 1e-2 / 1e-1;
GradInversion's own recipe (:data:`RECIPE`) 8.72 dB."""

RECIPE = dict(
    matching="euclidean",
    matching_scale=1e-4,
    signed=False,
    lr=0.1,
    schedule="cosine",
    warmup=50,
    langevin=0.01,
    tv=1e-4,
    l2=1e-6,
    bn_prior=0.1,
    bn_first=10.0,
    coordinates="normalized",
    init="randn",
    keep_best=True,
)
"""GradInversion's recipe as breaching's ``seethroughgradients`` attack sets it
(its ``config/attack/seethroughgradients.yaml``: Euclidean objective scale 1e-4,
Adam 0.1 unsigned, cosine decay, warm-up 50, Langevin noise 0.01, TV 1e-4, ℓ2
norm 1e-6, DeepInversion 0.1 with the first layer ×10; breaching keeps the
iterate of lowest objective), for ``GradInversion(**RECIPE)``."""


@dataclass(frozen=True)
class GradInversion(InvertingGradients):
    """GradInversion's priors on the inverting-gradients loop (Yin et al., CVPR 2021).

    Args: those of :class:`~leakage.attacks.inverting.InvertingGradients`, and

        matching: ``"cosine"`` or ``"euclidean"`` gradient distance.
        matching_scale: factor on it.
        bn_prior: weight of the BatchNorm-statistics prior (needs a victim
            with BatchNorm whose running statistics the server holds).
        bn_first: factor of the first BatchNorm layer in it.
        group: weight of group consistency (needs ``restarts`` >= 2).
        l2: weight of the image-norm prior.
        langevin: Langevin noise on the gradient, times the step size.
        warmup: iterations of linear step-size warm-up.

    ``lr``, ``tv``, ``init``, ``coordinates``, ``schedule`` and ``keep_best``
    left at ``None`` take the victim's tuned inverting-gradients defaults.
    """

    # InvertingGradients' fields and solver, GradInversion's labels, and the prior terms
    label_strategy: str = "yin"
    matching: str = "cosine"
    matching_scale: float = 1.0
    bn_prior: float = TUNED_PRIORS["bn_prior"]
    bn_first: float = 10.0
    group: float = TUNED_PRIORS["group"]
    l2: float = TUNED_PRIORS["l2"]
    langevin: float = 0.0
    warmup: int = 0


ATTACKS.register("gradinversion")(GradInversion)
