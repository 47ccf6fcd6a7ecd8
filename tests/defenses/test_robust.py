"""Robust aggregation rules: oracles, invariants, parameter checks and the server hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defenses.robust import (
    AGGREGATORS,
    FoolsGold,
    RobustAggregator,
    bulyan,
    centered_clipping,
    foolsgold_weights,
    geometric_median,
    krum,
    make_aggregator,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)
from fl_core.client import Client, LocalTraining
from fl_core.models import build_model
from fl_core.server import Server
from fl_core.types import Update

# Oracles: what Flower's aggregate_median, aggregate_krum and aggregate_trimmed_avg
# (adap/flower, src/py/flwr/server/strategy/aggregate.py) return on this X
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _foolsgold(updates, *, weights=None):
    """FoolsGold as a pure rule for the parametrized tests: a fresh instance, ids 0..n-1."""
    return FoolsGold()(updates, client_ids=range(len(updates)), weights=weights)


# name -> (rule taking (updates, weights=), params); f = 2 so Bulyan needs n >= 11
RULES = {
    "mean": (mean, {}),
    "median": (median, {}),
    "trimmed_mean": (trimmed_mean, {"beta": 0.2}),
    "krum": (krum, {"f": 2}),
    "multi_krum": (multi_krum, {"f": 2}),
    "geometric_median": (geometric_median, {}),
    "bulyan": (bulyan, {"f": 2}),
    "centered_clipping": (centered_clipping, {"tau": 1.0, "iterations": 3}),
    "foolsgold": (_foolsgold, {}),
}


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    "rule, params, expected",
    [
        (median, {}, [4.0, 5.0, 6.0]),
        (krum, {"f": 0}, [1.0, 2.0, 3.0]),  # all scores 27: Flower's argmin keeps the first
        (multi_krum, {"f": 0, "m": 1}, [1.0, 2.0, 3.0]),
        (trimmed_mean, {"beta": 1 / 3}, [4.0, 5.0, 6.0]),
        (mean, {}, [4.0, 5.0, 6.0]),
        (bulyan, {"f": 0}, [4.0, 5.0, 6.0]),  # f = 0: all selected, all kept: the mean
    ],
)
def test_flower_oracles(rule, params, expected):
    torch.testing.assert_close(rule(X, **params), torch.tensor(expected), rtol=0, atol=0)


def test_geometric_median_oracle():
    torch.testing.assert_close(
        geometric_median(X), torch.tensor([4.0, 5.0, 6.0]), atol=1e-4, rtol=0
    )


def test_weighted_mean_is_fedavg():
    out = mean(X, weights=torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([4.75, 5.75, 6.75]))


@pytest.mark.parametrize("n", [4, 7])
def test_median_matches_numpy_for_even_and_odd_n(n):
    x = _randn(n, 6, seed=n)
    np.testing.assert_allclose(median(x).numpy(), np.median(x.numpy(), axis=0), rtol=0, atol=0)


@pytest.mark.parametrize("n, beta", [(10, 0.2), (10, 0.25), (7, 0.1), (9, 0.49)])
def test_trimmed_mean_matches_scipy(n, beta):
    stats = pytest.importorskip("scipy.stats")
    x = _randn(n, 5, seed=n)
    expected = stats.trim_mean(x.numpy(), beta, axis=0)
    np.testing.assert_allclose(trimmed_mean(x, beta=beta).numpy(), expected, rtol=1e-12)


def _flower_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Scores as Flower's aggregate_krum computes them (argsort, skip position 0)."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = max(1, len(x) - f - 2)
    return np.array([d[i, np.argsort(d[i])[1 : k + 1]].sum() for i in range(len(x))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_and_weighted_multi_krum_match_flower(seed):
    x = _randn(9, 4, seed=seed)
    w = torch.arange(1.0, 10.0)
    scores = _flower_krum_scores(x.numpy(), f=2)
    torch.testing.assert_close(krum(x, f=2), x[int(np.argmin(scores))])
    keep = np.argsort(scores)[:5]
    expected = (w[keep, None] * x[keep]).sum(0) / w[keep].sum()  # Flower's aggregate()
    torch.testing.assert_close(multi_krum(x, f=2, m=5, weights=w), expected)


def _flower_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """Flower's aggregate_bulyan with aggregate_krum, transcribed for a single layer."""
    rest = list(x)
    selected = []
    for _ in range(len(x) - 2 * f):
        best = int(np.argmin(_flower_krum_scores(np.array(rest), f)))
        selected.append(rest.pop(best))
    s = np.array(selected)
    beta = len(s) - 2 * f
    idx = np.argpartition(np.abs(np.median(s, axis=0) - s), kth=beta - 1, axis=0)
    return np.take_along_axis(s, idx, axis=0)[:beta].mean(0)


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2), (12, 2)])
def test_bulyan_matches_flower(n, f):
    x = _randn(n, 6, seed=n)
    np.testing.assert_allclose(bulyan(x, f=f).numpy(), _flower_bulyan(x.numpy(), f), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_geometric_median_satisfies_the_weighted_optimality_condition(seed):
    # the weighted geometric median z zeroes Σ α_i (z − x_i)/‖z − x_i‖ (Weiszfeld's fixed point)
    x = _randn(8, 3, seed=seed)
    w = torch.rand(8, generator=_gen(seed), dtype=torch.float64) + 0.1
    z = geometric_median(x, weights=w, tol=1e-12, max_iter=10_000)
    diff = z - x
    grad = (w[:, None] * diff / diff.norm(dim=1, keepdim=True)).sum(0) / w.sum()
    assert grad.norm() < 1e-6


def test_centered_clipping_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.5]])  # from 0: norms 5 (clipped to 1) and 0.5
    torch.testing.assert_close(centered_clipping(x, tau=1.0), torch.tensor([0.3, 0.65]))
    center = torch.tensor([0.0, 0.5])
    # from (0, .5): differences (3, 3.5) clipped to norm 1 and (0, 0)
    expected = center + 0.5 * torch.tensor([3.0, 3.5]) / torch.tensor([3.0, 3.5]).norm()
    torch.testing.assert_close(centered_clipping(x, tau=1.0, center=center), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_return_the_input_dtype_and_shape(name, dtype):
    rule, params = RULES[name]
    out = rule(_randn(11, 5, dtype=dtype), **params)
    assert out.shape == (5,) and out.dtype == dtype


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", sorted(RULES))
def test_permutation_invariance(name):
    rule, params = RULES[name]
    if name == "bulyan":
        # Bulyan's last Krum round runs on 2f + 1 updates with max(1, f - 1) neighbours: for
        # f <= 2 that is 1 neighbour, where mutual nearest neighbours tie exactly and the
        # lowest-index rule (client order) decides. f = 3 keeps every round tie-free.
        params = {"f": 3}
    x = _randn(15, 5, seed=3)  # continuous data: no exact ties, so tie rules do not matter
    w = torch.arange(1.0, 16.0, dtype=torch.float64)
    perm = torch.randperm(15, generator=_gen(4))
    if name == "foolsgold":
        out = FoolsGold()(x, client_ids=list(range(15)), weights=w)
        out_p = FoolsGold()(x[perm], client_ids=perm.tolist(), weights=w[perm])
    else:
        out, out_p = rule(x, weights=w, **params), rule(x[perm], weights=w[perm], **params)
    torch.testing.assert_close(out, out_p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_single_client_gets_its_own_update(name):
    if name in ("krum", "multi_krum", "bulyan"):
        pytest.skip(f"{name} needs n >= 2f + 3 (Bulyan 4f + 3) >= 3 updates")
    rule, params = RULES[name]
    x = _randn(1, 5, seed=5)  # norm < 3: centered clipping reaches it in 3 steps of tau = 1
    torch.testing.assert_close(rule(x, **params), x[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(RULES) - {"foolsgold"}))
def test_bounded_under_f_huge_outliers(name):
    rule, params = RULES[name]
    honest = 1.0 + 0.1 * _randn(9, 5, seed=6)  # (9, 5) around (1, ..., 1), norms ~2.2
    outliers = 1e6 * torch.tensor([[1.0] * 5, [1.0, -1.0, 1.0, -1.0, 1.0]]).double()  # f = 2
    x = torch.cat([honest, outliers])  # n = 11 = 4f + 3
    out = rule(x, **params)
    bound = honest.norm(dim=1).max()
    if name == "mean":
        assert out.norm() > 1e4 * bound  # the control: the plain mean is dragged away
    else:
        assert out.norm() <= 1.5 * bound


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: krum(_randn(4, 2), f=1), "krum needs n >= 2f + 3 (n=4, f=1)"),
        (lambda: krum(_randn(6, 2), f=2), "krum needs n >= 2f + 3 (n=6, f=2)"),
        (lambda: multi_krum(_randn(4, 2), f=1), "multi_krum needs n >= 2f + 3 (n=4, f=1)"),
        (lambda: multi_krum(_randn(5, 2), f=1, m=6), "multi_krum needs m <= n (n=5, m=6)"),
        (lambda: multi_krum(_randn(5, 2), f=1, m=0), "multi_krum needs m >= 1"),
        (lambda: bulyan(_randn(6, 2), f=1), "bulyan needs n >= 4f + 3 (n=6, f=1)"),
        (lambda: bulyan(_randn(10, 2), f=2), "bulyan needs n >= 4f + 3 (n=10, f=2)"),
        (lambda: krum(_randn(5, 2), f=-1), "krum needs f (the number of Byzantine clients) >= 0"),
        (lambda: trimmed_mean(X, beta=0.5), "trimmed_mean needs 0 <= beta < 0.5"),
        (lambda: trimmed_mean(X, beta=-0.1), "trimmed_mean needs 0 <= beta < 0.5"),
        (lambda: trimmed_mean(X, beta=0.7), "trimmed_mean needs 0 <= beta < 0.5"),
        (lambda: centered_clipping(X, tau=0.0), "centered_clipping needs tau > 0"),
        (lambda: geometric_median(X, nu=0.0), "geometric_median needs nu > 0"),
        (lambda: mean(X, weights=torch.ones(2)), "mean needs one weight per update"),
        (lambda: median(X[0]), "median needs updates of shape (n, d)"),
        (lambda: FoolsGold(confidence=0), "foolsgold needs confidence > 0"),
        (lambda: FoolsGold()(X, client_ids=[0, 0, 1]), "foolsgold needs one distinct client id"),
    ],
)
def test_invalid_parameters_are_rejected_in_one_line(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_krum_and_bulyan_accept_the_smallest_allowed_n():
    assert krum(_randn(5, 2), f=1).shape == (2,)
    assert bulyan(_randn(7, 2), f=1).shape == (2,)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("nope", {}, "unknown robust aggregator 'nope'; valid names: bulyan,"),
        ("krum", {"beta": 0.1}, "unknown parameter(s) beta for krum; valid parameters: f"),
        ("krum", {}, "krum needs parameter(s) f"),
        ("centered_clipping", {"center": None}, "valid parameters: tau, iterations"),
        ("trimmed_mean", {"beta": 0.5}, "trimmed_mean needs 0 <= beta < 0.5"),
        ("foolsgold", {"confidence": -1.0}, "foolsgold needs confidence > 0"),
    ],
)
def test_make_aggregator_checks_names_and_values(name, params, message):
    with pytest.raises(ValueError) as info:
        make_aggregator(name, **params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_every_registered_rule_builds_with_its_required_parameters():
    required = {"trimmed_mean": {"beta": 0.1}, "krum": {"f": 0}, "multi_krum": {"f": 0}}
    required |= {"bulyan": {"f": 0}, "centered_clipping": {"tau": 1.0}}
    for name in AGGREGATORS:
        assert make_aggregator(name, **required.get(name, {})).rule == name


# ----------------------------------------------------------------------------- FoolsGold


def test_foolsgold_weights_zero_identical_histories():
    h = torch.cat([torch.eye(3, 8).double(), torch.ones(3, 8).double()])  # 3 orthogonal, 3 equal
    w = foolsgold_weights(h)
    assert torch.all(w[3:] == 0) and torch.all(w[:3] == 1)
    assert torch.all(foolsgold_weights(torch.ones(4, 3)) == 0)  # all sybils: no weight at all


def test_foolsgold_down_weights_sybils_under_client_sampling():
    # clients 0-2 honest (independent directions), 3-5 sybils sending the same update
    d, fg, g = 40, FoolsGold(), _gen(7)
    sybil = 3.0 * torch.ones(d, dtype=torch.float64)
    for _ in range(4):
        ids = sorted(torch.randperm(6, generator=g)[:4].tolist())  # 4 of 6: >= 1 honest
        honest = {c: torch.randn(d, generator=g, dtype=torch.float64) for c in ids if c < 3}
        x = torch.stack([honest[c] if c < 3 else sybil for c in ids])
        out = fg(x, client_ids=ids)
        weights = dict(zip(ids, fg.last_weights.tolist()))
        assert all(weights[c] < 1e-9 for c in ids if c >= 3)
        honest_mean = torch.stack(list(honest.values())).mean(0)
        torch.testing.assert_close(out, honest_mean, rtol=0, atol=1e-9)
    # a round with one sybil only: its history still matches its absent twins'
    x = torch.stack([torch.randn(d, generator=g, dtype=torch.float64), sybil])
    fg(x, client_ids=[0, 4])
    assert fg.last_weights[1] < 1e-9


def test_foolsgold_history_is_keyed_by_client_id():
    fg = FoolsGold()
    r1, r2 = _randn(3, 4, seed=8), _randn(2, 4, seed=9)
    fg(r1, client_ids=[10, 11, 12])
    fg(r2, client_ids=[11, 10])  # client 12 skips round 2
    torch.testing.assert_close(fg.history[10], r1[0] + r2[1])
    torch.testing.assert_close(fg.history[11], r1[1] + r2[0])
    torch.testing.assert_close(fg.history[12], r1[2])


# ----------------------------------------------------------------------------- server hook


def _server_round(aggregator, sizes=(2, 3, 4, 5)):
    model = build_model("lenet", in_shape=(1, 8, 8), num_classes=3, generator=_gen(10))
    clients = []
    for i, n in enumerate(sizes):
        g = _gen(100 + i)
        images, labels = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        # batch 2: every update is computed on 2 samples, but reports its client's n_k as
        # its weight (McMahan et al. 2017), so the weighted rules must read ``weight``
        clients.append(Client(i, images, labels, training=LocalTraining("fedsgd", batch_size=2)))
    calls: list[tuple[list[Update], tuple[torch.Tensor, ...]]] = []

    def recording(updates):
        out = aggregator(updates)
        calls.append((list(updates), out))
        return out

    server = Server(model, clients, aggregator=recording)
    return model, server, calls


@pytest.mark.parametrize(
    "name, params",
    [
        ("mean", {}),
        ("median", {}),
        ("trimmed_mean", {"beta": 0.25}),
        ("multi_krum", {"f": 0, "m": 2}),
        ("geometric_median", {}),
        ("centered_clipping", {"tau": 0.1}),
        ("foolsgold", {}),
    ],
)
def test_robust_aggregator_in_a_server_round(name, params, torch_single_thread):
    model, server, calls = _server_round(make_aggregator(name, **params))
    before = [p.detach().clone() for p in model.parameters()]
    server.run_round()
    ((updates, out),) = calls
    assert [t.shape for t in out] == [p.shape for p in model.parameters()]
    x = torch.stack([u.flat for u in updates])  # (4, d)
    assert [u.num_samples for u in updates] == [2, 2, 2, 2]
    w = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # the clients' sizes n_k
    if name == "foolsgold":
        expected = FoolsGold()(x, client_ids=[u.client_id for u in updates], weights=w)
    else:
        expected = AGGREGATORS[name](x, weights=w, **params)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out]), expected)
    for old, new, a in zip(before, model.parameters(), out):  # FedSGD: θ ← θ − lr·aggregate
        torch.testing.assert_close(new.detach(), old - a)


