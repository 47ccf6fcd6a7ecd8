"""Tests for the poisoning clients of ``fl_core.adversaries``.

Expected updates come from a second computation path: a plain honest
:class:`~fl_core.client.Client` on the same data (or on data relabelled /
poisoned by hand) with a generator of the same seed, then the attack's formula
applied by hand. Formulas: FedMLSecurity (Han et al. 2023, arXiv:2306.04959) —
``zero``; ``random`` draws the weights U[−1, 1); ``flip`` sends
``w_g + (w_g − w_l)``; label flipping ``y → K − 1 − y`` or ``3 → 9, 2 → 1``
(Tolpegin et al. 2020, ESORICS; FedMLSecurity's defaults, Han et al. 2023).
Model replacement sends ``w_g + γ(w_l − w_g)``
(Bagdasaryan et al. 2020, "How To Backdoor Federated Learning", Sec. 4).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fl_core import Client, LocalTraining, Server, build_model, fedavg, round_generator
from fl_core.adversaries import (
    ADVERSARIES,
    Byzantine,
    LabelFlipping,
    LazyWorker,
    ModelReplacement,
    PixelTrigger,
    Schedule,
    apply_trigger,
    backdoor_success,
    make_adversary,
    poison_clients,
    select_malicious,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SHAPE = (1, 8, 8)
K = 3
TRAININGS = {
    "fedsgd": LocalTraining("fedsgd", batch_size=4),
    "fedavg": LocalTraining("fedavg", batch_size=4, local_steps=2, lr=0.1),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model() -> nn.Module:
    return build_model("lenet", in_shape=SHAPE, num_classes=K, generator=_gen(0))


def _client(algorithm: str = "fedavg", *, cid: int = 0, n: int = 8, seed: int = 0) -> Client:
    g = _gen(100 + seed)
    x, y = torch.rand(n, *SHAPE, generator=g), torch.randint(0, K, (n,), generator=g)
    return Client(cid, x, y, training=TRAININGS[algorithm])


def _run(client, round: int = 0, seed: int = 7, model: nn.Module | None = None):
    """``client.compute_update`` on a fresh copy of the global model."""
    work = copy.deepcopy(model if model is not None else _model())
    return client.compute_update(work, round=round, generator=_gen(seed))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _meta(u):
    return (u.kind, u.num_samples, u.weight, u.client_id, u.round)


ALGORITHMS = pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])


# --------------------------------------------------------------------------- Byzantine


@ALGORITHMS
def test_zero_mode_sends_zeros_with_honest_metadata(algorithm):
    honest, _ = _run(_client(algorithm), round=3)
    update, truth = _run(Byzantine(_client(algorithm), mode="zero"), round=3)
    assert all(not t.any() for t in update.tensors)
    assert _meta(update) == _meta(honest)
    assert len(truth.labels) == 0  # no sample was used


@ALGORITHMS
def test_flip_mode_negates_the_honest_update(algorithm):
    honest, _ = _run(_client(algorithm))
    update, _ = _run(Byzantine(_client(algorithm), mode="flip"))
    assert _same(update.tensors, [-t for t in honest.tensors])
    assert _meta(update) == _meta(honest)
    if algorithm == "fedavg":  # the model sent is w_g + (w_g - w_l)
        w_g = list(_model().parameters())
        w_l = [w + d for w, d in zip(w_g, honest.tensors)]
        sent = [w + d for w, d in zip(w_g, update.tensors)]
        for s, g, loc in zip(sent, w_g, w_l):
            torch.testing.assert_close(s, g + (g - loc))


@ALGORITHMS
@pytest.mark.parametrize("seed", [1, 2])
def test_random_mode_sends_uniform_weights_seeded(algorithm, seed):
    w_g = [p.detach() for p in _model().parameters()]
    update, _ = _run(Byzantine(_client(algorithm), mode="random"), seed=seed)
    again, _ = _run(Byzantine(_client(algorithm), mode="random"), seed=seed)
    other, _ = _run(Byzantine(_client(algorithm), mode="random"), seed=seed + 10)
    assert _same(update.tensors, again.tensors)
    assert not _same(update.tensors, other.tensors)
    g = _gen(seed)  # the formula by hand: one U[-1, 1) draw per parameter, in order
    draws = [torch.rand(w.shape, generator=g) * 2 - 1 for w in w_g]
    if algorithm == "fedavg":
        assert update.kind == "delta"
        assert _same(update.tensors, [r - w for r, w in zip(draws, w_g)])
        sent = torch.cat([(d + w).flatten() for d, w in zip(update.tensors, w_g)])
        assert sent.min() >= -1 and sent.max() <= 1  # float32 rounding may touch 1
    else:
        assert update.kind == "gradient"
        assert _same(update.tensors, draws)
        flat = update.flat
        assert flat.min() >= -1 and flat.max() < 1


# --------------------------------------------------------------------------- label flipping


@ALGORITHMS
def test_label_flipping_equals_honest_training_on_flipped_labels(algorithm):
    client = _client(algorithm)
    labels = client.labels.clone()
    flipped = Client(0, client.images, K - 1 - labels, training=client.training)
    expected, truth_expected = _run(flipped)
    update, truth = _run(LabelFlipping(client, num_classes=K))
    assert _same(update.tensors, expected.tensors)
    assert _meta(update) == _meta(expected)
    assert torch.equal(truth.labels, truth_expected.labels)
    assert torch.equal(client.labels, labels)  # the wrapped client's labels are untouched


@pytest.mark.parametrize(
    "params", [{"source": [0, 2], "target": [2, 1]}, {"mapping": {0: 2, 2: 1}}]
)
def test_label_flipping_source_target_mapping(params):
    client = _client("fedavg", n=12)
    y = client.labels
    mapped = torch.where(y == 0, 2, torch.where(y == 2, 1, y))  # 0 -> 2, 2 -> 1, 1 kept
    expected, _ = _run(Client(0, client.images, mapped, training=client.training))
    adversary = LabelFlipping(client, num_classes=K, **params)
    assert torch.equal(adversary.poisoned.labels, mapped)
    assert _same(_run(adversary)[0].tensors, expected.tensors)


def test_label_flipping_fedmlsecurity_mapping_on_ten_classes():
    x, y = torch.rand(10, *SHAPE, generator=_gen(3)), torch.arange(10)
    adversary = LabelFlipping(Client(0, x, y), source=[3, 2], target=[9, 1])
    assert adversary.poisoned.labels.tolist() == [0, 1, 1, 9, 4, 5, 6, 7, 8, 9]
    default = LabelFlipping(Client(0, x, y))  # y -> 9 - y
    assert default.poisoned.labels.tolist() == list(range(9, -1, -1))


# --------------------------------------------------------------------------- model replacement


@ALGORITHMS
def test_model_replacement_scales_the_honest_update(algorithm):
    gamma = 4.0
    honest, _ = _run(_client(algorithm))
    update, _ = _run(ModelReplacement(_client(algorithm), gamma=gamma))
    assert _same(update.tensors, [gamma * t for t in honest.tensors])
    assert _meta(update) == _meta(honest)


def test_model_replacement_backdoor_trains_on_poisoned_copy():
    client = _client("fedavg", n=8)
    images, labels = client.images.clone(), client.labels.clone()
    adversary = ModelReplacement(
        client, gamma=2.0, target=1, trigger=PixelTrigger(size=2), poison_fraction=0.5, seed=3
    )
    idx = adversary.poison_index
    assert len(idx) == 4 and len(set(idx.tolist())) == 4
    x, y = images.clone(), labels.clone()
    x[idx, :, -2:, -2:] = 1.0  # white 2x2 square, bottom-right corner
    y[idx] = 1
    expected, _ = _run(Client(0, x, y, training=client.training))
    update, _ = _run(adversary)
    assert _same(update.tensors, [2.0 * t for t in expected.tensors])
    assert torch.equal(client.images, images) and torch.equal(client.labels, labels)


def test_apply_trigger_stamps_a_square_and_copies():
    images = torch.zeros(2, 3, 6, 6)
    out = apply_trigger(images, size=2, corner="top_left")
    assert not images.any()
    assert out[:, :, :2, :2].eq(1).all() and out.sum() == 2 * 3 * 4
    assert apply_trigger(images, size=3)[:, :, 3:, 3:].eq(1).all()


def test_backdoor_success_counts_target_predictions_on_other_classes():
    class Always(nn.Module):  # predicts class 1 whatever the input
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(len(x), 3) + 0 * self.w

    x, y = torch.rand(6, *SHAPE, generator=_gen(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    assert backdoor_success(Always(), x, y, target=1) == 1.0
    assert backdoor_success(Always(), x, y, target=0) == 0.0


# --------------------------------------------------------------------------- lazy worker


@ALGORITHMS
def test_lazy_stale_resends_its_last_honest_update(algorithm):
    lazy = LazyWorker(_client(algorithm), mode="stale", rounds=(1, None))
    first, truth0 = _run(lazy, round=0, seed=1)  # honest, remembered
    later_model = _model()
    with torch.no_grad():
        for p in later_model.parameters():
            p.add_(0.5)  # a different global model: the lazy client ignores it
    for t in (1, 2):
        update, truth = _run(lazy, round=t, seed=10 + t, model=later_model)
        assert _same(update.tensors, first.tensors)
        assert _meta(update)[:4] == _meta(first)[:4]  # kind, samples, weight, client id
        assert update.round == t and truth.round == t
        assert torch.equal(truth.images, truth0.images)


def test_lazy_stale_computes_honestly_the_first_time():
    honest, _ = _run(_client("fedavg"), round=2)
    lazy = LazyWorker(_client("fedavg"), mode="stale", rounds=(2, None))
    update, _ = _run(lazy, round=2)
    assert _same(update.tensors, honest.tensors)
    assert _same(_run(lazy, round=3, seed=99)[0].tensors, honest.tensors)


@ALGORITHMS
def test_lazy_global_sends_zeros(algorithm):
    honest, _ = _run(_client(algorithm))
    update, _ = _run(LazyWorker(_client(algorithm), mode="global"))
    assert all(not t.any() for t in update.tensors)
    assert _meta(update) == _meta(honest)


# --------------------------------------------------------------------------- schedules


WRAPS = {
    "byzantine_zero": lambda c, r: Byzantine(c, mode="zero", rounds=r),
    "byzantine_random": lambda c, r: Byzantine(c, mode="random", rounds=r),
    "byzantine_flip": lambda c, r: Byzantine(c, mode="flip", rounds=r),
    "label_flip": lambda c, r: LabelFlipping(c, num_classes=K, rounds=r),
    "model_replacement": lambda c, r: ModelReplacement(c, gamma=3.0, target=0, rounds=r),
    "lazy_stale": lambda c, r: LazyWorker(c, mode="stale", rounds=r),
    "lazy_global": lambda c, r: LazyWorker(c, mode="global", rounds=r),
}


@ALGORITHMS
@pytest.mark.parametrize("name", sorted(WRAPS))
def test_honest_outside_its_rounds_bit_for_bit(name, algorithm):
    adversary = WRAPS[name](_client(algorithm), (2, 4))
    for t, seed in [(0, 5), (1, 6), (4, 7)]:
        update, truth = _run(adversary, round=t, seed=seed)
        honest, honest_truth = _run(_client(algorithm), round=t, seed=seed)
        assert _same(update.tensors, honest.tensors)
        assert _meta(update) == _meta(honest)
        assert torch.equal(truth.labels, honest_truth.labels)
    inside, _ = _run(adversary, round=2, seed=5)
    assert not _same(inside.tensors, _run(_client(algorithm), round=2, seed=5)[0].tensors)
    assert adversary.client_id == 0 and len(adversary) == 8
    assert adversary.protocol() == _client(algorithm).protocol()


def test_schedule_bounds():
    s = Schedule.of((2, 5))
    assert [t for t in range(8) if t in s] == [2, 3, 4]
    assert 10**6 in Schedule.of(None) and 3 in Schedule.of((3, None))


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("m", "fraction", "k"), [(10, 0.1, 1), (10, 0.3, 3), (4, 0.5, 2), (20, 0.4, 8)]
)
def test_select_by_fraction_is_deterministic_with_floor_size(m, fraction, k):
    chosen = select_malicious(m, fraction=fraction, seed=4)
    assert chosen == select_malicious(m, fraction=fraction, seed=4)
    assert len(chosen) == k and chosen == sorted(set(chosen)) and all(0 <= i < m for i in chosen)
    draws = {tuple(select_malicious(20, fraction=0.25, seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed matters


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": [0, 4]}, "outside 0..3"),
        ({"ids": [1, 1]}, "duplicates"),
        ({}, "exactly one"),
        ({"ids": [1], "fraction": 0.5}, "exactly one"),
        ({"fraction": 1.5}, r"\[0, 1\]"),
    ],
)
def test_select_rejects_bad_ids(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_malicious(4, **kwargs)
    assert select_malicious(4, ids=[3, 1]) == [1, 3]


def test_poison_clients_wraps_the_chosen_ids():
    clients = [_client("fedavg", cid=i, seed=i) for i in range(4)]
    out = poison_clients(clients, "byzantine", ids=[2], mode="flip")
    assert isinstance(out[2], Byzantine) and out[2].client is clients[2]
    assert [c is d for c, d in zip(out, clients)] == [True, True, False, True]
    with pytest.raises(ValueError, match="not client ids"):
        poison_clients(clients, "byzantine", ids=[7], mode="flip")


# --------------------------------------------------------------------------- server


def _server_run(seed: int):
    clients = [_client("fedavg", cid=i, seed=i) for i in range(4)]
    clients[1] = Byzantine(clients[1], mode="flip", rounds=(1, None))
    seen, aggregated = [], []

    def aggregator(updates):
        aggregated.append([(u.client_id, u.round) for u in updates])
        return fedavg(updates)

    model = _model()
    server = Server(model, clients, listeners=[seen.append], aggregator=aggregator, seed=seed)
    server.run(2)
    return model, seen, aggregated


def test_server_run_with_a_wrapped_client_reaches_the_aggregator_and_is_reproducible():
    model, seen, aggregated = _server_run(seed=3)
    assert aggregated == [[(i, t) for i in range(4)] for t in range(2)]
    malicious = [o for o in seen if o.client_id == 1]
    assert [o.round for o in malicious] == [0, 1]
    model2, seen2, _ = _server_run(seed=3)
    assert _same(list(model.parameters()), list(model2.parameters()))
    assert all(_same(a.update.tensors, b.update.tensors) for a, b in zip(seen, seen2))
    model3, _, _ = _server_run(seed=4)
    assert not _same(list(model.parameters()), list(model3.parameters()))


def test_flip_in_a_server_round_is_minus_the_honest_delta():
    # round 1 is malicious: replay the honest client with the server's generator
    model, seen, _ = _server_run(seed=3)
    obs = next(o for o in seen if o.client_id == 1 and o.round == 1)
    honest, _ = _client("fedavg", cid=1, seed=1).compute_update(
        obs.model(), round=1, generator=round_generator(3, 1, 2)
    )
    assert _same(obs.update.tensors, [-t for t in honest.tensors])


# --------------------------------------------------------------------------- factory


def test_make_adversary_builds_each_kind():
    assert ADVERSARIES.names() == ["byzantine", "label_flip", "lazy", "model_replacement"]
    c = _client()
    assert isinstance(make_adversary("byzantine", c, mode="random"), Byzantine)
    assert isinstance(make_adversary("label_flip", c, num_classes=K), LabelFlipping)
    assert isinstance(make_adversary("model_replacement", c, gamma=2.0), ModelReplacement)
    lazy = make_adversary("lazy", c, mode="global", rounds=(1, 3))
    assert isinstance(lazy, LazyWorker) and lazy.schedule == Schedule(1, 3)


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("sybil", {}, "valid names: byzantine, label_flip, lazy, model_replacement"),
        ("byzantine", {"mode": "zero", "gama": 2}, "unknown parameter.*gama.*valid: mode, rounds"),
        ("byzantine", {}, "needs parameter.*mode"),
        ("byzantine", {"mode": "sign"}, "valid modes: flip, random, zero"),
        ("lazy", {"mode": "sleepy"}, "valid modes: global, stale"),
        ("model_replacement", {"gamma": 0}, "gamma 0"),
        ("model_replacement", {"gamma": -1.0}, "gamma"),
        ("model_replacement", {"gamma": 2.0, "target": 1, "poison_fraction": 0}, "poison"),
        ("model_replacement", {"gamma": 2.0, "trigger": PixelTrigger()}, "needs target"),
        ("byzantine", {"mode": "zero", "rounds": (3, 3)}, "empty"),
        ("byzantine", {"mode": "zero", "rounds": (-1, None)}, ">= 0"),
        ("byzantine", {"mode": "zero", "rounds": 5}, r"\(start, stop\)"),
        ("label_flip", {"num_classes": 2}, "outside 0..1"),
        ("label_flip", {"num_classes": K, "source": [0]}, "go together"),
        ("label_flip", {"num_classes": K, "source": [0], "target": [5]}, "outside 0..2"),
        ("label_flip", {"num_classes": K, "source": [0, 0], "target": [1, 2]}, "duplicates"),
    ],
)
def test_bad_parameters_are_rejected_in_one_line(kind, params, match):
    with pytest.raises(ValueError, match=match) as info:
        make_adversary(kind, _client(), **params)
    assert "\n" not in str(info.value)


def test_data_poisoning_needs_a_plain_client():
    wrapped = Byzantine(_client(), mode="zero")
    with pytest.raises(ValueError, match="plain fl_core Client"):
        LabelFlipping(wrapped, num_classes=K)
    with pytest.raises(ValueError, match="plain fl_core Client"):
        ModelReplacement(wrapped, gamma=2.0, target=1)
    ModelReplacement(wrapped, gamma=2.0)  # scaling alone wraps anything
