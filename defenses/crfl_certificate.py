"""CRFL's certificate: the threat model, the certified radius and the vote bounds it rests on.

Xie, Chen, Chen, Li, "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021 (arXiv:2106.08283); reference code ``AI-secure/CRFL``. The radius
is the paper's certified-radius theorem (reference ``cal_prob_bound``), the bounds on
the top two vote shares hold jointly at level 1 − α (a Bonferroni bound, or a
separate selection sample as in Cohen, Rosenfeld and Kolter, ICML 2019).
:mod:`defenses.crfl` holds the training step and the certification that calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: defenses.crfl imports this module
    from .crfl import CRFL

__all__ = [
    "BOUNDS",
    "PROBABILITY_FLOOR",
    "ThreatModel",
    "certified_radius",
    "hoeffding_bounds",
    "top_two_bounds",
]

PROBABILITY_FLOOR = 1e-8
"""Floor of p_A lower and 1 − cap of p_B upper (reference ``certify_mnist.py`` l. 170-171)."""

BOUNDS = ("hoeffding", "clopper_pearson")
"""One-sided binomial confidence bounds :func:`top_two_bounds` can use: Hoeffding's
inequality (the reference's) or the exact Clopper-Pearson interval (as in Cohen et al. 2019)."""


@dataclass(frozen=True)
class ThreatModel:
    """The training and attack quantities that enter CRFL's certified radius.

    Notation of the paper's certification theorem and of the reference's
    ``cal_prob_bound`` (``certify_mnist.py`` l. 104-140). The certificate is for
    a backdoor of R attackers who, in round ``t_adv``, poison a fraction
    ``q_B / n_B`` of each local batch with a trigger δ, train ``τ`` local SGD
    steps with learning rate ``η`` and scale their update by ``γ`` (model
    replacement); the radius bounds ‖δ‖₂.

    Attributes:
        rounds: T, the round after which the certified model θ_T is taken (1-based).
        attack_round: t_adv, the attack's round, ``1 <= t_adv <= T``.
        lr: η, the clients' local SGD learning rate (the bound assumes plain SGD).
        local_steps: τ, local SGD steps per round (reference: one epoch,
            ``60000 / N / n_B``).
        num_clients: N, clients aggregated per round; the default weight of each
            attacker is ``1 / N`` (FedAvg with equal shares).
        num_attackers: R.
        attacker_weights: p_i, the attackers' aggregation weights (``None``:
            ``1 / N`` each; the reference passes RFA's weights here).
        scale_factor: γ, the attackers' update scaling (1: no scaling).
        poison_ratio: q_B / n_B, poisoned fraction of each attacker batch
            (reference: 5 / 100).
        lipschitz: L_Z, Lipschitz constant of the loss gradient in the input.
            ``None``: the reference's ``sqrt(2 + 2ρ + ρ²)`` with ρ = ρ_{t_adv}
            (``certify_mnist.py`` l. 115-116, hard-wired there to ρ = 3 = ρ_10),
            derived for its MNIST model, multinomial logistic regression; for
            other models it is no proven bound.
    """

    rounds: int
    attack_round: int
    lr: float
    local_steps: int
    num_clients: int
    num_attackers: int = 1
    attacker_weights: tuple[float, ...] | None = None
    scale_factor: float = 1.0
    poison_ratio: float = 0.05
    lipschitz: float | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "attack_round", "local_steps", "num_clients", "num_attackers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r}: use a positive int")
        if self.attack_round > self.rounds:
            raise ValueError(
                f"attack_round {self.attack_round} after rounds {self.rounds}: use t_adv <= T"
            )
        if self.num_attackers > self.num_clients:
            raise ValueError(f"num_attackers {self.num_attackers}: use at most num_clients")
        if self.attacker_weights is not None:
            w = tuple(float(x) for x in self.attacker_weights)
            if len(w) != self.num_attackers or not all(0 < x <= 1 for x in w):
                raise ValueError("attacker_weights: give num_attackers weights in (0, 1]")
            object.__setattr__(self, "attacker_weights", w)
        for name in ("lr", "scale_factor"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} {value}: use a finite positive number")
        if not 0 < self.poison_ratio <= 1:
            raise ValueError(f"poison_ratio {self.poison_ratio}: use q_B / n_B in (0, 1]")
        lz = self.lipschitz
        if lz is not None and not (lz > 0 and math.isfinite(lz)):
            raise ValueError(f"lipschitz {self.lipschitz}: use a finite positive number or None")

    def weights(self) -> tuple[float, ...]:
        """p_1, ..., p_R."""
        if self.attacker_weights is not None:
            return self.attacker_weights
        return (1.0 / self.num_clients,) * self.num_attackers

    def lipschitz_constant(self, defense: CRFL) -> float:
        """L_Z: the given constant, or ``sqrt(2 + 2ρ + ρ²)`` with ρ = ρ_{t_adv} of ``defense``."""
        if self.lipschitz is not None:
            return self.lipschitz
        rho = defense.rho(self.attack_round)
        if math.isinf(rho):
            raise ValueError("no default L_Z without clipping: pass ThreatModel(lipschitz=...)")
        return math.sqrt(2 + 2 * rho + rho**2)


