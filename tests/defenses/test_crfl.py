"""CRFL (Xie, Chen, Chen, Li, ICML 2021): clipping + noise hook, joint bounds, radius, certify.

Expected numbers come from hand arithmetic written out in each test: the clip
factor min(1, ρ/‖θ‖), Hoeffding's ε = sqrt(ln(1/ℓ) / 2M) at the Bonferroni level
ℓ = α/(2K) (or the split of a separate selection sample, Cohen et al. 2019),
closed-form Clopper-Pearson bounds at 0 or M votes, and the radius of the
paper's certified-radius theorem as the reference ``AI-secure/CRFL`` computes it
(``certify_mnist.py``, ``cal_prob_bound``). Φ in the hand computations is
:class:`statistics.NormalDist`, independent of the ``math.erf`` the module uses.
The coverage tests simulate votes from known class probabilities.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.crfl import (
    CRFL,
    ThreatModel,
    add_gaussian_noise,
    certified_accuracy,
    certified_radius,
    certify,
    certify_votes,
    clip_global_norm,
    hoeffding_bounds,
    smoothed_votes,
    top_two_bounds,
)
from fl_core import Client, LocalTraining, Server, build_model
from fl_core.server import SERVER_STREAM, round_generator

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PHI = NormalDist().cdf


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


# ---------------------------------------------------------------- clipping and noise


def test_clip_above_rho_scales_to_rho_exactly():
    # ‖θ‖ = sqrt(3² + 4² + 12²) = 13; ρ = 6.5 gives the factor 6.5 / 13 = 0.5 (exact in binary)
    params = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([12.0])]
    out = clip_global_norm(params, 6.5)
    assert torch.equal(out[0], torch.tensor([[1.5, 0.0], [0.0, 2.0]]))
    assert torch.equal(out[1], torch.tensor([6.0]))
    assert _norm(out) == 6.5
    assert torch.equal(params[1], torch.tensor([12.0]))  # inputs untouched


@pytest.mark.parametrize("rho", [13.0, 20.0, math.inf])
def test_clip_at_or_below_rho_is_bit_identical(rho):
    params = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([12.0])]
    out = clip_global_norm(params, rho)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(out, params))


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_random_norm_after_is_rho(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    rho = 0.5 * _norm(params)
    assert _norm(clip_global_norm(params, rho)) == pytest.approx(rho, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 7])
def test_noise_std_and_draw_order(seed):
    sigma = 0.05
    params = [torch.zeros(400, 250), torch.zeros(1000)]  # 101,000 draws
    out = add_gaussian_noise(params, sigma, generator=torch.Generator().manual_seed(seed))
    flat = torch.cat([t.flatten() for t in out]).double()
    # std of the sample std ≈ σ / sqrt(2n) = 0.11 % of σ; 1 % is ~9 of those
    assert float(flat.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(flat.mean())) < 4 * sigma / math.sqrt(flat.numel())
    g = torch.Generator().manual_seed(seed)  # the same draws, by hand, in parameter order
    assert torch.equal(out[0], sigma * torch.randn(400, 250, generator=g))
    assert torch.equal(out[1], sigma * torch.randn(1000, generator=g))


def test_disabled_crfl_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g) * 100, torch.randn(4, generator=g)]
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    out = CRFL(sigma=0.0, rho_offset=math.inf)(params, round=5, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(out, params))
    assert torch.equal(gen.get_state(), state)  # nothing drawn


def test_schedule_counts_rounds_from_one_like_the_reference():
    # reference main.py: epoch loop from 1, dynamic_thres = 0.1 * epoch + 2
    crfl = CRFL()
    assert crfl.rho(1) == pytest.approx(2.1)
    assert crfl.rho(100) == pytest.approx(12.0)
    assert CRFL(rho_max=2.5).rho(10) == 2.5
    # server round 0 is t = 1: ‖θ‖ = 13, ρ_1 = 0.5 * 1 + 6 = 6.5 (factor 0.5), ρ_2 = 7
    params = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([12.0])]
    hook = CRFL(sigma=0.0, rho_slope=0.5, rho_offset=6.0)
    gen = torch.Generator()
    assert torch.equal(hook(params, round=0, generator=gen)[1], torch.tensor([6.0]))
    assert _norm(hook(params, round=1, generator=gen)) == pytest.approx(7.0, rel=1e-7)


def test_last_round_is_clipped_not_noised():
    params = [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([12.0])]
    hook = CRFL(sigma=0.1, rho_slope=0.5, rho_offset=6.0, rounds=3)
    gen = torch.Generator().manual_seed(0)
    last = hook(params, round=2, generator=gen)  # ρ_3 = 7.5
    assert _norm(last) == pytest.approx(7.5, rel=1e-7)
    noisy = hook(params, round=1, generator=gen)
    assert _norm(noisy) != pytest.approx(7.0, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=math.nan), "sigma"),
        (dict(sigma=math.inf), "sigma"),
        (dict(rho_slope=-1.0), "rho_slope"),
        (dict(rho_offset=0.0), "rho_offset"),
        (dict(rho_max=-1.0), "rho_max"),
        (dict(rounds=0), "rounds"),
    ],
)
def test_crfl_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        CRFL(**kwargs)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(attack_round=5, rounds=4), "attack_round"),
        (dict(lr=0.0), "lr"),
        (dict(local_steps=0), "local_steps"),
        (dict(num_attackers=6), "num_attackers"),
        (dict(attacker_weights=(0.1, 0.1)), "attacker_weights"),
        (dict(poison_ratio=0.0), "poison_ratio"),
        (dict(scale_factor=-1.0), "scale_factor"),
        (dict(lipschitz=0.0), "lipschitz"),
    ],
)
def test_threat_model_rejects_bad_settings(kwargs, fragment):
    base = dict(rounds=4, attack_round=2, lr=0.1, local_steps=3, num_clients=5)
    with pytest.raises(ValueError, match=fragment):
        ThreatModel(**{**base, **kwargs})


def test_other_inputs_checked():
    with pytest.raises(ValueError, match="max_norm"):
        clip_global_norm([torch.ones(2)], 0.0)
    with pytest.raises(ValueError, match="alpha"):
        hoeffding_bounds(torch.tensor([[3, 1]]), alpha=1.0)
    with pytest.raises(ValueError, match="votes"):
        hoeffding_bounds(torch.tensor([[3, 1], [2, 1]]), alpha=0.01)
    with pytest.raises(ValueError, match="probabilities"):
        certified_radius(1.5, 0.1, defense=CRFL(), threat=_reference_threat())


# ---------------------------------------------------------------- bounds and radius by hand


def test_hoeffding_bounds_by_hand():
    counts = torch.tensor([[900, 80, 20], [500, 500, 0], [0, 3, 997]])
    top, pa, runner, pb = hoeffding_bounds(counts, alpha=0.001)
    # A and B are chosen from these votes: Bonferroni over the 2K = 6 one-sided bounds, each
    # at level α/6, so Hoeffding's exp(−2Mε²) = α/6 gives ε = sqrt(ln(6/α) / 2M) = 0.065953
    # (the reference's uncorrected sqrt(ln(1/α) / 2M) = 0.058773 does not hold at 1 − α)
    eps = math.sqrt(math.log(6 / 0.001) / (2 * 1000))
    assert eps == pytest.approx(0.065953, abs=1e-6)
    assert top.tolist() == [0, 0, 2] and runner.tolist() == [1, 1, 1]  # ties: lowest index
    assert pa.tolist() == pytest.approx([0.9 - eps, 0.5 - eps, 0.997 - eps], abs=1e-12)
    # p_B upper is also capped at 1 − p_A lower (Σ p = 1): row 1, 0.5 + ε = 1 − (0.5 − ε)
    assert pb.tolist() == pytest.approx([0.08 + eps, 0.5 + eps, 0.003 + eps], abs=1e-12)
    floor = hoeffding_bounds(torch.tensor([[1, 1, 0]]), alpha=0.001)  # 0.5 - 1.4 < 0
    assert float(floor[1]) == 1e-8 and float(floor[3]) == 1 - 1e-8


def test_bounds_with_a_selection_sample_by_hand():
    # Cohen et al. 2019's CERTIFY: A from independent votes, so no correction for choosing A;
    # α/2 to p_A, α/2 spread over the K − 1 = 2 other classes' upper bounds
    counts = torch.tensor([[900, 80, 20], [300, 600, 100]])
    selection = torch.tensor([[10, 0, 0], [9, 1, 0]])  # row 1: selection picks class 0
    top, pa, runner, pb = hoeffding_bounds(counts, alpha=0.001, selection=selection)
    eps_a = math.sqrt(math.log(2 / 0.001) / 2000)  # 0.061648
    eps_b = math.sqrt(math.log(4 / 0.001) / 2000)  # 0.064397
    assert (eps_a, eps_b) == pytest.approx((0.061648, 0.064397), abs=1e-6)
    assert top.tolist() == [0, 0] and runner.tolist() == [1, 1]
    assert pa.tolist() == pytest.approx([0.9 - eps_a, 0.3 - eps_a], abs=1e-12)
    # row 1: 0.6 + ε_B = 0.664 is below 1 − p_A lower = 0.762: the cap does not bind
    assert pb.tolist() == pytest.approx([0.08 + eps_b, 0.6 + eps_b], abs=1e-12)
    with pytest.raises(ValueError, match="selection votes must be"):
        hoeffding_bounds(counts, alpha=0.001, selection=selection[:1])


def test_clopper_pearson_bounds_by_hand():
    # all M votes for one class: the exact lower bound solves p^M = ℓ, p = ℓ^(1/M); no vote
    # for the runner-up: the upper bound solves (1 − p)^M = ℓ, p = 1 − ℓ^(1/M)
    # (Clopper and Pearson 1934); Bonferroni level ℓ = α / (2K) = 0.01 / 4
    m, alpha = 50, 0.01
    top, pa, runner, pb = top_two_bounds(
        torch.tensor([[m, 0]]), alpha=alpha, method="clopper_pearson"
    )
    level = alpha / 4
    assert float(pa) == pytest.approx(level ** (1 / m), rel=1e-9)
    assert float(pb) == pytest.approx(1 - level ** (1 / m), rel=1e-9)
    # 1 vote of 2 (M = 2): P(k >= 1 | p) = 1 − (1 − p)² = ℓ gives p = 1 − sqrt(1 − ℓ)
    _, pa, _, pb = top_two_bounds(torch.tensor([[1, 1]]), alpha=alpha, method="clopper_pearson")
    assert float(pa) == pytest.approx(1 - math.sqrt(1 - level), rel=1e-9)
    assert float(pb) == pytest.approx(1 - float(pa), rel=1e-9)  # capped at 1 − p_A lower
    with pytest.raises(ValueError, match="unknown bound 'wilson'; valid: hoeffding"):
        top_two_bounds(torch.tensor([[1, 1]]), alpha=alpha, method="wilson")


def _simulated_votes(p: list[float], trials: int, m: int, seed: int) -> torch.Tensor:
    """(trials, K) vote counts: each row M draws from the known class probabilities p."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.tensor(p), trials * m, replacement=True, generator=g)
    return F.one_hot(draws.reshape(trials, m), len(p)).sum(1)


