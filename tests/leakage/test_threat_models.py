"""Threat models and batched restarts.

* A FedAvg delta after one full-batch SGD step is −η times the FedSGD gradient
  (McMahan et al. 2017: FedSGD is FedAvg with E = 1, B = ∞), so the ``fedavg``
  observation with E = 1 carries exactly the ``fedsgd`` information.
* Secure aggregation of K = 1 client reveals that client's update.
* The attacker's simulation of each threat model reproduces, on the true data,
  the update the FL core produced.
* R restarts batched follow the trajectories R sequential restarts follow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fl_core import Client, LocalTraining, Server, build_model, load_samples
from leakage import DLG, InvertingGradients, UpdateSimulator
from leakage.optim import LBFGS, step_together
from leakage.simulate import threat_model


def run_round(model, clients, *, aggregate=False, seed=0):
    """One round; returns (what the attacker saw, ground truths)."""
    seen, truth = [], []
    hooks = {"aggregate_listeners" if aggregate else "listeners": [seen.append]}
    Server(model, clients, truth_listeners=[truth.append], seed=seed, **hooks).run_round()
    return seen, truth


def lenet(seed=0, **kw):
    return build_model("lenet", generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(scope="module")
def data():
    return load_samples(count=6)


def test_fedavg_one_full_batch_step_is_the_fedsgd_gradient(data):
    lr = 0.05
    x, y = data.images[:3], data.labels[:3]
    (sgd,), _ = run_round(lenet(), [Client(0, x, y)])
    avg_training = LocalTraining("fedavg", local_steps=1, lr=lr)
    (avg,), _ = run_round(lenet(), [Client(0, x, y, training=avg_training)])
    assert (threat_model(sgd), threat_model(avg)) == ("fedsgd", "fedavg")
    # float32: θ − ηg − θ keeps the gradient to ~eps(θ)/η ≈ 1e-6 per entry
    implied = avg.update.flat / -lr
    assert float((implied - sgd.update.flat).norm() / sgd.update.flat.norm()) < 1e-5
    # the attacker's two simulations agree as well
    xs, ys = x.double()[None], F.one_hot(y, 10).double()[None]
    g = UpdateSimulator(sgd, dtype=torch.float64)(xs, ys)
    d = UpdateSimulator(avg, dtype=torch.float64)(xs, ys)
    torch.testing.assert_close(d / -lr, g, rtol=1e-10, atol=1e-12)


def test_aggregate_of_one_client_is_that_client(data):
    x, y = data.images[:2], data.labels[:2]
    (single,), _ = run_round(lenet(), [Client(0, x, y)])
    (agg,), _ = run_round(lenet(), [Client(0, x, y)], aggregate=True)
    assert torch.equal(agg.update.flat, single.update.flat)
    assert agg.protocol.client_samples == (2,) and agg.client_id == -1
    assert threat_model(agg) == "aggregate"


@pytest.mark.parametrize(
    "name, training, clients",
    [
        ("lenet", LocalTraining("fedavg", local_steps=3, lr=0.1), 1),
        ("lenet", LocalTraining("fedavg", local_steps=3, lr=0.1, momentum=0.9), 1),
        (
            "lenet",
            LocalTraining("fedavg", local_steps=3, lr=0.1, momentum=0.9, weight_decay=0.5),
            1,
        ),
        ("lenet", LocalTraining("fedsgd"), 3),
        ("resnet18", LocalTraining("fedsgd"), 2),  # BatchNorm: per-client batch statistics
        ("resnet18", LocalTraining("fedavg", local_steps=2, lr=0.05), 2),
    ],
)
def test_simulation_reproduces_the_observed_update(data, name, training, clients):
    """On the true data the attacker's simulation gives the observed update (float32 client
    against a float64 simulation, so agreement to ~1e-5 relative)."""
    model = build_model(name, generator=torch.Generator().manual_seed(0))
    n = 6 // clients
    parts = [
        Client(
            i, data.images[i * n : (i + 1) * n], data.labels[i * n : (i + 1) * n], training=training
        )
        for i in range(clients)
    ]
    (obs,), truth = run_round(model, parts, aggregate=clients > 1)
    sim = UpdateSimulator(obs, dtype=torch.float64)
    x = torch.cat([t.images for t in truth]).double()
    y = F.one_hot(torch.cat([t.labels for t in truth]), 10).double()
    u = sim(x[None], y[None])[0].detach()
    rel = float((u - sim.target).norm() / sim.target.norm())
    assert rel < 5e-5, rel
    # and the data are not interchangeable: other images give another update
    other = sim(x.flip(0)[None], y[None])[0].detach()
    assert float((other - sim.target).norm() / sim.target.norm()) > 1e-3


@pytest.mark.parametrize("weighting", ["dataset", "processed"])
def test_aggregate_simulation_uses_the_reported_client_weights(data, weighting):
    """Clients of 2 and 4 samples, one step of batch 2: both process 2 samples, so the
    aggregate's dummy groups are 2 + 2; the mean weights them by what they report: n_k
    = 2 and 4 (McMahan et al. 2017) by default, 2 and 2 when weighting by samples used."""
    training = LocalTraining("fedavg", batch_size=2, local_steps=1, lr=0.1, weighting=weighting)
    clients = [
        Client(0, data.images[:2], data.labels[:2], training=training),
        Client(1, data.images[2:], data.labels[2:], training=training),
    ]
    (obs,), truth = run_round(lenet(), clients, aggregate=True)
    assert obs.protocol.client_samples == (2, 2)
    assert obs.protocol.client_weights == ((2, 4) if weighting == "dataset" else (2, 2))
    sim = UpdateSimulator(obs, dtype=torch.float64)
    x = torch.cat([t.images for t in truth]).double()
    y = F.one_hot(torch.cat([t.labels for t in truth]), 10).double()
    u = sim(x[None], y[None])[0].detach()
    assert float((u - sim.target).norm() / sim.target.norm()) < 5e-5


def test_one_epoch_of_minibatches_matches_in_the_clients_order(data):
    """Within one epoch the client's minibatch order is a permutation of its samples:
    the simulation walking the samples in that order reproduces the delta, so a
    dummy batch (whose order is free) can match it."""
    from fl_core.server import round_generator

    training = LocalTraining("fedavg", local_steps=3, lr=0.1, batch_size=2, momentum=0.9)
    client = Client(0, data.images, data.labels, training=training)
    (obs,), _ = run_round(lenet(), [client])
    order = torch.cat(client._batches(round_generator(0, 0, 1)))  # the round's draw
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    sim = UpdateSimulator(obs, dtype=torch.float64)
    x, y = data.images.double(), F.one_hot(data.labels, 10).double()
    in_order = sim(x[order][None], y[order][None])[0].detach()
    sorted_ = sim(x[None], y[None])[0].detach()
    assert float((in_order - sim.target).norm() / sim.target.norm()) < 5e-5
    assert float((sorted_ - sim.target).norm() / sim.target.norm()) > 1e-3


def test_vmap_batch_equals_one_by_one(data):
    (obs,), _ = run_round(lenet(), [Client(0, data.images[:2], data.labels[:2])])
    sim = UpdateSimulator(obs, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, 10, generator=g, dtype=torch.float64).softmax(-1)
    batched = sim(x, y).detach()
    single = torch.stack([sim(x[r : r + 1], y[r : r + 1])[0] for r in range(3)]).detach()
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-12)


def test_step_together_follows_each_problem_alone():
    """Lock-step L-BFGS on independent Rosenbrock problems = each problem on its own."""

    def rosen(z):
        return (100 * (z[..., 1:] - z[..., :-1] ** 2) ** 2 + (1 - z[..., :-1]) ** 2).sum(-1)

    def one(z):
        z = z.detach().requires_grad_(True)
        f = rosen(z)
        return f.detach(), torch.autograd.grad(f, z)[0]

    def many(zs, which):
        zs = zs.detach().requires_grad_(True)
        f = rosen(zs)
        return f.detach(), torch.autograd.grad(f.sum(), zs)[0]

    g = torch.Generator().manual_seed(0)
    starts = [torch.randn(6, generator=g, dtype=torch.float64) * s for s in (0.5, 1.0, 2.0)]
    alone = [LBFGS(one, z.clone()) for z in starts]
    together = [LBFGS(None, z.clone()) for z in starts]
    for _ in range(5):
        a = [o.step(10) for o in alone]
        b = step_together(together, many, 10)
        assert a == b
    for o, t in zip(alone, together):
        assert torch.equal(o.z, t.z) and o.evaluations == t.evaluations
    assert len({o.evaluations for o in alone}) > 1  # the problems did take different paths


def test_batched_restarts_give_the_sequential_result(data):
    (obs,), _ = run_round(lenet(3), [Client(0, data.images[:1], data.labels[:1])])
    for attack in (
        InvertingGradients(steps=40, restarts=3, label_strategy="idlg"),
        # float64 pairs: rounding them to float32 (the default) turns the batched
        # objective's last-bit differences into ~1e-3 ones within three steps
        DLG(steps=3, restarts=3, early_stop=False, history_dtype="float64"),
    ):
        rb = type(attack)(**{**vars(attack), "batched": True}).reconstruct(
            obs, generator=torch.Generator().manual_seed(5)
        )
        rs = type(attack)(**{**vars(attack), "batched": False}).reconstruct(
            obs, generator=torch.Generator().manual_seed(5)
        )
        assert len(rb.restart_losses) == len(rs.restart_losses) == 3
        torch.testing.assert_close(
            torch.tensor(rb.restart_losses), torch.tensor(rs.restart_losses), rtol=1e-3, atol=0
        )
        assert rb.restart_losses.index(rb.loss) == rs.restart_losses.index(rs.loss)
        torch.testing.assert_close(rb.images, rs.images, rtol=0, atol=1e-3)
        assert len(set(rb.restart_losses)) == 3  # the restarts really started apart


@pytest.mark.parametrize(
    "name, training",
    [
        ("resnet20", LocalTraining("fedsgd", bn_mode="eval")),
        ("resnet18", LocalTraining("fedavg", local_steps=2, lr=0.05, bn_mode="eval")),
        ("resnet20", LocalTraining("fedsgd", bn_mode="train")),
    ],
)
def test_simulation_follows_the_bn_mode_and_the_input_normalisation(data, name, training):
    """BatchNorm mode and input normalisation are part of what the attacker simulates:
    on the true data a normalising victim's update is reproduced in either mode, and the
    simulation in the other mode is a different update (batch vs running statistics)."""
    from fl_core.data import NORMALIZATION

    model = build_model(
        name, normalize=NORMALIZATION["cifar10"], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():  # running statistics that differ from a batch's own
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
                m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    (obs,), truth = run_round(
        model, [Client(0, data.images[:3], data.labels[:3], training=training)]
    )
    assert obs.protocol.train_mode == (training.bn_mode == "train")
    assert obs.model().training == (training.bn_mode == "train")
    # float32 like the client: in float64 a few ReLU units of this deep random net sit
    # close enough to their kink to flip, which moves the gradient by ~1e-3
    x, y = truth[0].images, F.one_hot(truth[0].labels, 10).float()
    sim = UpdateSimulator(obs, dtype=torch.float32)
    u = sim(x[None], y[None])[0].detach()
    assert float((u - sim.target).norm() / sim.target.norm()) < 1e-4
    from dataclasses import replace

    flipped = replace(obs, protocol=replace(obs.protocol, train_mode=not obs.protocol.train_mode))
    other = UpdateSimulator(flipped, dtype=torch.float32)
    v = other(x[None], y[None])[0].detach()
    assert float((v - sim.target).norm() / sim.target.norm()) > 1e-3


def test_eval_mode_client_leaves_running_statistics_alone(data):
    from fl_core.client import float_buffers

    model = build_model("resnet20", generator=torch.Generator().manual_seed(0))
    before = [b.clone() for b in float_buffers(model)]
    client = Client(0, data.images[:2], data.labels[:2], training=LocalTraining(bn_mode="eval"))
    update, _ = client.compute_update(model, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, update.buffers))
    train = Client(0, data.images[:2], data.labels[:2])
    update, _ = train.compute_update(model, generator=torch.Generator().manual_seed(0))
    assert not all(torch.equal(a, b) for a, b in zip(before, update.buffers))