def _contraction(rho: float, sigma: float) -> float:
    """2Φ(ρ/σ) − 1 = erf(ρ / (σ√2)): the TV contraction of one clip-to-ρ + N(0, σ²) step."""
    if sigma == 0:
        return 1.0
    return math.erf(rho / (sigma * math.sqrt(2.0)))


def certified_radius(
    pa_lower: torch.Tensor | float,
    pb_upper: torch.Tensor | float,
    *,
    defense: CRFL,
    threat: ThreatModel,
    sigma_test: float | None = None,
) -> torch.Tensor:
    """CRFL's certified radius on the backdoor magnitude ‖δ‖₂ (float64, same shape as the inputs).

    The certified-radius theorem of Xie et al. 2021 (the paper's main
    certification result, which joins the robustness condition of the
    parameter-smoothed classifier, KL(clean θ_T ‖ backdoored θ_T) <
    −ln(1 − (√p_A − √p_B)²), to its bound on that KL after T rounds of clipping
    and noise), as computed by the reference's ``cal_prob_bound``
    (``certify_mnist.py`` l. 104-140)::

        RAD² = −ln(1 − (√p_A − √p_B)²) · σ²
               / (2 R (Σ_i p_i²) τ² L_Z² γ² η² (q_B/n_B)² · Π)
        Π    = Π_{t = t_adv+1}^{T−1} (2Φ(ρ_t/σ) − 1) · (2Φ(ρ_T/σ_T) − 1)

    with σ the training noise (``defense.sigma``), σ_T the test-time smoothing
    noise and ρ_t the clipping schedule of ``defense`` (its ``rho_max`` cap
    included; the reference's formula uses the uncapped line, the same as long as
    the cap is not reached). The numerator is the KL budget −ln(1 − (√p_A −
    √p_B)²) of the theorem's robustness condition; the denominator bounds the KL
    divergence between the clean and backdoored θ_T per unit ‖δ‖².

    Entries with ``p_A <= p_B`` (no certified prediction) get radius 0 (the
    reference evaluates the formula there too, which is symmetric in p_A, p_B);
    ``p_A = 1, p_B = 0`` gives ``inf``. The radius holds with the probability
    that the bounds do (p_A lower <= p_A and p_B upper >= p_B together), which
    :func:`top_two_bounds` makes 1 − α.

    Args:
        pa_lower: p_A lower bound(s) in [0, 1].
        pb_upper: p_B upper bound(s) in [0, 1].
        defense: the CRFL settings of training (σ, ρ_t).
        threat: T, t_adv, η, τ, N, R, p_i, γ, q_B/n_B, L_Z.
        sigma_test: σ_T (``None``: ``defense.sigma``, the reference's ``test_sigma``).

    Returns:
        RAD, float64, broadcast shape of the inputs.
    """
    pa = torch.as_tensor(pa_lower, dtype=torch.float64)
    pb = torch.as_tensor(pb_upper, dtype=torch.float64)
    if ((pa < 0) | (pa > 1) | (pb < 0) | (pb > 1)).any():
        raise ValueError("pa_lower and pb_upper must be probabilities in [0, 1]")
    sigma = defense.sigma
    sigma_test = sigma if sigma_test is None else sigma_test
    if not (sigma > 0 and sigma_test > 0):
        raise ValueError("the radius needs positive training and test noise: sigma > 0")
    contraction = 1.0
    for t in range(threat.attack_round + 1, threat.rounds):  # rounds t_adv+1 .. T-1
        contraction *= _contraction(defense.rho(t), sigma)
    contraction *= _contraction(defense.rho(threat.rounds), sigma_test)  # round T
    lz = threat.lipschitz_constant(defense)
    per_delta = (
        2
        * threat.num_attackers
        * sum(p**2 for p in threat.weights())
        * threat.local_steps**2
        * lz**2
        * threat.scale_factor**2
        * threat.lr**2
        * threat.poison_ratio**2
        * contraction
    )
    gap = (pa.sqrt() - pb.sqrt()).clamp(min=0.0)  # (..): √p_A − √p_B, 0 where p_A <= p_B
    budget = -torch.log1p(-gap.square())  # KL budget −ln(1 − (√p_A − √p_B)²)
    return (budget * sigma**2 / per_delta).sqrt()


