"""The packages' public API and the defenses' skeleton.

Each package declares its public names in a sorted ``__all__`` and every listed
name exists; imports run one way, app -> library -> defenses -> fl_core (the
architecture page, docs/architecture.md).
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import defenses
from fl_core import Client, LocalTraining, Server, Update, build_model

PACKAGES = [
    "fl_core",
    "fl_core.adversaries",
    "fl_core.adversary_base",
    "fl_core.batched",
    "fl_core.data",
    "fl_core.flower",
    "fl_core.images",
    "fl_core.malicious",
    "fl_core.models",
    "fl_core.normalization",
    "fl_core.victims",
    "leakage",
    "leakage.attacks",
    "leakage.attacks.cocktail",
    "leakage.attacks.cpa",
    "leakage.attacks.inverting",
    "leakage.attacks.inverting_defaults",
    "leakage.attacks.inverting_loop",
    "leakage.attacks.rgap",
    "leakage.attacks.rgap_chain",
    "leakage.attacks.spear",
    "leakage.attacks.spear_layer",
    "leakage.metrics",
    "leakage.metrics.images",
    "leakage.metrics.labels",
    "leakage.metrics.perceptual",
    "leakage.metrics.scoring",
    "leakage.app.attacked_round",
    "leakage.app.fl_config",
    "leakage.app.outputs",
    "leakage.app.sweep",
    "defenses",
    "defenses.crfl",
    "defenses.crfl_certificate",
    "defenses.robust",
    "defenses.robust_rules",
]

MOVED = [  # (the path callers used before a module was split, where the name lives now)
    ("leakage.metrics.score_images", "leakage.metrics.scoring.score_images"),
    ("leakage.metrics.ssim", "leakage.metrics.images.ssim"),
    ("leakage.metrics.lpips", "leakage.metrics.perceptual.lpips"),
    ("leakage.metrics.label_accuracy", "leakage.metrics.labels.label_accuracy"),
    ("leakage.attacks.inverting.TUNED", "leakage.attacks.inverting_defaults.TUNED"),
    ("leakage.attacks.inverting.tuned_options", "leakage.attacks.inverting_defaults.tuned_options"),
    ("leakage.attacks.inverting.COMPILE_STEPS", "leakage.attacks.inverting_loop.COMPILE_STEPS"),
    (
        "leakage.attacks.inverting.VanishingGradientWarning",
        "leakage.attacks.inverting_loop.VanishingGradientWarning",
    ),
    ("leakage.attacks.cpa.cocktail_party", "leakage.attacks.cocktail.cocktail_party"),
    ("leakage.attacks.spear_linear", "leakage.attacks.spear_layer.spear_linear"),
    ("leakage.attacks.SpearResult", "leakage.attacks.spear_layer.SpearResult"),
    ("leakage.attacks.rgap.rgap_chain", "leakage.attacks.rgap_chain.rgap_chain"),
    ("leakage.app.fl_cmd.FLConfig", "leakage.app.fl_config.FLConfig"),
    ("leakage.app.fl_cmd.load_fl_config", "leakage.app.fl_config.load_fl_config"),
    ("leakage.app.fl_cmd.EXECUTION_KEYS", "leakage.app.fl_config.EXECUTION_KEYS"),
    ("leakage.app.experiment.observe", "leakage.app.attacked_round.observe"),
    ("leakage.app.experiment.observe_round", "leakage.app.attacked_round.observe_round"),
    ("leakage.app.experiment.dp_ready", "leakage.app.attacked_round.dp_ready"),
    ("leakage.app.experiment.AttackConfig", "leakage.app.config.AttackConfig"),
    ("leakage.app.experiment.prepare_out", "leakage.app.outputs.prepare_out"),
    ("fl_core.models.InputNormalization", "fl_core.victims.InputNormalization"),
    ("fl_core.models.LeNet", "fl_core.victims.LeNet"),
    ("fl_core.models.ResNet20", "fl_core.victims.ResNet20"),
    ("fl_core.adversaries.Adversary", "fl_core.adversary_base.Adversary"),
    ("fl_core.adversaries.random_update", "fl_core.adversary_base.random_update"),
    ("fl_core.data.ImageData", "fl_core.images.ImageData"),
    ("fl_core.data.NORMALIZATION", "fl_core.normalization.NORMALIZATION"),
    ("fl_core.data.dataset_normalization", "fl_core.normalization.dataset_normalization"),
    ("defenses.crfl.ThreatModel", "defenses.crfl_certificate.ThreatModel"),
    ("defenses.crfl.certified_radius", "defenses.crfl_certificate.certified_radius"),
    ("defenses.crfl.top_two_bounds", "defenses.crfl_certificate.top_two_bounds"),
    ("defenses.robust.krum", "defenses.robust_rules.krum"),
    ("defenses.robust.bulyan", "defenses.robust_rules.bulyan"),
    ("defenses.robust.geometric_median", "defenses.robust_rules.geometric_median"),
]


def _resolve(path: str) -> object:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("old", "new"), MOVED, ids=[old for old, _ in MOVED])
def test_moved_names_still_import_from_their_old_paths(old, new):
    """Splitting a module by concept keeps every name its callers imported: the
    old path gives the very object the new module defines."""
    assert _resolve(old) is _resolve(new)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_unique_and_complete(package):
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert names, f"{package}.__all__ is empty"
    assert names == sorted(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)  # noqa: S102 -- star import of __all__
    assert set(namespace) - {"__builtins__"} == set(names)


def test_import_direction():
    """The layering: ``fl_core`` imports neither ``leakage`` nor ``defenses``;
    ``defenses`` imports ``fl_core`` only; the attacker's library (``leakage`` and its
    attacks, labels, metrics) never imports the application (``leakage.app``), while
    the public API still reaches the application's entry points (a fresh
    interpreter, so that this test session's imports do not count)."""
    code = (
        "import sys\n"
        "def loaded(*tops):\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in tops)\n"
        "import fl_core\n"
        "bad = loaded('leakage', 'defenses')\n"
        "import defenses\n"
        "bad += loaded('leakage')\n"
        "import leakage, leakage.attacks, leakage.labels, leakage.metrics, leakage.simulate\n"
        "bad += [m for m in sys.modules if m.startswith('leakage.app')]\n"
        "from leakage import run_attack, AttackConfig\n"
        "bad += [] if run_attack.__module__ == 'leakage.app.experiment' else ['run_attack']\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# ---------------------------------------------------------------- defenses skeleton


def _update() -> Update:
    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(3, generator=g), torch.randn(2, 2, generator=g))
    return Update(tensors, "gradient", num_samples=2, client_id=1, round=3)