def _failure_rate(p, counts, top, pa, pb) -> float:
    """Share of trials whose certificate is wrong: p_A < p_A lower or max_{c≠A} p_c > p_B upper."""
    probs = torch.tensor(p, dtype=torch.float64)
    p_top = probs[top]
    others = probs.expand(len(top), -1).scatter(1, top[:, None], -1.0).max(1).values
    return float(((p_top < pa) | (others > pb)).double().mean())


@pytest.mark.parametrize("method", ["clopper_pearson", "hoeffding"])
@pytest.mark.parametrize("p", [[0.5, 0.5], [0.4, 0.4, 0.2]])
def test_coverage_at_the_stated_level_when_the_classes_are_chosen_from_the_votes(p, method):
    """With no true top class (p known), choosing A as the most voted class biases p_A
    upwards: exact per-class bounds at level α then fail in ~2α of the trials for K = 2
    (whichever class wins, its share is the maximum of two); the corrected bounds fail in at
    most α, up to the binomial spread of the simulation (sd sqrt(α(1 − α)/T) = 0.0063).
    Measured with these seeds: uncorrected Clopper-Pearson fails in 0.38 (K = 2) and 0.52
    (K = 3) of the trials, the corrected bounds in 0.08. Hoeffding's slack for shares far
    from 1/2 hides the bias in simulation (uncorrected: 0.08 and 0.13), so for Hoeffding the
    hand-computed ε of test_hoeffding_bounds_by_hand is the check that can fail."""
    alpha, trials, m = 0.2, 4000, 100
    counts = _simulated_votes(p, trials, m, seed=len(p))
    top, pa, _, pb = top_two_bounds(counts, alpha=alpha, method=method)
    assert _failure_rate(p, counts, top, pa, pb) <= alpha + 3 * math.sqrt(alpha * 0.8 / trials)