def test_centered_clipping_aggregator_starts_at_the_previous_aggregate(torch_single_thread):
    agg = make_aggregator("centered_clipping", tau=0.05)
    _, server, calls = _server_round(agg)
    server.run(2)
    (u1, a1), (u2, a2) = calls
    flat = [torch.cat([t.reshape(-1) for t in a]) for a in (a1, a2)]
    x2 = torch.stack([u.flat for u in u2])
    w2 = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # the clients' sizes n_k
    torch.testing.assert_close(flat[1], centered_clipping(x2, weights=w2, tau=0.05, center=flat[0]))


def test_krum_aggregator_checks_n_at_call_time():
    agg = RobustAggregator("krum", f=1)  # fine until it meets a round of 4 clients
    _, server, _ = _server_round(agg)
    with pytest.raises(ValueError, match=r"krum needs n >= 2f \+ 3 \(n=4, f=1\)"):
        server.run_round()


# ----------------------------------------------------------------------------- BatchNorm buffers

# Seven clients' parameter updates (d = 2), drawn by hand so that Krum's choice follows from
# hand arithmetic (f = 1, n − f − 2 = 4 neighbours, squared distances):
#   c0 (0, 0): 0.25 + 0.25 (c5) + 0.5525 (c6) + 1 + 1 (c1..c4)         -> 3.0525, the lowest
#   c5 (0.5, 0.5): 0.5 (c0) + 0.5 (c1) + 0.5 (c3) + 2.1025 (c6)        -> 3.6025
#   c6 (−0.5, −0.55): 0.4525 (c4) + 0.5525 (c0) + 0.5525 (c2) + 2.1025 -> 3.66
#   c1..c4 (±1, 0), (0, ±1): 5.5 or more
# c6 is the poisoner: ordinary parameters, BatchNorm statistics of 1e6.
PARAMS = [(0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (0.5, 0.5), (-0.5, -0.55)]
HUGE = 1e6


def _bn_updates() -> list[Update]:
    """Client i's buffers: running_mean (0.1 i, −0.1 i), running_var (1 + 0.1 i, 1 + 0.1 i);
    the poisoner (client 6) sends running_mean (1e6, −1e6) and running_var (1e6, 1e6)."""
    out = []
    for i, p in enumerate(PARAMS):
        if i == 6:
            mean_, var = torch.tensor([HUGE, -HUGE]), torch.tensor([HUGE, HUGE])
        else:
            mean_, var = torch.tensor([0.1 * i, -0.1 * i]), torch.full((2,), 1 + 0.1 * i)
        out.append(
            Update((torch.tensor(p),), "delta", 1, client_id=i, buffers=(mean_, var), weight=i + 1)
        )
    return out


def _buffers(rule: str, **params) -> tuple[torch.Tensor, ...]:
    _, buffers = make_aggregator(rule, **params).aggregate_with_buffers(_bn_updates())
    return buffers


def test_buffers_by_hand_under_median_and_trimmed_mean():
    # honest running means 0, .1, ..., .5 (and their negatives), the poisoner's ±1e6:
    # sorted, the median is the 4th of 7 values, .3 (−.3); trimmed mean with k = int(.2·7)
    # = 1 drops the extremes and averages .1 ... .5: also .3. Variances 1.0 ... 1.5, 1e6:
    # median 1.3, trimmed mean of 1.1 ... 1.5 = 1.3.
    for rule, params in (("median", {}), ("trimmed_mean", {"beta": 0.2})):
        mean_, var = _buffers(rule, **params)
        torch.testing.assert_close(mean_, torch.tensor([0.3, -0.3]))
        torch.testing.assert_close(var, torch.tensor([1.3, 1.3]))


def test_buffers_follow_krum_and_multi_krum_selection():
    updates = _bn_updates()
    # Krum selects c0 (score 3.0525, table above): its buffers, exactly
    mean_, var = _buffers("krum", f=1)
    assert torch.equal(mean_, updates[0].buffers[0]) and torch.equal(var, updates[0].buffers[1])
    # multi-Krum m = 2 keeps c0 and c5, averaged with their weights 1 and 6
    mean_, var = _buffers("multi_krum", f=1, m=2)
    torch.testing.assert_close(mean_, (1 * updates[0].buffers[0] + 6 * updates[5].buffers[0]) / 7)
    torch.testing.assert_close(var, (1 * updates[0].buffers[1] + 6 * updates[5].buffers[1]) / 7)


@pytest.mark.parametrize(
    "rule, params",
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 2}),
        ("bulyan", {"f": 1}),
        ("geometric_median", {}),
        ("centered_clipping", {"tau": 1.0}),
    ],
)
def test_a_poisoned_running_mean_does_not_move_robust_buffers(rule, params):
    # within the honest clients' range: running mean in [0, .5] x [−.5, 0], variance [1, 1.5]
    mean_, var = _buffers(rule, **params)
    assert 0 <= float(mean_[0]) <= 0.5 and -0.5 <= float(mean_[1]) <= 0
    assert bool(((var >= 1) & (var <= 1.5)).all())