def _check_counts(counts: torch.Tensor, what: str) -> int:
    """M, the votes per row of ``counts`` (N, K), after checking it."""
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ValueError(f"{what} must be (N, K) with K >= 2; got {tuple(counts.shape)}")
    total = counts.sum(1)  # (N,): M in every row
    m = int(total[0]) if len(total) else 1
    if m < 1 or bool((total != m).any()) or bool((counts < 0).any()):
        raise ValueError(f"every row of {what} must hold the same positive number of votes M")
    return m


def _lower(k: torch.Tensor, m: int, level: float, method: str) -> torch.Tensor:
    """One-sided lower confidence bounds (N,) float64 on p from k ~ Binomial(m, p), each
    failing with probability at most ``level``."""
    if method == "hoeffding":  # P(k/m − p >= ε) <= exp(−2mε²) = level
        return k / m - math.sqrt(math.log(1 / level) / (2 * m))
    from scipy.stats import beta

    kk = k.numpy()
    with np.errstate(invalid="ignore"):
        bound = np.where(kk > 0, beta.ppf(level, kk, m - kk + 1), 0.0)
    return torch.as_tensor(bound, dtype=torch.float64)


def _upper(k: torch.Tensor, m: int, level: float, method: str) -> torch.Tensor:
    """One-sided upper confidence bounds (N,) float64, each failing with probability <= level."""
    if method == "hoeffding":
        return k / m + math.sqrt(math.log(1 / level) / (2 * m))
    from scipy.stats import beta

    kk = k.numpy()
    with np.errstate(invalid="ignore"):
        bound = np.where(kk < m, beta.ppf(1 - level, kk + 1, m - kk), 1.0)
    return torch.as_tensor(bound, dtype=torch.float64)