@pytest.mark.parametrize("p", [[0.5, 0.5], [0.4, 0.4, 0.2]])
def test_coverage_with_a_separate_selection_sample(p):
    alpha, trials, m = 0.2, 4000, 100
    counts = _simulated_votes(p, trials, m, seed=10 + len(p))
    selection = _simulated_votes(p, trials, 20, seed=20 + len(p))  # independent votes
    top, pa, _, pb = top_two_bounds(
        counts, alpha=alpha, selection=selection, method="clopper_pearson"
    )
    assert torch.equal(top, selection.argmax(1))
    assert _failure_rate(p, counts, top, pa, pb) <= alpha + 3 * math.sqrt(alpha * 0.8 / trials)


def _reference_threat(**kw) -> ThreatModel:
    """The reference's MNIST setting: N = 20 clients of 3000 images, batch 100 (τ = 30),
    η = 0.001, one attacker at t_adv = 10 scaling by γ = 10, 5 poisoned images per batch."""
    base = dict(
        rounds=100,
        attack_round=10,
        lr=0.001,
        local_steps=30,
        num_clients=20,
        scale_factor=10.0,
        poison_ratio=0.05,
    )
    return ThreatModel(**{**base, **kw})


def test_radius_by_hand_reference_mnist_setting():
    # σ = 0.01, ρ_t = 0.1 t + 2: every contraction 2Φ(ρ_t/σ) − 1 = 2Φ(≥ 210) − 1 = 1.
    # L_Z² = 2 + 2ρ + ρ² with ρ = ρ_10 = 3: 17 (reference hard-wires rho_tadv = 3).
    # Denominator 2 R Σp² τ² L_Z² γ² η² (q/n)² = 2 · 1 · (1/20)² · 30² · 17 · 10² · 0.001² · 0.05²
    denominator = 2 * 1 * 0.05**2 * 900 * 17 * 100 * 1e-6 * 0.0025
    assert denominator == pytest.approx(1.9125e-5)
    pa, pb = 0.9, 0.05
    budget = -math.log(1 - (math.sqrt(pa) - math.sqrt(pb)) ** 2)
    expected = math.sqrt(budget * 0.01**2 / denominator)
    got = certified_radius(pa, pb, defense=CRFL(), threat=_reference_threat())
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # the same number by hand, digit by digit, from RAD² = −ln(1 − (√p_A − √p_B)²)·σ² / denominator:
    #   (√0.9 − √0.05)² = 0.9 + 0.05 − 2√(0.9·0.05) = 0.95 − 2·0.2121320 = 0.5257359
    #   −ln(1 − 0.5257359) = −ln(0.4742641) = 0.7459910
    #   RAD² = 0.7459910 · 0.01² / 1.9125e-5 = 3.900607, RAD = √3.900607 = 1.974995
    assert float(got) == pytest.approx(1.974995, rel=1e-6)