def test_mean_buffers_are_the_weighted_mean_and_the_poisoner_moves_them():
    # FedAvg (McMahan et al. 2017): Σ w_i b_i / Σ w_i with w_i = i + 1, Σ = 28
    mean_, var = _buffers("mean")
    want_mean = sum((i + 1) * 0.1 * i for i in range(6)) / 28 + 7 * HUGE / 28
    assert float(mean_[0]) == pytest.approx(want_mean, rel=1e-6)
    assert float(var[0]) > 1e5  # not robust: the control


def test_foolsgold_buffers_use_its_client_weights():
    updates = _bn_updates()
    agg = make_aggregator("foolsgold")
    params, (mean_, _) = agg.aggregate_with_buffers(updates)
    alpha = agg._foolsgold.last_weights  # the round's normalised FoolsGold weights (n,)
    want = alpha @ torch.stack([u.buffers[0] for u in updates]).double()
    torch.testing.assert_close(mean_, want.float())
    # the tensors are those of the plain call on a fresh instance (one state step per round)
    again = make_aggregator("foolsgold")(updates)
    assert all(torch.equal(a, b) for a, b in zip(params, again))


class _PoisonedStatistics:
    """An honest client whose update carries running means of 1e6 (a BatchNorm poisoner)."""

    def __init__(self, client: Client) -> None:
        self.client, self.client_id = client, client.client_id

    def __len__(self) -> int:
        return len(self.client)

    def protocol(self):
        return self.client.protocol()

    def compute_update(self, model, *, round=0, generator):
        update, truth = self.client.compute_update(model, round=round, generator=generator)
        buffers = tuple(torch.full_like(b, HUGE) for b in update.buffers)
        return Update(update.tensors, update.kind, update.num_samples, update.client_id,
                      update.round, buffers, update.weight), truth  # fmt: skip


