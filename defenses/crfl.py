"""CRFL: clipping and smoothing of the global model, and certification by parameter smoothing.

Xie, Chen, Chen, Li, "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021 (arXiv:2106.08283); reference code ``AI-secure/CRFL``.

Training (:class:`CRFL`, a ``post_aggregation`` hook of :class:`fl_core.server.Server`):
after each aggregation the server clips the global parameters to an L2 norm of
at most ρ_t and adds N(0, σ²) to every parameter (the reference's ``main.py``,
lines 100-140). Testing (:func:`certify`): M noisy copies θ_T + N(0, σ_T²) of the
final model vote on each test input; confidence bounds on the top-two vote
shares give p_A (lower) and p_B (upper), and the paper's certified-radius
theorem turns them into a radius: the largest L2 norm of a backdoor trigger δ
that provably could not have changed the smoothed prediction, given the
training quantities of a :class:`ThreatModel` (reference ``cal_prob_bound``,
``certify_mnist.py`` lines 104-140).

The bounds hold jointly at level 1 − α for the classes actually certified
(:func:`top_two_bounds`). The reference (``certify_mnist.py`` l. 169-171) picks
the top class and the runner-up from the very votes it then bounds, each bound
at level 1 − α with no correction for that choice, so its stated level does not
hold. Here either the choice is paid for with a Bonferroni (union) bound over
the classes, or the top class comes from a separate selection sample, as in
CERTIFY of Cohen, Rosenfeld and Kolter 2019 ("Certified Adversarial Robustness
via Randomized Smoothing", ICML, Sec. 3.2 and Algorithm "certify").

The math lives in pure functions (:func:`clip_global_norm`, :func:`add_gaussian_noise`,
:func:`top_two_bounds`, :func:`certified_radius`); :class:`CRFL` and :func:`certify`
are plumbing around them. The certificate's math (:class:`ThreatModel`, the radius,
the bounds) is in :mod:`defenses.crfl_certificate`; its names import from here too.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .crfl_certificate import (
    BOUNDS,
    ThreatModel,
    certified_radius,
    hoeffding_bounds,
    top_two_bounds,
)

__all__ = [
    "BOUNDS",
    "CRFL",
    "CertifyResult",
    "ThreatModel",
    "add_gaussian_noise",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "certify_votes",
    "clip_global_norm",
    "hoeffding_bounds",
    "smoothed_votes",
    "top_two_bounds",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- training-time transform


def clip_global_norm(parameters: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale all tensors by ``min(1, max_norm / ‖θ‖)``, ‖θ‖ the L2 norm of their concatenation.

    The norm and the factor are computed in float64; tensors whose joint norm is
    at most ``max_norm`` (or ``max_norm = inf``) come back as bit-identical copies.

    Args:
        parameters: tensors of any shapes (the model's parameters, in order).
        max_norm: ρ > 0, possibly ``inf``.

    Returns:
        New tensors of the same shapes and dtypes.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm {max_norm}: use a positive number (inf disables clipping)")
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in parameters))
    if norm <= max_norm:
        return [p.detach().clone() for p in parameters]
    scale = max_norm / norm
    return [p.detach() * scale for p in parameters]


def add_gaussian_noise(
    parameters: Sequence[torch.Tensor], sigma: float, *, generator: torch.Generator
) -> list[torch.Tensor]:
    """``θ + N(0, σ² I)`` for every tensor, noise drawn from ``generator`` in parameter order.

    ``sigma = 0`` returns bit-identical copies and draws nothing.
    """
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma {sigma}: use a finite number >= 0")
    if sigma == 0:
        return [p.detach().clone() for p in parameters]
    out = []
    for p in parameters:
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device)
        out.append(p.detach() + sigma * noise.to(p.device))
    return out


@dataclass(frozen=True)
class CRFL:
    """The CRFL server step: clip the new global model to ρ_t, then add N(0, σ²).

    A ``post_aggregation`` hook for :class:`fl_core.server.Server`:
    ``f(parameters, *, round, generator) -> parameters``. Only parameters are
    touched, never BatchNorm statistics (FedML's version also scales and noises
    them).

    The clipping bound grows linearly, ``ρ_t = rho_slope · t + rho_offset``,
    capped at ``rho_max``, with ``t`` counted from 1 as the reference's round
    loop does (``main.py`` l. 76 and 101-109: MNIST ``0.1 t + 2``, EMNIST
    ``0.25 t + 4``, LOAN ``0.025 t + 2``, all capped at ``param_clip_thres``,
    15 in its configs). The server's 0-based ``round`` r therefore clips to
    ρ_{r+1}: the first aggregation of the MNIST schedule clips to 2.1.

    Attributes:
        sigma: σ, the std of the Gaussian added to every parameter (0.01 in the paper).
        rho_slope, rho_offset: the linear schedule of ρ_t (``rho_offset = inf``
            disables clipping).
        rho_max: cap on ρ_t (the reference's ``param_clip_thres``; default none).
        rounds: T, the length of the run; when set, the last round (``round ==
            T − 1``) is clipped but not noised, so that the model left for
            :func:`certify` is the clipped θ_T that the reference saves before
            adding its noise (``main.py`` l. 111-140) and test-time smoothing
            supplies the round-T noise σ_T. ``None``: every round is noised.
    """

    sigma: float = 0.01
    rho_slope: float = 0.1
    rho_offset: float = 2.0
    rho_max: float = math.inf
    rounds: int | None = None

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma {self.sigma}: use a finite number >= 0 (0 disables noise)")
        if not (self.rho_slope >= 0 and math.isfinite(self.rho_slope)):
            raise ValueError(f"rho_slope {self.rho_slope}: use a finite number >= 0")
        if not self.rho_offset > 0:
            raise ValueError(f"rho_offset {self.rho_offset}: use a positive number (inf: no clip)")
        if not self.rho_max > 0:
            raise ValueError(f"rho_max {self.rho_max}: use a positive number (inf: no cap)")
        if self.rounds is not None and (
            isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1
        ):
            raise ValueError(f"rounds {self.rounds!r}: use a positive int or None")

    def rho(self, t: int) -> float:
        """ρ_t for round ``t`` counted from 1 (the server's 0-based round r is t = r + 1)."""
        if t < 1:
            raise ValueError(f"round t = {t}: CRFL counts rounds from 1")
        if math.isinf(self.rho_offset):
            return math.inf
        return min(self.rho_slope * t + self.rho_offset, self.rho_max)

    def __call__(
        self, parameters: Sequence[torch.Tensor], *, round: int, generator: torch.Generator
    ) -> list[torch.Tensor]:
        clipped = clip_global_norm(parameters, self.rho(round + 1))
        if self.rounds is not None and round == self.rounds - 1:
            return clipped  # θ_T: smoothed at test time (σ_T), as the reference saves it
        return add_gaussian_noise(clipped, self.sigma, generator=generator)


# ---------------------------------------------------------------- certification plumbing


@dataclass(frozen=True)
class CertifyResult:
    """Per-sample outcome of :func:`certify` (N test samples, K classes).

    Attributes:
        counts: ``(N, K)`` int64 votes of the M noisy models.
        labels: ``(N,)`` true labels.
        top_class: ``(N,)`` the class A bounded: the most voted class of
            ``selection`` when given, else of ``counts`` (the reference's prediction).
        prediction: ``(N,)`` the certified prediction: ``top_class`` where
            p_A lower > p_B upper, else −1 (abstain).
        pa_lower, pb_upper: ``(N,)`` float64 bounds holding jointly at level 1 − α
            (:func:`top_two_bounds`).
        radius: ``(N,)`` float64 certified ‖δ‖₂; 0 where abstaining.
        correct: ``(N,)`` bool, ``prediction == labels``.
        num_models, alpha, sigma: M, α and σ_T used.
        selection: ``(N, K)`` int64 votes of the separate selection sample, or ``None``.
        method: the bound used (one of :data:`BOUNDS`).
    """

    counts: torch.Tensor
    labels: torch.Tensor
    top_class: torch.Tensor
    prediction: torch.Tensor
    pa_lower: torch.Tensor
    pb_upper: torch.Tensor
    radius: torch.Tensor
    correct: torch.Tensor
    num_models: int
    alpha: float
    sigma: float
    selection: torch.Tensor | None = None
    method: str = "hoeffding"

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def smoothed_votes(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sigma: float,
    num_models: int = 1000,
    generator: torch.Generator,
    batch_size: int = 1000,
    progress: bool = False,
) -> torch.Tensor:
    """Votes of M noisy copies ``θ + N(0, σ² I)`` of ``model`` on every image.

    Each copy perturbs the parameters only (buffers untouched), runs in eval mode
    over all images in batches of ``batch_size`` and votes with its argmax
    (reference ``smooth_mnist.py``, ``certificate_over_model``). The copies' noise
    is drawn from ``generator`` in parameter order, copy after copy; ``model``
    is not modified.

    Args:
        model: the final global model.
        images: ``(N, C, H, W)`` test inputs.
        sigma: σ_T.
        num_models: M.
        generator: source of all the noise.
        batch_size: images per forward pass.
        progress: show a progress bar over the copies.

    Returns:
        ``(N, K)`` int64 vote counts, rows summing to M.
    """
    from tqdm.auto import trange

    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1; got {tuple(images.shape)}")
    for value, what in ((num_models, "num_models"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} {value!r}: use a positive int")
    work = copy.deepcopy(model).eval()
    base = [p.detach().clone() for p in model.parameters()]
    params = list(work.parameters())
    device = base[0].device
    n = len(images)
    rows = torch.arange(n, device=device)
    counts: torch.Tensor | None = None
    for _ in trange(num_models, disable=not progress, desc="noisy models"):
        for p, v in zip(params, add_gaussian_noise(base, sigma, generator=generator)):
            p.copy_(v)
        for i in range(0, n, batch_size):
            logits = work(images[i : i + batch_size].to(device))  # (B, K)
            if counts is None:
                counts = torch.zeros(n, logits.shape[1], dtype=torch.int64, device=device)
            pred = logits.argmax(1)  # (B,)
            hit = (rows[i : i + len(pred)], pred)
            counts.index_put_(hit, torch.ones_like(pred), accumulate=True)
    assert counts is not None
    return counts.cpu()


def certify_votes(
    counts: torch.Tensor,
    labels: torch.Tensor,
    *,
    defense: CRFL,
    threat: ThreatModel,
    sigma: float | None = None,
    alpha: float = 0.001,
    selection: torch.Tensor | None = None,
    method: str = "hoeffding",
) -> CertifyResult:
    """Certify from vote counts: joint bounds, abstention, radius, correctness.

    Args:
        counts: ``(N, K)`` votes of M noisy models (:func:`smoothed_votes`).
        labels: ``(N,)`` true labels.
        defense, threat, sigma: see :func:`certified_radius` (``sigma`` is σ_T).
        alpha: α: the bounds p_A lower and p_B upper (hence each radius) hold
            together with probability at least 1 − α (:func:`top_two_bounds`).
        selection: ``(N, K)`` votes of an independent selection sample that
            chooses the top class (Cohen et al. 2019); ``None``: a Bonferroni
            correction over the classes instead.
        method: ``"hoeffding"`` (the reference's) or ``"clopper_pearson"``.
    """
    if labels.ndim != 1 or len(labels) != len(counts):
        raise ValueError("labels must be (N,) with one label per row of counts")
    sigma = defense.sigma if sigma is None else sigma
    top, pa_lower, _, pb_upper = top_two_bounds(
        counts, alpha=alpha, selection=selection, method=method
    )
    certified = pa_lower > pb_upper
    prediction = torch.where(certified, top, torch.full_like(top, -1))
    radius = certified_radius(pa_lower, pb_upper, defense=defense, threat=threat, sigma_test=sigma)
    radius = torch.where(certified, radius, torch.zeros_like(radius))
    labels = labels.cpu()
    return CertifyResult(
        counts=counts,
        labels=labels,
        top_class=top,
        prediction=prediction,
        pa_lower=pa_lower,
        pb_upper=pb_upper,
        radius=radius,
        correct=prediction == labels,
        num_models=int(counts[0].sum()) if len(counts) else 0,
        alpha=alpha,
        sigma=sigma,
        selection=selection,
        method=method,
    )


def certify(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    defense: CRFL,
    threat: ThreatModel,
    sigma: float | None = None,
    num_models: int = 1000,
    alpha: float = 0.001,
    generator: torch.Generator,
    batch_size: int = 1000,
    progress: bool = False,
    num_selection: int = 0,
    method: str = "hoeffding",
) -> CertifyResult:
    """Certify a CRFL-trained model by parameter smoothing (Xie et al. 2021, certification).

    :func:`smoothed_votes` with σ_T = ``sigma`` (``None``: ``defense.sigma``) and
    M = ``num_models``, then :func:`certify_votes` (bounds holding jointly at
    level 1 − α, abstention unless p_A lower > p_B upper, :func:`certified_radius`).
    With ``num_selection = n₀ > 0``, n₀ noisy copies are drawn first (from the
    same generator) and only choose the top class, as in Cohen et al. 2019's
    CERTIFY; the M copies after them give the bounds. With 0, the top class
    comes from the M votes and a Bonferroni correction pays for the choice.

    Args:
        model: the final global model θ_T (clipped; see :attr:`CRFL.rounds`).
        images: ``(N, C, H, W)`` test inputs.
        labels: ``(N,)`` their labels.
        defense: the CRFL settings used in training.
        threat: the training and attack quantities of the radius.
        sigma: σ_T of test-time smoothing.
        num_models: M noisy copies (1000 in the paper).
        alpha: α, the probability that the certificate fails (0.001 in the paper).
        generator: source of the smoothing noise.
        batch_size: images per forward pass.
        progress: show a progress bar over the copies.
        num_selection: n₀, noisy copies of the separate selection sample (0: none).
        method: ``"hoeffding"`` or ``"clopper_pearson"`` (see :func:`top_two_bounds`).
    """
    sigma = defense.sigma if sigma is None else sigma
    if isinstance(num_selection, bool) or not isinstance(num_selection, int) or num_selection < 0:
        raise ValueError(f"num_selection {num_selection!r}: use an int >= 0 (0: no selection)")
    selection = None
    if num_selection:
        selection = smoothed_votes(
            model,
            images,
            sigma=sigma,
            num_models=num_selection,
            generator=generator,
            batch_size=batch_size,
            progress=progress,
        )
    counts = smoothed_votes(
        model,
        images,
        sigma=sigma,
        num_models=num_models,
        generator=generator,
        batch_size=batch_size,
        progress=progress,
    )
    result = certify_votes(
        counts,
        labels,
        defense=defense,
        threat=threat,
        sigma=sigma,
        alpha=alpha,
        selection=selection,
        method=method,
    )
    log.debug(
        "certified %d samples with %d noisy models: %d abstained, max radius %.4g",
        len(result),
        num_models,
        int((result.prediction < 0).sum()),
        float(result.radius.max()),
    )
    return result


def certified_accuracy(result: CertifyResult, radii: Sequence[float]) -> list[float]:
    """For each r: fraction of samples predicted correctly (not abstaining) with radius >= r.

    (Reference ``certify_mnist.py``, ``CertifiedAcc.at_radius``.)
    """
    n = max(len(result), 1)
    return [float((result.correct & (result.radius >= r)).sum()) / n for r in radii]