def test_radius_by_hand_with_active_contraction():
    # σ = 0.5 so that the contractions bite; ρ_t = 0.5 t + 1; T = 4, t_adv = 2:
    # Π = (2Φ(ρ_3/σ) − 1) for t = 3 (= t_adv+1 .. T−1) times (2Φ(ρ_4/σ_T) − 1) for round T.
    defense = CRFL(sigma=0.5, rho_slope=0.5, rho_offset=1.0)
    threat = ThreatModel(
        rounds=4,
        attack_round=2,
        lr=0.1,
        local_steps=3,
        num_clients=5,
        num_attackers=2,
        scale_factor=2.0,
        poison_ratio=0.25,
    )
    rho2, rho3, rho4 = 2.0, 2.5, 3.0
    contraction = (2 * PHI(rho3 / 0.5) - 1) * (2 * PHI(rho4 / 1.0) - 1)
    lz2 = 2 + 2 * rho2 + rho2**2  # 10
    weights2 = 2 * 0.2**2  # two attackers of weight 1/5
    denominator = 2 * 2 * weights2 * 3**2 * lz2 * 2.0**2 * 0.1**2 * 0.25**2 * contraction
    pa = torch.tensor([0.8, 0.6, 0.3])
    pb = torch.tensor([0.1, 0.3, 0.3])
    expected = [
        math.sqrt(-math.log(1 - (math.sqrt(a) - math.sqrt(b)) ** 2) * 0.5**2 / denominator)
        for a, b in zip(pa.tolist(), pb.tolist())
    ]
    got = certified_radius(pa, pb, defense=defense, threat=threat, sigma_test=1.0)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, rel=1e-9)
    assert float(got[2]) == 0.0  # p_A = p_B: nothing certified
    weighted = dataclasses.replace(threat, attacker_weights=(0.2, 0.2), lipschitz=10**0.5)
    assert certified_radius(pa, pb, defense=defense, threat=weighted, sigma_test=1.0).tolist() == (
        pytest.approx(expected, rel=1e-9)
    )