@pytest.mark.parametrize("rule, params", [("median", {}), ("krum", {"f": 1}), (None, {})])
def test_server_keeps_poisoned_batchnorm_statistics_out_under_robust_rules(
    rule, params, torch_single_thread
):
    shape = (3, 8, 8)
    clients = []
    for i in range(5):
        g = _gen(200 + i)
        images, labels = torch.rand(2, *shape, generator=g), torch.randint(0, 3, (2,), generator=g)
        clients.append(Client(i, images, labels, training=LocalTraining("fedsgd")))
    clients[4] = _PoisonedStatistics(clients[4])
    model = build_model("resnet20", in_shape=shape, num_classes=3, generator=_gen(11))
    seen: list = []
    kwargs = {} if rule is None else {"aggregator": make_aggregator(rule, **params)}
    Server(model, clients, listeners=[seen.append], **kwargs).run_round()
    honest = [o.update.buffers for o in seen[:4]]
    from fl_core.client import float_buffers

    for i, b in enumerate(float_buffers(model)):
        stack = torch.stack([h[i] for h in honest])  # (4, C)
        if rule is None:  # FedAvg: a fifth of 1e6 and more
            assert float(b.abs().max()) > 1e5
        else:
            assert bool(((b >= stack.min(0).values) & (b <= stack.max(0).values)).all())
    if rule == "krum":  # one honest client's statistics, exactly
        assert any(
            all(torch.equal(b, h[i]) for i, b in enumerate(float_buffers(model))) for h in honest
        )
