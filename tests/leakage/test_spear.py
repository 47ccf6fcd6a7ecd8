"""SPEAR (Dimitrov et al., NeurIPS 2024): exact batch recovery from a first ReLU linear layer.

Where the expected numbers come from: SPEAR is exact (the paper's claim, sec. 4:
the batch is the unique solution once B directions with the ReLU sparsity are
found), so the bars are exactness bounds, not measured levels:

* images: PSNR >= 60 dB, i.e. an RMS pixel error under 1e-3 of the range, far above
  what float32 gradients allow (measured 185-192 dB on the mlp victim, B = 4, and
  158-165 dB through ``leakage attack``);
* a synthetic float64 layer: inputs to 1e-6 absolute (entries of size ~1; the
  solve's own error is ~1e-12).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fl_core import Client, Server, build_model, load_samples
from fl_core.data import NORMALIZATION
from leakage import score_images
from leakage.app.cli import main
from leakage.attacks import spear_layer
from leakage.attacks.spear import Spear, spear_linear


def observe(model, images, labels):
    """The server's FedSGD observation of one client holding ``images`` and its ground truth."""
    seen, truth = [], []
    Server(
        model, [Client(0, images, labels)], listeners=[seen.append], truth_listeners=[truth.append]
    ).run_round()
    return seen[0], truth[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_spear_recovers_a_batch_of_four_exactly_on_the_relu_mlp(seed):
    """Four embedded photographs (labels 0-3), the mlp victim with CIFAR-10 normalisation."""
    data = load_samples(count=4)
    model = build_model(
        "mlp", normalize=NORMALIZATION["cifar10"], generator=torch.Generator().manual_seed(seed)
    )
    obs, truth = observe(model, data.images, data.labels)
    rec = Spear().reconstruct(obs, generator=torch.Generator().manual_seed(0))
    scores = score_images(rec.images, truth.images, data_range=1.0)
    assert bool((scores.psnr >= 60).all()), scores.psnr
    assert rec.labels[scores.order].tolist() == truth.labels.tolist()  # each image's own label
    assert rec.options["exact"] == 4 and rec.stopped == "closed-form", rec.options


def relu_layer(batch: int, m: int, n: int, seed: int):
    """A ReLU layer z = W·x + b on random inputs, with known per-sample output gradients.

    Returns ``(X (B, n), W (m, n), b (m,), Δ (B, m), ∂L/∂W = Δᵀ X, ∂L/∂b = Δᵀ 1)``;
    δ_j is zero wherever neuron i is inactive for sample j, as ReLU makes it.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, generator=g, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    active = (x @ w.T + b) > 0  # (B, m)
    deltas = torch.randn(batch, m, generator=g, dtype=torch.float64) * active  # (B, m)
    return x, w, b, deltas, deltas.T @ x, deltas.sum(0)


@pytest.mark.parametrize("batch, seed", [(1, 0), (4, 0), (4, 1), (8, 2)])
def test_spear_linear_recovers_a_synthetic_relu_layer_exactly(batch, seed):
    x, w, b, deltas, gw, gb = relu_layer(batch, m=256, n=64, seed=seed)
    res = spear_linear(gw, gb, w, b, batch, generator=torch.Generator().manual_seed(0))
    assert res.rank == batch and res.found == batch and bool(res.consistent.all())
    # the batch comes back in some order: pair each true input with its nearest recovery
    order = torch.cdist(x, res.inputs).argmin(1)
    assert sorted(order.tolist()) == list(range(batch))
    assert float((res.inputs[order] - x).abs().max()) < 1e-6
    assert float((res.deltas[order] - deltas).abs().max()) < 1e-6


def test_a_mixture_of_kept_directions_is_not_kept():
    """Regression: at B = 20 on CIFAR-10 a mixture of two found samples' directions passed
    the independence test (its smallest singular value, 8e-8 of the largest, came from
    float32 rounding only), Q became numerically singular and all 20 inputs came out
    wrong. Here: three true directions, the fourth missing, and the mixture of two of
    them plus 1e-7 noise; only the three true ones may be kept."""
    batch = 4
    x, w, b, deltas, gw, gb = relu_layer(batch, m=256, n=64, seed=0)
    u, s, vh = torch.linalg.svd(gw, full_matrices=False)
    lmat, rmat = u[:, :batch], s[:batch, None] * vh[:batch]
    true = [lmat.T @ d / (lmat.T @ d).norm() for d in deltas]  # each sample's direction
    noise = torch.randn(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixture = true[1] + 0.5 * true[2]
    mixture = mixture / mixture.norm() + 1e-7 * noise
    zeros = [d == 0 for d in deltas]
    directions = [true[0], true[1], true[2], mixture]
    patterns = [zeros[0], zeros[1], zeros[2], zeros[1] & zeros[2]]
    *_, kept = spear_layer._solve(lmat, rmat, gb, w, b, directions, patterns, batch, 1e-5)
    assert sorted(kept) == [0, 1, 2]


def test_spear_linear_checks_its_inputs():
    x, w, b, deltas, gw, gb = relu_layer(4, m=32, n=8, seed=0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"shaped \(m, n\)"):
        spear_linear(gw, gb[:-1], w, b, 4, generator=g)
    with pytest.raises(ValueError, match="between 1 and min"):
        spear_linear(gw, gb, w, b, 9, generator=g)
    with pytest.raises(ValueError, match="zero"):
        spear_linear(torch.zeros_like(gw), gb, w, b, 4, generator=g)


@pytest.mark.parametrize(
    "model, activation, needle",
    [
        ("mlp", "sigmoid", "followed by ReLU"),
        ("cnn6", None, "first layer is fully connected"),
        ("lenet", "relu", "first layer is fully connected"),
    ],
)
def test_spear_refuses_victims_it_cannot_invert(model, activation, needle):
    data = load_samples(count=2)
    obs, _ = observe(build_model(model, activation=activation), data.images, data.labels)
    with pytest.raises(ValueError) as info:
        Spear().reconstruct(obs)
    message = str(info.value)
    assert needle in message and "SPEAR" in message and "\n" not in message, message
    assert "analytic" not in message  # not another attack's message


def test_cli_spear_on_the_mlp_batch_of_four(tmp_path, capsys):
    argv = ["attack", "--attack", "spear", "--model", "mlp", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["attack"] == "spear" and res["config"]["batch_size"] == 4
    assert len(res["images"]) == 4 and min(i["psnr"] for i in res["images"]) >= 60
    assert res["summary"]["label_accuracy"] == 1.0
    assert res["attack"]["options"]["exact"] == 4


def test_cli_spear_refuses_a_conv_victim_in_one_line(tmp_path, capsys):
    argv = ["attack", "--attack", "spear", "--model", "cnn6", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SPEAR needs" in err and "Traceback" not in err