def test_identity_returns_the_update_untouched():
    update = _update()
    copies = [t.clone() for t in update.tensors]
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    out = defenses.Identity()(update, generator=generator)
    assert out is update
    for got, want in zip(out.tensors, copies, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(generator.get_state(), state)  # draws no randomness


def test_identity_in_a_round_changes_nothing():
    def run(client_defenses) -> torch.Tensor:
        model = build_model("lenet", in_shape=(1, 8, 8))
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        training = LocalTraining("fedavg", batch_size=2, local_steps=2, lr=0.1)
        clients = [Client(0, x[:2], y[:2], training=training), Client(1, x, y, training=training)]
        Server(model, clients, client_defenses=client_defenses, seed=2).run_round()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run([defenses.Identity()]), run([]))


def test_compose_applies_in_order():
    calls: list[tuple[str, torch.Generator]] = []

    def add_one(update: Update, *, generator: torch.Generator) -> Update:
        calls.append(("add_one", generator))
        return update.with_flat(update.flat + 1)

    def double(update: Update, *, generator: torch.Generator) -> Update:
        calls.append(("double", generator))
        return update.with_flat(update.flat * 2)

    update = Update((torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])), "delta", num_samples=4)
    g = torch.Generator().manual_seed(0)
    out = defenses.compose(add_one, double)(update, generator=g)
    assert torch.equal(out.flat, torch.tensor([4.0, 6.0, 3.0]))  # (x + 1) * 2 by hand
    assert calls == [("add_one", g), ("double", g)]  # in order, same generator
    assert (out.kind, out.num_samples) == ("delta", 4)
    reverse = defenses.compose(double, add_one)(update, generator=g)
    assert torch.equal(reverse.flat, torch.tensor([3.0, 5.0, 2.0]))  # x * 2 + 1
    assert defenses.compose()(update, generator=g) is update
