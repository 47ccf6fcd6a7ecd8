"""Inverting gradients and the analytic attack.

* Geiping et al. (2020) recover CIFAR-sized images from untrained networks'
  gradients; here: the untrained sigmoid ResNet-18 (CIFAR stem), batch 1, the
  embedded astronaut photograph. Measured on 2 CPU cores: 16.9 dB after 100
  iterations, 22.8 dB after 300 (`leakage attack --attack ig --model resnet18
  --steps 300`), against ≈ 8 dB for the uniform random start.
* Phong et al. (2017): a first linear layer with bias reveals a single input
  exactly, x = ∂L/∂W_i / ∂L/∂b_i.
"""

from __future__ import annotations

import pytest
import torch

from fl_core import Client, Server, build_model, load_samples
from leakage import Analytic, InvertingGradients, psnr, score_images
from leakage.objectives import cosine_distance, total_variation


def observe(model, images, labels):
    seen, truth = [], []
    Server(
        model, [Client(0, images, labels)], listeners=[seen.append], truth_listeners=[truth.append]
    ).run_round()
    return seen[0], truth[0]


def test_cosine_distance_and_total_variation_by_hand():
    t = torch.tensor([1.0, 0.0])
    d = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    torch.testing.assert_close(cosine_distance(d, t), torch.tensor([0.0, 1.0, 2.0]))
    x = torch.zeros(2, 1, 1, 2, 2)
    x[1, 0, 0, 0, 0] = 1.0  # restart 1: one bright corner pixel
    # |dx| mean over 2 differences: 1/2; |dy| mean: 1/2
    torch.testing.assert_close(total_variation(x), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("steps, floor", [(100, 14.0)])
def test_ig_recovers_an_image_on_sigmoid_resnet18(torch_single_thread, steps, floor):
    """IG, 100 iterations (≈ 30 s on one core): well above the ≈ 8 dB of the random start."""
    data = load_samples(count=1)
    model = build_model(
        "resnet18", activation="sigmoid", generator=torch.Generator().manual_seed(0)
    )
    obs, truth = observe(model, data.images, data.labels)
    rec = InvertingGradients(steps=steps).reconstruct(
        obs, generator=torch.Generator().manual_seed(0)
    )
    start = torch.rand(data.images.shape, generator=torch.Generator().manual_seed(0))
    noise = float(psnr(start, truth.images, data_range=1.0)[0])
    score = float(psnr(rec.images, truth.images, data_range=1.0)[0])
    assert score >= floor and score >= noise + 5, (score, noise)
    assert rec.labels.tolist() == truth.labels.tolist()
    assert len(rec.history) == steps and rec.history[-1] < rec.history[0]


@pytest.mark.slow
def test_ig_reaches_20_db_on_sigmoid_resnet18():
    """The issue's bar: ≥ 20 dB within minutes on 2 CPU cores (300 iterations, ≈ 50 s)."""
    data = load_samples(count=1)
    model = build_model(
        "resnet18", activation="sigmoid", generator=torch.Generator().manual_seed(0)
    )
    obs, truth = observe(model, data.images, data.labels)
    rec = InvertingGradients(steps=300).reconstruct(obs, generator=torch.Generator().manual_seed(0))
    assert float(psnr(rec.images, truth.images, data_range=1.0)[0]) >= 20.0


@pytest.mark.parametrize("activation, batch", [("relu", 1), ("sigmoid", 1), ("relu", 4)])
def test_analytic_attack_is_exact(activation, batch):
    """Batch 1: exact for any activation. ReLU batches: rows active for one sample only."""
    data = load_samples(count=batch)
    model = build_model("mlp", activation=activation, generator=torch.Generator().manual_seed(0))
    obs, truth = observe(model, data.images, data.labels)
    rec = Analytic().reconstruct(obs)
    scores = score_images(rec.images, truth.images, data_range=1.0)
    assert bool((scores.psnr >= 60).all()), scores.psnr
    assert sorted(rec.labels.tolist()) == sorted(truth.labels.tolist())


def test_analytic_attack_cannot_mix_sigmoid_batches():
    """With sigmoid every neuron is active for every sample: no row isolates an image."""
    data = load_samples(count=4)
    model = build_model("mlp", activation="sigmoid", generator=torch.Generator().manual_seed(0))
    obs, truth = observe(model, data.images, data.labels)
    scores = score_images(Analytic().reconstruct(obs).images, truth.images, data_range=1.0)
    assert float(scores.psnr.max()) < 30


def test_analytic_attack_needs_a_first_linear_layer():
    data = load_samples(count=1)
    obs, _ = observe(build_model("lenet"), data.images, data.labels)
    with pytest.raises(ValueError, match="first layer is fully connected"):
        Analytic().reconstruct(obs)


def test_analytic_attack_is_exact_on_a_fedavg_delta_with_weight_decay():
    """One FedAvg step with weight decay λ: Δ = −η(G + λθ) on every parameter, so the
    ratio ΔW/Δb mixes in λθ; converting the delta with the revealed λ first makes the
    read-off exact again (x = ∂L/∂W_i / ∂L/∂b_i, Phong et al. 2018)."""
    from fl_core.client import LocalTraining

    data = load_samples(count=1)
    model = build_model("mlp", activation="relu", generator=torch.Generator().manual_seed(0))
    seen = []
    training = LocalTraining("fedavg", local_steps=1, lr=0.05, weight_decay=0.5)
    client = Client(0, data.images, data.labels, training=training)
    Server(model, [client], listeners=[seen.append], seed=0).run_round()
    obs = seen[0]
    assert obs.protocol.weight_decay == 0.5
    rec = Analytic().reconstruct(obs)
    scores = score_images(rec.images, data.images, data_range=1.0)
    assert bool((scores.psnr >= 60).all()), scores.psnr
