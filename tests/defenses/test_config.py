"""Defenses from YAML and the command line: valid lists build hooks, bad ones name the fix."""

from __future__ import annotations

import pytest
import torch

from defenses import CRFL, DEFENSES, Clip, GaussianNoise, NormDiffClip, Quantize, WeakDP, build_plan
from defenses.config import parse_defense_option
from fl_core.client import Client, LocalTraining
from fl_core.models import build_model
from fl_core.server import Server


def test_a_list_builds_hooks_in_order():
    plan = build_plan(
        [
            {"clip": {"max_norm": 2.0}},
            {"gaussian": {"multiplier": 0.5}},
            "quantize",
            {"norm_diff_clip": {"max_norm": 3}},
            {"weak_dp": {"sigma": "1e-3"}},  # YAML 1.1 reads 1e-3 as text
            {"crfl": {"rounds": 20}},
        ]
    )
    assert plan.client_defenses == (Clip(2.0), GaussianNoise(1.0), Quantize("fp16"))
    assert plan.post_aggregation == (WeakDP(1e-3), CRFL(rounds=20))
    kwargs = plan.server_kwargs()
    assert isinstance(kwargs["aggregator"], NormDiffClip)
    assert kwargs["aggregator"].max_norm == 3.0
    # the normalised list records every parameter, defaults included
    assert plan.to_list()[2] == {"quantize": {"format": "fp16"}}
    assert plan.to_list()[0] == {"clip": {"max_norm": 2.0, "per_layer": False}}


@pytest.mark.parametrize(
    "defenses, message",
    [
        ([{"clp": {"max_norm": 1}}], "unknown defense 'clp'; valid: inspect, dpsgd, clip"),
        ([{"clip": {}}], "defense clip needs max_norm"),
        ([{"clip": {"max_norm": 1, "norm": 2}}], "takes no norm; valid parameters: max_norm"),
        ([{"clip": {"max_norm": "big"}}], "max_norm must be a number"),
        ([{"gaussian": {"multiplier": 1.0}}], "put a whole-update clip before gaussian"),
        ([{"gaussian": {"sigma": 1.0, "multiplier": 1.0}}], "exactly one of sigma or multiplier"),
        ([{"prune": {"ratio": 2}}], r"ratio must be in \[0, 1\]"),
        ([{"weak_dp": {"sigma": 0.1}}, {"clip": {"max_norm": 1}}], "order of a round"),
        ([{"dpsgd": {"noise_multiplier": 1, "max_grad_norm": 0}}], "max_grad_norm"),
        ([{"dpsgd": {"noise_multiplier": 1, "max_grad_norm": 1, "accountant": "gdp"}}], "prv, rdp"),
        ({"clip": {"max_norm": 1}}, "must be a list"),
        ([{"crfl": {"rounds": 2.5}}], "rounds must be a whole number"),
        ([{"crfl": {"rounds": float("inf")}}], "rounds must be a whole number"),
        ([{"clip": 1.0}], "give its parameters as a mapping"),
        ([{"clip": "max_norm"}], "give its parameters as a mapping"),
        (
            [{"clip": {"max_norm": 1, "per_layer": True}}, {"gaussian": {"multiplier": 1}}],
            "whole-update clip",
        ),
        (
            [{"clip": {"max_norm": float("inf")}}, {"gaussian": {"multiplier": 1}}],
            "finite clip bound",
        ),
        ([{"clip": {"max_norm": 1}, "prune": {"ratio": 0.1}}], "one-key mapping"),
    ],
)
def test_bad_lists_are_rejected_with_the_fix(defenses, message):
    with pytest.raises(ValueError, match=message):
        build_plan(defenses)


def test_every_registered_defense_says_what_it_does():
    assert all(kind.help and kind.stage for kind in DEFENSES.values())


def test_command_line_option_syntax():
    assert parse_defense_option("clip:max_norm=1.5,per_layer=true") == (
        "clip",
        {"max_norm": 1.5, "per_layer": True},
    )
    assert parse_defense_option("quantize") == ("quantize", {})
    with pytest.raises(ValueError, match="name:key=value"):
        parse_defense_option("clip:max_norm")