def top_two_bounds(
    counts: torch.Tensor,
    *,
    alpha: float,
    selection: torch.Tensor | None = None,
    method: str = "hoeffding",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top class A, p_A lower bound, runner-up B and p_B upper bound, jointly at level 1 − α.

    With probability at least 1 − α over the votes, ``p_A >= pa_lower`` and
    ``max_{c ≠ A} p_c <= pb_upper`` hold together for the class A returned, p_c
    being the smoothed classifier's probability of class c. The choice of A and
    B from random votes is accounted for:

    * ``selection=None`` (A and B from ``counts`` itself): a Bonferroni (union)
      bound over all K classes. Every class's lower and upper bound is taken at
      level α / (2K), so all 2K bounds hold at once with probability ≥ 1 − α,
      whichever classes the votes then pick.
    * ``selection`` given: vote counts of a separate, independent sample that
      only chooses A (its argmax), as Cohen, Rosenfeld and Kolter 2019 (ICML,
      CERTIFY) do. A is then fixed with respect to ``counts``: p_A lower at
      level α/2, and every other class's upper bound at α / (2(K − 1)) (the
      largest is p_B upper).

    In both cases ``pb_upper`` is also capped at ``1 − pa_lower`` (Σ p_c = 1
    makes that valid on the same event). Bounds per class, with n_c votes of M:

    * ``"hoeffding"`` (the reference's, ``certify_mnist.py`` l. 169-171): lower
      ``n_c/M − sqrt(ln(1/ℓ) / (2M))``, upper ``n_c/M + sqrt(ln(1/ℓ) / (2M))``
      at level ℓ (Hoeffding 1963);
    * ``"clopper_pearson"``: the exact binomial bounds ``Beta(ℓ; n_c, M − n_c + 1)``
      (0 when n_c = 0) and ``Beta(1 − ℓ; n_c + 1, M − n_c)`` (1 when n_c = M)
      quantiles (Clopper and Pearson 1934).

    p_A lower is floored at 1e-8 and p_B upper capped at 1 − 1e-8 (the
    reference's clamps). Ties go to the lowest class index (``np.argmax``).

    Args:
        counts: ``(N, K)`` vote counts, every row summing to M.
        alpha: α in (0, 1), the probability that the certificate's bounds fail.
        selection: ``(N, K)`` votes of an independent selection sample, or ``None``.
        method: one of :data:`BOUNDS`.

    Returns:
        ``(top (N,) int64, pa_lower (N,) float64, runner_up (N,) int64, pb_upper (N,) float64)``.
    """
    m = _check_counts(counts, "counts")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha}: use a number in (0, 1)")
    if method not in BOUNDS:
        raise ValueError(f"unknown bound {method!r}; valid: {', '.join(BOUNDS)}")
    k = counts.shape[1]
    if selection is None:
        top = counts.argmax(1)  # (N,) first maximum
        level_a = level_b = alpha / (2 * k)
    else:
        if selection.shape != counts.shape:
            raise ValueError(
                f"selection votes must be (N, K) = {tuple(counts.shape)} like counts; "
                f"got {tuple(selection.shape)}"
            )
        _check_counts(selection, "selection")
        top = selection.argmax(1)  # (N,): chosen on votes independent of counts
        level_a, level_b = alpha / 2, alpha / (2 * (k - 1))
    counts = counts.to(torch.float64)
    rest = counts.scatter(1, top[:, None], -1.0)  # (N, K): top class removed
    runner_up = rest.argmax(1)
    n_a = counts.gather(1, top[:, None]).squeeze(1)
    n_b = counts.gather(1, runner_up[:, None]).squeeze(1)
    pa_lower = _lower(n_a, m, level_a, method).clamp(min=PROBABILITY_FLOOR)
    pb_upper = torch.minimum(_upper(n_b, m, level_b, method), 1 - pa_lower)
    return top, pa_lower, runner_up, pb_upper.clamp(max=1 - PROBABILITY_FLOOR)


def hoeffding_bounds(
    counts: torch.Tensor, *, alpha: float, selection: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_two_bounds` with Hoeffding bounds (the reference's), jointly at level 1 − α.

    Without ``selection``, every bound's ε is ``sqrt(ln(2K/α) / (2M))`` (Bonferroni
    over the 2K one-sided bounds of K classes), not the reference's
    ``sqrt(ln(1/α) / (2M))``, which ignores that the two classes are chosen from
    the same votes.
    """
    return top_two_bounds(counts, alpha=alpha, selection=selection, method="hoeffding")
