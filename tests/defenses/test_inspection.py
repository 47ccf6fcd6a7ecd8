"""Model inspection (defenses.inspection): the client refuses a model built to leak.

Where the expected outcomes come from: structural. Each malicious-server
modification of fl_core.malicious changes something no honest global model has
(extra rows in front of the agreed architecture; identical measuring rows;
zero output rows with a bias far above the rest; units that almost never
fire), and every victim of the registry, at initialisation and after a few
training steps, must pass (no false alarms).
"""

from __future__ import annotations

import pytest
import torch

from defenses.config import build_plan, normalize_defenses
from defenses.inspection import CHECKS, InspectingClient, inspect_model
from fl_core import Client, LocalTraining, Server, build_model
from fl_core.malicious import ClassFishing, Imprint, TrapWeights
from fl_core.models import MODELS
from leakage.attacks import Imprint as ImprintAttack

SHAPE = (3, 32, 32)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS.names())
def test_honest_models_pass_at_initialisation_and_after_training(name):
    model = build_model(name, in_shape=SHAPE, generator=torch.Generator().manual_seed(0))
    data = images(16, 1)
    assert inspect_model(model, data) == []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    labels = torch.arange(16) % 10
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data), labels).backward()
        opt.step()
    assert inspect_model(model, data) == []


def test_each_malicious_model_fails_a_check_even_inside_the_agreed_architecture():
    model = build_model("mlp", activation="relu", generator=torch.Generator().manual_seed(0))
    ref, data = images(300, 2), images(16, 3)
    imprinted = Imprint(bins=64, reference=ref)(model)
    trapped = TrapWeights(bins=256, rate=1 / 64, reference=ref)(model)
    fished = ClassFishing(target=2, reference=ref)(model)
    assert inspect_model(imprinted, data) == ["architecture", "duplicate_rows"]
    assert inspect_model(trapped, data) == ["architecture", "rare_units"]
    assert inspect_model(fished, data) == ["dead_classes"]
    inside = ("duplicate_rows", "dead_classes", "rare_units")  # an adaptive server's view
    assert inspect_model(imprinted, data, checks=inside) == ["duplicate_rows"]
    assert inspect_model(trapped, data, checks=inside) == ["rare_units"]
    with pytest.raises(ValueError, match="unknown inspection check"):
        inspect_model(model, checks=("vibes",))


def test_an_inspecting_client_abstains_from_a_malicious_round_and_not_from_an_honest_one():
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    data, labels = images(8, 1), torch.arange(8)
    attack = ImprintAttack(bins=32)
    seen = []
    client = InspectingClient(Client(0, data, labels))
    Server(
        model, [client], modification=attack.modification(images(200, 2)), listeners=[seen.append]
    ).run_round()
    assert client.refusals == [(0, ["architecture", "duplicate_rows"])]
    assert all(not t.any() for t in seen[0].update.tensors)
    assert attack.reconstruct(seen[0]).candidates == 0
    honest, plain = [], []  # an honest round trains the global model: one fresh copy each
    for client, out in (
        (InspectingClient(Client(0, data, labels)), honest),
        (Client(0, data, labels), plain),
    ):
        fresh = build_model("mlp", generator=torch.Generator().manual_seed(0))
        Server(fresh, [client], listeners=[out.append], engine="loop").run_round()
    for a, b in zip(honest[0].update.tensors, plain[0].update.tensors):
        assert torch.equal(a, b)


def test_inspect_in_a_defense_list_wraps_clients_outermost_and_keeps_the_round_order():
    plan = build_plan(
        [{"inspect": {"checks": "architecture+dead_classes"}}, {"clip": {"max_norm": 1}}]
    )
    (wrapped,) = plan.wrap_clients([Client(0, images(2, 0), torch.arange(2))])
    assert isinstance(wrapped, InspectingClient)
    assert wrapped.checks == ("architecture", "dead_classes")
    plan = build_plan(["inspect", {"dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}])
    (wrapped,) = plan.wrap_clients(
        [Client(0, images(2, 0), torch.arange(2), training=LocalTraining("fedsgd"))]
    )
    assert isinstance(wrapped, InspectingClient) and wrapped.checks == CHECKS
    assert type(wrapped.client).__name__ == "DPSGDClient"
    with pytest.raises(ValueError, match="order of a round"):
        normalize_defenses([{"clip": {"max_norm": 1}}, "inspect"])
    with pytest.raises(ValueError, match="unknown vibes"):
        build_plan([{"inspect": {"checks": "vibes"}}])