def _round(defenses, seed: int = 0):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    training = LocalTraining("fedavg", batch_size=2, local_steps=2, lr=0.1)
    clients = [
        Client(i, images[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2], training=training)
        for i in range(3)
    ]
    plan = build_plan(defenses)
    seen = []
    model = build_model("lenet", in_shape=(1, 8, 8), num_classes=3)
    Server(
        model,
        plan.wrap_clients(clients),
        listeners=[seen.append],
        seed=seed,
        **plan.server_kwargs(),
    ).run_round()
    return [o.update.flat for o in seen], torch.cat([p.flatten() for p in model.parameters()])


def test_disabled_defenses_change_nothing_in_a_round():
    plain_updates, plain_model = _round([])
    disabled = [
        {"clip": {"max_norm": float("inf")}},
        {"gaussian": {"sigma": 0}},
        {"prune": {"ratio": 0}},
        {"quantize": {"format": "fp32"}},
        {"laplace": {"scale": 0}},
        {"gaussian": {"multiplier": 0}},  # relative to the infinite clip above: disabled too
        {"norm_diff_clip": {"max_norm": float("inf")}},
        {"weak_dp": {"sigma": 0}},
        {"crfl": {"sigma": 0, "rho_offset": float("inf")}},
    ]
    updates, model = _round(disabled)
    assert all(torch.equal(a, b) for a, b in zip(plain_updates, updates))
    assert torch.equal(plain_model, model)


def test_the_server_sees_the_defended_update_and_runs_are_reproducible():
    a, _ = _round([{"clip": {"max_norm": 0.01}}, {"gaussian": {"sigma": 0.001}}])
    b, _ = _round([{"clip": {"max_norm": 0.01}}, {"gaussian": {"sigma": 0.001}}])
    c, _ = _round([{"clip": {"max_norm": 0.01}}, {"gaussian": {"sigma": 0.001}}], seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # clipped to 0.01, then noise of norm ~0.001 * sqrt(d)
    d = a[0].numel()
    assert all(abs(float(u.norm()) ** 2 - (0.01**2 + 1e-6 * d)) < 0.3 * 1e-6 * d for u in a)


def test_robust_aggregation_rules_from_a_list():
    plan = build_plan([{"trimmed_mean": {"beta": "0.25"}}, {"norm_diff_clip": {"max_norm": 5}}])
    hook = plan.server_kwargs()["aggregator"]
    assert isinstance(hook, NormDiffClip) and hook.aggregator.rule == "trimmed_mean"
    assert hook.aggregator.params == {"beta": 0.25}
    assert plan.to_list()[0] == {"trimmed_mean": {"beta": 0.25}}
    # a rule with defaults records them; a round runs through it
    updates, _ = _round([{"geometric_median": None}])
    assert len(updates) == 3


@pytest.mark.parametrize(
    "defenses, message",
    [
        ([{"krum": {}}], "defense krum needs f"),
        ([{"krum": {"f": 1.5}}], "f must be a whole number"),
        ([{"median": None}, {"krum": {"f": 1}}], "one aggregation rule per run"),
        ([{"trimmed_mean": {"beta": 0.7}}], r"0 <= beta < 0.5"),
        ([{"krum": {"f": 1}}, {"clip": {"max_norm": 1}}], "order of a round"),
    ],
)
def test_bad_aggregation_entries(defenses, message):
    with pytest.raises(ValueError, match=message):
        build_plan(defenses)


def test_krum_needs_enough_clients_at_the_round():
    with pytest.raises(ValueError, match=r"krum needs n >= 2f \+ 3 \(n=3, f=1\)"):
        _round([{"krum": {"f": 1}}])


def test_option_values_keep_commas_inside_brackets():
    from defenses.config import parse_name_params

    assert parse_name_params("byzantine:mode=random,ids=[0, 3],rounds=[2,null]") == (
        "byzantine",
        {"mode": "random", "ids": [0, 3], "rounds": [2, None]},
    )
    assert parse_name_params("label_flip:mapping={3: 9, 2: 1},fraction=0.1") == (
        "label_flip",
        {"mapping": {3: 9, 2: 1}, "fraction": 0.1},
    )
    assert parse_name_params("median") == ("median", {})