# ---------------------------------------------------------------- certify end to end


class _Toy(nn.Module):
    """Logits = W x + b on 2-pixel inputs; 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.0], [-10.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, -100.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_certify_toy_model_by_hand():
    # sample 0: x = (1, 0), logits (10, 0, -110): a margin of 10 >> σ = 0.1 noise, so all M
    #   votes go to class 0: p_A lower = 1 − ε, p_B upper = 0 + ε, certified.
    # sample 1: x = (0, 0), logits = noisy biases (0, 0, −100): classes 0 and 1 split the
    #   votes about evenly, p_A lower < p_B upper: abstain, radius 0.
    model = _Toy()
    images = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    labels = torch.tensor([0, 1])
    m, alpha, sigma = 400, 0.001, 0.1
    defense = CRFL(sigma=sigma)
    threat = _reference_threat()
    res = certify(
        model,
        images,
        labels,
        defense=defense,
        threat=threat,
        num_models=m,
        alpha=alpha,
        generator=torch.Generator().manual_seed(0),
    )
    eps = math.sqrt(math.log(2 * 3 / alpha) / (2 * m))  # Bonferroni over 2K = 6 bounds
    assert res.counts[0].tolist() == [m, 0, 0]
    assert int(res.counts[1].sum()) == m and int(res.counts[1, 2]) == 0
    assert float(res.pa_lower[0]) == pytest.approx(1 - eps)
    assert float(res.pb_upper[0]) == pytest.approx(eps)
    budget = -math.log(1 - (math.sqrt(1 - eps) - math.sqrt(eps)) ** 2)
    # σ_T = σ = 0.1, ρ_T = 12: 2Φ(120) − 1 = 1; training contractions also 1 (ρ_t/σ >= 21)
    denominator = 2 * 0.05**2 * 900 * 17 * 100 * 1e-6 * 0.0025
    assert float(res.radius[0]) == pytest.approx(math.sqrt(budget * 0.1**2 / denominator))
    assert res.prediction.tolist() == [0, -1] and res.correct.tolist() == [True, False]
    assert float(res.radius[1]) == 0.0
    assert int(res.top_class[1]) in (0, 1)
    # the votes are exactly those of M hand-made noisy copies drawn in parameter order
    g = torch.Generator().manual_seed(0)
    base = [p.detach().clone() for p in model.parameters()]
    by_hand = torch.zeros(2, 3, dtype=torch.int64)
    for _ in range(m):
        w, b = add_gaussian_noise(base, sigma, generator=g)
        pred = (images.flatten(1) @ w.T + b).argmax(1)
        by_hand[torch.arange(2), pred] += 1
    assert torch.equal(res.counts, by_hand)
    assert torch.equal(model.fc.weight, base[0])  # the model is not modified


def test_smoothed_votes_batching_does_not_change_counts():
    model = build_model("mlp", in_shape=(1, 4, 4), depth=2, width=8)
    images = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    votes = [
        smoothed_votes(
            model,
            images,
            sigma=0.3,
            num_models=20,
            generator=torch.Generator().manual_seed(1),
            batch_size=bs,
        )
        for bs in (3, 10)
    ]
    assert torch.equal(votes[0], votes[1]) and votes[0].sum(1).tolist() == [20] * 10


def test_certified_accuracy_by_hand():
    counts = torch.tensor([[1000, 0], [1000, 0], [550, 450], [0, 1000]])
    labels = torch.tensor([0, 1, 0, 1])
    res = certify_votes(counts, labels, defense=CRFL(), threat=_reference_threat())
    # row 0: correct, certified; row 1: wrong; row 2: 0.55 − ε < 0.45 + ε → abstain; row 3: correct
    assert res.prediction.tolist() == [0, 0, -1, 1]
    r = float(res.radius[0])
    assert r > 0 and float(res.radius[3]) == r
    assert certified_accuracy(res, [0.0, r / 2, r, r * 1.001]) == [0.5, 0.5, 0.5, 0.0]


# ---------------------------------------------------------------- with the FL core


def _server(crfl: CRFL, seed: int) -> tuple[Server, list[float], list[float]]:
    """3 FedAvg clients on 24 random 1x4x4 images; records the global norm before and after CRFL."""
    g = torch.Generator().manual_seed(100)
    images = torch.rand(24, 1, 4, 4, generator=g)
    labels = torch.randint(3, (24,), generator=g)
    training = LocalTraining("fedavg", batch_size=4, local_steps=2, lr=0.5)
    clients = [Client(i, images[i::3], labels[i::3], training=training) for i in range(3)]
    init = torch.Generator().manual_seed(0)
    model = build_model("mlp", num_classes=3, in_shape=(1, 4, 4), depth=1, generator=init)
    before: list[float] = []
    after: list[float] = []

    def record(parameters, *, round, generator):
        before.append(_norm(parameters))
        return parameters

    def evaluate(m: nn.Module) -> dict[str, float]:
        after.append(_norm(m.parameters()))
        return {"norm": after[-1]}

    server = Server(model, clients, post_aggregation=[record, crfl], evaluate=evaluate, seed=seed)
    return server, before, after


@pytest.mark.parametrize("offset, clipped", [(0.2, [True, False, False, True]), (5.0, [False] * 4)])
def test_server_rounds_follow_the_norm_schedule(offset, clipped):
    # mlp depth 1 on 1x4x4 inputs: 3·16 + 3 = 51 parameters; ρ_t = 0.1 t + offset, t = round + 1
    server, before, after = _server(CRFL(sigma=0.0, rho_slope=0.1, rho_offset=offset), seed=0)
    server.run(4)
    rho = [0.1 * t + offset for t in (1, 2, 3, 4)]
    assert [b > r for b, r in zip(before, rho)] == clipped
    assert after == pytest.approx([min(b, r) for b, r in zip(before, rho)], rel=1e-6)


def test_server_last_round_clipped_only_earlier_rounds_noised():
    server, before, after = _server(
        CRFL(sigma=0.01, rho_slope=0.0, rho_offset=0.1, rounds=3), seed=0
    )
    server.run(3)
    assert min(before) > 0.1
    assert after[2] == pytest.approx(0.1, rel=1e-6)  # θ_T: clipped, not noised
    # earlier rounds: ‖clip + noise‖² ≈ ρ² + 51 σ² = 0.01 + 0.0051 (spread ≈ 0.002), not ρ²
    for norm in after[:2]:
        assert norm != pytest.approx(0.1, rel=1e-3)
        assert abs(norm**2 - (0.1**2 + 51 * 0.01**2)) < 0.006


def test_server_noise_comes_from_the_server_generator_and_is_reproducible():
    noisy = _server(CRFL(sigma=0.01, rho_offset=0.3), seed=5)[0]
    clean = _server(CRFL(sigma=0.0, rho_offset=0.3), seed=5)[0]
    noisy.run_round()
    clean.run_round()
    g = round_generator(5, 0, SERVER_STREAM)
    for a, b in zip(noisy.model.parameters(), clean.model.parameters()):
        assert torch.allclose(a - b, 0.01 * torch.randn(a.shape, generator=g), atol=1e-7)
    runs = [_server(CRFL(sigma=0.01, rho_offset=0.3), seed=s)[0] for s in (5, 5, 6)]
    for server in runs:
        server.run(2)
    first, again, other = (list(s.model.parameters()) for s in runs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
