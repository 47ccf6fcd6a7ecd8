"""The ``best`` meta-attack: every applicable candidate, the one whose update fits kept.

Expected numbers: R-GAP is exact at batch 1 on a leaky-ReLU CNN6 (Zhu & Blaschko,
ICLR 2021, a closed form; breaching's R-GAP notebook reports 49.0 dB there), so
``best`` must return it at >= 45 dB without running the optimisation attacks;
the update distance of the true data is 0 up to float64 rounding (the same
computation as the client's), and of other images it is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_core import build_model, load_samples
from leakage import InvertingGradients, score_images
from leakage.app.experiment import AttackConfig, observe
from leakage.attacks.best import Best, update_distance


def _observe(model_name: str, activation: str | None = None, batch: int = 1):
    data = load_samples(count=batch)
    model = build_model(
        model_name,
        activation=activation,
        in_shape=data.shape,
        generator=torch.Generator().manual_seed(0),
    )
    return observe(AttackConfig(batch_size=batch), model, data)


def test_update_distance_is_zero_for_the_truth_only():
    obs, gt = _observe("lenet", "sigmoid")
    assert update_distance(obs, gt.images, gt.labels) < 1e-9
    noise = torch.rand(gt.images.shape, generator=torch.Generator().manual_seed(1))
    assert update_distance(obs, noise, gt.labels) > 1e-3
    wrong = (gt.labels + 1) % 10
    assert update_distance(obs, gt.images, wrong) > 1e-3


def test_best_takes_rgap_when_it_is_exact_and_stops(torch_single_thread):
    obs, gt = _observe("cnn6")
    rec = Best(steps=5).reconstruct(obs, generator=torch.Generator().manual_seed(0))
    report = rec.options["candidates"]
    assert rec.options["chosen"] == "rgap"
    assert report["spear"]["applies"] is False  # no first linear layer
    assert "ig" not in report  # an exact closed form stops the search
    assert float(score_images(rec.images, gt.images, data_range=1.0).psnr.min()) >= 45.0


def test_best_keeps_the_candidate_with_the_smallest_distance(torch_single_thread):
    obs, _ = _observe("lenet", "relu")
    rec = Best(attacks=("rgap", "ig", "dlg"), steps=20, dlg_steps=3).reconstruct(
        obs, generator=torch.Generator().manual_seed(0)
    )
    report = rec.options["candidates"]
    assert report["rgap"]["applies"] is False and "ReLU" in report["rgap"]["reason"]
    ran = {k: v["distance"] for k, v in report.items() if v["applies"]}
    assert set(ran) == {"ig", "dlg"}
    assert rec.options["chosen"] == min(ran, key=ran.get)
    support = rec.options["support"]  # dead ReLU units zero some entries: may be "nonzero"
    again = update_distance(obs, rec.images, rec.labels, support=support)
    assert rec.options["distance"] == pytest.approx(again)


def test_best_checks_its_candidates():
    with pytest.raises(ValueError, match="unknown attack"):
        Best(attacks=("nope",))
    with pytest.raises(ValueError, match="its own candidate"):
        Best(attacks=("best",))
    obs, _ = _observe("lenet", "relu")
    with pytest.raises(ValueError, match="no candidate attack applies.*rgap"):
        Best(attacks=("rgap",)).reconstruct(obs)


def test_support_matches_only_the_entries_a_pruned_update_kept():
    """The adaptive attack on pruning: the simulated update is zero wherever the
    observed one is, and equal to the client's computation elsewhere."""
    from defenses.transforms import Prune
    from leakage.simulate import UpdateSimulator

    obs, gt = _observe("lenet", "sigmoid")
    pruned = dataclasses.replace(obs, update=Prune(ratio=0.7)(obs.update))
    sim = UpdateSimulator(pruned, dtype=torch.float64)
    assert sim.restrict_to_support() == pytest.approx(0.3, abs=0.01)
    y = torch.nn.functional.one_hot(gt.labels, 10).double()
    with torch.enable_grad():
        dummy = sim(gt.images.double()[None], y[None])[0]
    kept = pruned.update.flat != 0
    assert bool((dummy[~kept] == 0).all())
    torch.testing.assert_close(dummy[kept].float(), pruned.update.flat[kept], rtol=1e-4, atol=1e-7)
    # the truth fits a pruned update exactly only when the dropped entries are ignored
    assert update_distance(pruned, gt.images, gt.labels, support="nonzero") < 1e-9
    assert update_distance(pruned, gt.images, gt.labels) > 1e-3
    assert Best().resolve_support(pruned) == "nonzero"
    assert Best().resolve_support(obs) == "all"


def test_support_is_checked():
    obs, _ = _observe("lenet", "sigmoid")
    with pytest.raises(ValueError, match="support must be one of all, nonzero"):
        InvertingGradients(steps=1, support="kept").reconstruct(obs)
    with pytest.raises(ValueError, match="support must be auto, all or nonzero"):
        Best(support="kept")
