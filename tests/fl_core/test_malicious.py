"""The malicious server as a component of the round (fl_core.malicious, Server(modification=)).

Where the expected numbers come from: the closed-form expected recovery of an
imprint block, (1 - 1/k)^(n - 1), is checked against a direct simulation of n
images thrown into k equally likely bins (an independent count, not the
formula); everything else is structural (what the observation says, what the
round leaves of the global model, the clients' computation unchanged).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_core import Client, LocalTraining, Server, build_model
from fl_core.malicious import (
    ClassFishing,
    Imprint,
    Imprinted,
    TrapWeights,
    expected_imprint_recovery,
    imprint_thresholds,
)

SHAPE = (3, 8, 8)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def victim(name: str = "mlp", **kw):
    return build_model(name, in_shape=SHAPE, generator=torch.Generator().manual_seed(0), **kw)


def run(model, clients, modification, *, aggregate=False):
    seen, truth = [], []
    key = "aggregate_listeners" if aggregate else "listeners"
    server = Server(
        model,
        clients,
        modification=modification,
        truth_listeners=[truth.append],
        **{key: [seen.append]},
    )
    record = server.run_round()
    return server, seen, truth, record


@pytest.mark.parametrize(("bins", "batch"), [(16, 8), (128, 64), (32, 40)])
def test_expected_imprint_recovery_matches_a_simulation_of_uniform_bins(bins, batch):
    g = torch.Generator().manual_seed(0)
    trials = 4000
    draws = torch.randint(bins, (trials, batch), generator=g)
    counts = torch.zeros(trials, bins).scatter_add_(1, draws, torch.ones(trials, batch))
    alone = (counts.gather(1, draws) == 1).float().mean()
    assert expected_imprint_recovery(bins, batch) == pytest.approx(float(alone), abs=0.01)
    assert expected_imprint_recovery(bins, 1) == 1.0


def test_thresholds_are_increasing_quantiles_with_the_first_below_every_image():
    m = torch.linspace(0, 1, 1001, dtype=torch.float64)
    t = imprint_thresholds(m, 4, lowest=-1.0)
    assert t.tolist() == pytest.approx([-1.0, 0.25, 0.5, 0.75])
    g = imprint_thresholds(m, 4, binning="gaussian", lowest=-1.0)
    assert g[1] < g[2] < g[3] and g[2] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="binning"):
        imprint_thresholds(m, 4, binning="fancy", lowest=-1.0)


def test_a_malicious_round_sends_the_modified_model_and_leaves_the_global_one_alone():
    model = victim()
    before = [p.detach().clone() for p in model.parameters()]
    clients = [Client(0, images(4, 1), torch.arange(4))]
    server, seen, truth, _ = run(model, clients, Imprint(bins=8, reference=images(50, 2)))
    obs = seen[0]
    assert obs.protocol.server == "malicious"
    assert dict(obs.model_spec.modification) == {"bins": 8, "name": "imprint"}
    assert obs.parameters[0].shape == (8, 3 * 8 * 8)  # the block's rows come first
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert server.round == 1
    # the attacker rebuilds what was sent from the spec and the observed weights
    rebuilt = obs.model_spec.build()
    assert isinstance(rebuilt, Imprinted)
    with torch.no_grad():
        for p, q in zip(rebuilt.parameters(), obs.parameters):
            p.copy_(q)
    sent = server.sent_model(0)
    x = images(3, 5)
    assert torch.allclose(rebuilt(x), sent(x))


def test_the_client_computes_on_the_sent_model_as_it_would_on_the_true_one():
    """The update is the plain gradient of the sent model: the server changed no client code."""
    model = victim()
    data, labels = images(4, 1), torch.arange(4)
    server, seen, _, _ = run(
        model, [Client(0, data, labels)], Imprint(bins=8, reference=images(50, 2))
    )
    sent = server.sent_model(0)
    loss = torch.nn.functional.cross_entropy(sent(data), labels)
    expected = torch.autograd.grad(loss, list(sent.parameters()))
    for a, b in zip(seen[0].update.tensors, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_imprint_block_barely_changes_what_the_victim_computes():
    model = victim().eval()
    sent = Imprint(bins=32, reference=images(100, 2))(model).eval()
    x = images(10, 3)
    assert torch.allclose(sent(x), model(x), atol=1e-3)


def test_honest_rounds_say_honest_and_a_bad_server_kind_is_refused():
    _, seen, _, _ = run(victim(), [Client(0, images(2, 1), torch.arange(2))], None)
    assert seen[0].protocol.server == "honest"
    assert seen[0].model_spec.modification == ()
    with pytest.raises(ValueError, match="server must be one of"):
        dataclasses.replace(seen[0].protocol, server="evil")


def test_modifications_refuse_bad_settings_before_any_work():
    ref = images(10, 0)
    with pytest.raises(ValueError, match="reference images"):
        Imprint(bins=8)
    with pytest.raises(ValueError, match="bins"):
        Imprint(bins=1, reference=ref)
    with pytest.raises(ValueError, match="measurement"):
        Imprint(measurement="median", reference=ref)
    with pytest.raises(ValueError, match="rate"):
        TrapWeights(rate=1.5, reference=ref)
    with pytest.raises(ValueError, match="shape"):
        Imprint(bins=8, reference=torch.rand(4, 1, 8, 8))(victim())
    with pytest.raises(ValueError, match="already modified"):
        Imprinted(Imprint(bins=4, reference=ref)(victim()), 4)


def test_class_fishing_silences_every_class_but_the_target():
    """Images of other classes send (almost) no gradient into the network."""
    model = victim("mlp", activation="relu")
    sent = ClassFishing(target=3, reference=images(50, 2))(model)
    assert dict(sent.spec.modification) == {"name": "fishing", "target": 3}
    x = images(6, 4)
    labels = torch.tensor([0, 1, 2, 4, 5, 3])
    grads = []
    for i in range(6):
        loss = torch.nn.functional.cross_entropy(sent(x[i : i + 1]), labels[i : i + 1])
        grads.append(torch.autograd.grad(loss, next(sent.parameters()))[0].norm())
    assert max(grads[:5]) < 1e-6 * grads[5]


def test_fedavg_clients_train_the_sent_model_and_the_protocol_says_so():
    model = victim()
    training = LocalTraining("fedavg", local_steps=2, lr=0.1)
    clients = [Client(0, images(4, 1), torch.arange(4), training=training)]
    _, seen, _, record = run(model, clients, Imprint(bins=8, reference=images(50, 2)))
    assert seen[0].update.kind == "delta"
    assert seen[0].protocol.server == "malicious" and seen[0].protocol.local_steps == 2
    assert seen[0].update.tensors[0].shape == (8, 3 * 8 * 8)
