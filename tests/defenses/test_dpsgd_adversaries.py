"""Poisoning clients in a DP-SGD run: honest clients train with DP-SGD, attackers send attacks.

The semantics under test (``defenses.config.DefensePlan.wrap_clients``): a
malicious client does not run DP-SGD honestly, it sends its attack, computed as
the attacker computes it; in the rounds outside its schedule it is an honest
client and trains with DP-SGD like the others.

Expected updates come from a second computation path: a fresh
:class:`~defenses.dpsgd.DPSGDClient` or plain :class:`~fl_core.client.Client`
on the same data with the generator of the client's round
(:func:`fl_core.server.client_generator`), then the attack's formula by hand
(FedMLSecurity's modes, Han et al. 2023, arXiv:2306.04959: ``zero`` sends all
zeros, ``flip`` sends ``−Δ``; label flipping ``y → K − 1 − y``, Tolpegin et al.
2020).
"""

from __future__ import annotations

import copy

import pytest
import torch

from defenses.config import build_plan
from defenses.dpsgd import DPSGDClient
from fl_core.adversaries import Adversary, Byzantine, LabelFlipping
from fl_core.client import Client, LocalTraining
from fl_core.server import client_generator
from leakage.app.fl_cmd import FLConfig, build_run

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DPSGD = {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
BASE = {  # the embedded photographs (18), a tiny LeNet (no BatchNorm), 3 clients of 6
    "dataset": "samples",
    "model": "lenet",
    "num_clients": 3,
    "rounds": 1,
    "algorithm": "fedavg",
    "local_steps": 2,
    "batch_size": 2,
    "lr": 0.05,
    "defense_args": {"defenses": [DPSGD]},
}


def _clients() -> list[Client]:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(9, 1, 8, 8, generator=g), torch.randint(0, 3, (9,), generator=g)
    training = LocalTraining("fedavg", batch_size=2, local_steps=2, lr=0.1)
    return [Client(i, images[3 * i : 3 * i + 3], labels[3 * i : 3 * i + 3], training=training)
            for i in range(3)]  # fmt: skip


def test_wrap_clients_keeps_adversaries_and_wraps_honest_ones():
    plain = _clients()
    byzantine = Byzantine(plain[1], mode="zero")
    flipper = LabelFlipping(plain[2], num_classes=3, rounds=(1, None))
    given = [plain[0], byzantine, flipper]
    wrapped = build_plan([DPSGD]).wrap_clients(given)
    assert isinstance(wrapped[0], DPSGDClient) and wrapped[0].client is plain[0]
    for adv, out in zip(given[1:], wrapped[1:]):
        # the adversary stays itself: same class, same attack settings, same plain client
        assert type(out) is type(adv) and isinstance(out, Adversary)
        assert out.client is adv.client and out.schedule == adv.schedule
        # and only its honest rounds go through DP-SGD, on the same client
        assert isinstance(out.honest, DPSGDClient) and out.honest.client is adv.client
        assert adv.honest is adv.client  # the given adversaries are not modified
    assert wrapped[1].mode == "zero" and torch.equal(wrapped[2].table, flipper.table)
    assert wrapped[2].poisoned is flipper.poisoned
    assert build_plan([]).wrap_clients(given) == given  # no training defense: as given


def test_with_honest_checks_the_client():
    adv = Byzantine(_clients()[1], mode="zero")
    with pytest.raises(ValueError, match="wrap the same client"):
        adv.with_honest(_clients()[0])
    with pytest.raises(ValueError, match="has no 'client_id'"):
        adv.with_honest(object())


def _round(**attack):
    """One round of ``build_run``'s server with dpsgd and the attack; the server's view."""
    cfg = FLConfig(**BASE, attack_args={"enable": True, **attack})
    server, _, _ = build_run(cfg)
    start = copy.deepcopy(server.model)
    seen = []
    server.listeners.append(seen.append)
    server.run_round()
    return cfg, server, start, {o.client_id: o.update for o in seen}


def _by_hand(client, model, cfg, client_id):
    """``client``'s update on a copy of ``model`` with the generator of its round 0."""
    g = client_generator(cfg.seed, 0, client_id)
    return client.compute_update(copy.deepcopy(model), round=0, generator=g)[0]


def _dp(client):
    return DPSGDClient(client, noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("mode", ["zero", "flip"])
def test_byzantine_with_dpsgd_sends_its_attack_and_honest_clients_run_dpsgd(mode):
    cfg, server, start, updates = _round(type="byzantine", mode=mode, ids=[1])
    adv = server.clients[1]
    assert isinstance(adv, Byzantine) and isinstance(adv.honest, DPSGDClient)
    honest = _by_hand(adv.client, start, cfg, 1)  # plain local SGD, the attacker's own
    if mode == "zero":
        assert all(torch.equal(t, torch.zeros_like(t)) for t in updates[1].tensors)
    else:  # −Δ of its plain (not DP-SGD) training: w_g + (w_g − w_l)
        assert all(torch.equal(t, -h) for t, h in zip(updates[1].tensors, honest.tensors))
    for i in (0, 2):
        assert isinstance(server.clients[i], DPSGDClient)
        want = _by_hand(_dp(server.clients[i].client), start, cfg, i)
        assert all(torch.equal(a, b) for a, b in zip(updates[i].tensors, want.tensors))
        assert server.clients[i].steps == cfg.local_steps  # it did run DP-SGD
    assert updates[1].weight == updates[0].weight == 6  # the metadata give nothing away


def test_label_flipping_with_dpsgd_trains_on_flipped_labels():
    cfg, server, start, updates = _round(type="label_flip", ids=[0])
    adv = server.clients[0]
    plain = adv.client
    flipped = Client(0, plain.images, 9 - plain.labels, training=plain.training)  # y → K − 1 − y
    want = _by_hand(flipped, start, cfg, 0)
    assert all(torch.equal(a, b) for a, b in zip(updates[0].tensors, want.tensors))
    assert adv.honest.steps == 0  # the attacker's DP-SGD side never ran


def test_adversary_outside_its_rounds_is_an_honest_dpsgd_client():
    cfg, server, start, updates = _round(type="byzantine", mode="zero", ids=[2], rounds=[1, None])
    adv = server.clients[2]
    want = _by_hand(_dp(adv.client), start, cfg, 2)
    assert all(torch.equal(a, b) for a, b in zip(updates[2].tensors, want.tensors))
    assert any(float(t.abs().max()) > 0 for t in updates[2].tensors)
    assert adv.honest.steps == cfg.local_steps
