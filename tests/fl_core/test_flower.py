"""The Flower engine runs the in-process engine's rounds: same updates, same global models.

Each test starts Flower's simulation runtime (a local Ray instance, about 15 s).
Skipped when the ``flower`` extra is not installed (``pip install -e ".[flower]"``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip(
    "flwr", reason='the Flower engine needs the flower extra: pip install -e ".[flower]"'
)

from fl_core.flower import run_flower  # noqa: E402
from leakage.app.fl_cmd import ConfigClients, build_run, load_fl_config, run_fl  # noqa: E402

TOL = 1e-5  # float tolerance: Ray actors compute with one thread, the test process with its own


def _config(**overrides):
    base = dict(
        dataset="samples",
        model="lenet",
        num_clients=3,
        rounds=2,
        algorithm="fedavg",
        local_steps=3,
        batch_size=2,
        lr=0.05,
        momentum=0.5,
        seed=5,
    )
    return load_fl_config(None, **{**base, **overrides})


def _close(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _traced(cfg):
    """The config's server with listeners recording every update and ground truth."""
    server, _, _ = build_run(cfg)
    seen, truths = [], []
    server.listeners.append(seen.append)
    server.truth_listeners.append(truths.append)
    return server, seen, truths


def test_flower_engine_matches_in_process_updates_and_models():
    # a poisoning client with state across rounds (lazy: resends its round-0 update in
    # round 1), a client-side defense that draws noise, a robust aggregator and noise
    # after aggregation: every hook of a round, on both engines
    cfg = _config(
        attack_args={
            "enable": True,
            "type": "lazy",
            "mode": "stale",
            "ids": [1],
            "rounds": [1, None],
        },
        defense_args={
            "defenses": [
                {"gaussian": {"sigma": 0.001}},
                {"median": None},
                {"weak_dp": {"sigma": 1e-4}},
            ]
        },
    )
    local, local_seen, local_truth = _traced(cfg)
    models = []
    for _ in range(cfg.rounds):
        local.run_round()
        models.append([p.detach().clone() for p in local.model.parameters()])

    flower, flower_seen, flower_truth = _traced(cfg)
    flower_models = []

    def keep(_record):
        flower_models.append([p.detach().clone() for p in flower.model.parameters()])

    run_flower(
        flower,
        ConfigClients(json.dumps(cfg.to_dict())),
        cfg.rounds,
        on_round=lambda r: flower_models.append(
            [p.detach().clone() for p in flower.model.parameters()]
        ),
        num_cpus=2,
    )
    assert flower.round == local.round == 2
    key = lambda o: (o.round, o.client_id)  # noqa: E731
    assert [key(o) for o in flower_seen] == [key(o) for o in local_seen]
    assert len(local_seen) == 6
    for a, b in zip(local_seen, flower_seen):
        assert a.update.num_samples == b.update.num_samples and a.protocol == b.protocol
        assert _close(a.update.tensors, b.update.tensors) < TOL
        assert _close(a.parameters, b.parameters) < TOL
    # (the lazy client's round-1 update matched: it resent its round-0 update plus fresh
    # noise from whichever Ray actor ran it, its state carried in the node's context)
    for a, b in zip(local_truth, flower_truth, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for a, b in zip(models, flower_models, strict=True):
        assert _close(a, b) < TOL
    # and the rounds moved the model: equal because both learned the same, not because
    # neither changed
    assert _close(models[0], [p for p in local_seen[0].parameters]) > 1e-3


def test_same_yaml_runs_on_both_engines_with_matching_numbers(tmp_path):
    cfg = _config(algorithm="fedsgd", lr=0.01, rounds=2, server_lr=0.5, clients_per_round=2)
    local = run_fl(dataclasses.replace(cfg, out=str(tmp_path / "local")))
    flower = run_fl(dataclasses.replace(cfg, engine="flower", out=str(tmp_path / "flower")))
    assert [r["round"] for r in local] == [r["round"] for r in flower] == [1, 2]
    for a, b in zip(local, flower):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    s1 = torch.load(tmp_path / "local" / "state.pt", weights_only=False)["model"]
    s2 = torch.load(tmp_path / "flower" / "state.pt", weights_only=False)["model"]
    assert _close(list(s1.values()), list(s2.values())) < TOL


def test_the_flower_engine_refuses_a_malicious_server():
    """It broadcasts the global model only: a modification would silently not be sent."""
    from fl_core import Client, Server, build_model
    from fl_core.flower import lab_strategy
    from fl_core.malicious import Imprint

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    server = Server(
        build_model("lenet"),
        [Client(0, images[:2], torch.arange(2))],
        modification=Imprint(bins=4, reference=images),
    )
    with pytest.raises(ValueError, match="in-process engine"):
        lab_strategy(server, {0: 0})
