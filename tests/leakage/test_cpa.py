"""The Cocktail Party Attack (Kariyappa et al., ICML 2023): ICA on a linear layer's gradient.

Where the expected numbers come from:

* Synthetic sources: ICA identifies independent non-Gaussian sources up to
  order, sign and scale (Comon 1994); |correlation| > 0.99 with every true
  source is the usual bar. scikit-learn's ``FastICA`` (parallel, log cosh) is
  the reference implementation of :func:`fast_ica`: the same sources to
  1e-6 in correlation.
* Scale and sign from the bias gradient: exact algebra (∂L/∂b = A·1, see
  the module docstring), so inputs come back to 1e-6 relative.
* Victims: measured in this lab (the paper reports LPIPS on trained
  networks, not PSNR fractions). The ``mlp`` floors sit below the
  measurements quoted in each test; ``benchmarks/results/cpa/summary.md``
  has the same attack over many CIFAR-10 batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fl_core import Client, Server, build_model, load_dataset, load_samples
from leakage import build_attack, score_images
from leakage.attacks.cocktail import _rescale
from leakage.attacks.cpa import CPA, _front_end, cocktail_party
from leakage.attacks.ica import fast_ica

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10" / "test"


def _laplace(n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return -u.sign() * torch.log1p(-2 * u.abs())


def synthetic(k: int, m: int, n: int, seed: int):
    """k independent non-Gaussian sources (square waves, uniform, Laplace noise) with
    non-zero means, mixed by a random (m, k) matrix: ``(sources, mixing)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)
    rows = []
    for i in range(k):
        if i % 3 == 0:
            rows.append(torch.sign(torch.sin(t * 0.01 * (i + 1) + i)))
        elif i % 3 == 1:
            rows.append(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)
        else:
            rows.append(_laplace(n, g))
    sources = torch.stack(rows) + torch.arange(1, k + 1, dtype=torch.float64)[:, None]
    return sources, torch.randn(m, k, generator=g, dtype=torch.float64)


def matched_correlation(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|corr| of each true row (k, n) with its estimate, rows paired by the best assignment."""
    e = estimate - estimate.mean(1, keepdim=True)
    t = truth - truth.mean(1, keepdim=True)
    c = ((t / t.norm(dim=1, keepdim=True)) @ (e / e.norm(dim=1, keepdim=True)).T).abs()
    rows, cols = linear_sum_assignment(-c.numpy())
    return c[rows, cols]


def observe(model, images, labels):
    seen, truth = [], []
    Server(
        model, [Client(0, images, labels)], listeners=[seen.append], truth_listeners=[truth.append]
    ).run_round()
    return seen[0], truth[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_ica_recovers_sources_and_agrees_with_scikit_learn(seed):
    sklearn = pytest.importorskip("sklearn.decomposition")
    sources, mixing = synthetic(6, 20, 4000, seed)
    mixtures = mixing @ sources  # (20, 4000)
    ours = fast_ica(mixtures, 6, generator=torch.Generator().manual_seed(seed)) @ mixtures
    assert float(matched_correlation(ours, sources).min()) > 0.99
    ref = sklearn.FastICA(n_components=6, whiten="unit-variance", random_state=seed, tol=1e-8)
    theirs = torch.from_numpy(ref.fit_transform(mixtures.numpy().T).T)
    assert float(matched_correlation(ours, theirs).min()) > 1 - 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_cocktail_party_unmixes_synthetic_sources_to_scale(seed):
    """The paper's objective (negentropy + mutual independence, no image prior) from FastICA's
    start; the bias gradient A·1 then gives every source its scale and sign."""
    sources, mixing = synthetic(6, 20, 4000, seed)
    res = cocktail_party(
        mixing @ sources,
        mixing.sum(1),
        6,
        steps=200,
        init="fastica",
        generator=torch.Generator().manual_seed(seed),
    )
    assert float(matched_correlation(res.inputs, sources).min()) > 0.99
    rows, cols = linear_sum_assignment(torch.cdist(sources, res.inputs).numpy())
    err = (res.inputs[cols] - sources[rows]).norm() / sources.norm()
    assert float(err) < 0.05, float(err)  # |corr| 0.999 leaves a few % of the others


def test_bias_gradient_gives_exact_scale_and_sign():
    """Sources S = D·X with unknown signs and scales: Â = G·S⁺ = A·D⁻¹ and A·1 = Â·diag(D)."""
    sources, mixing = synthetic(6, 20, 500, 0)
    d = torch.tensor([-3.0, 0.5, 2.0, -0.1, 7.0, -1.0], dtype=torch.float64)
    g = mixing @ sources
    got = _rescale(d[:, None] * sources, g, mixing.sum(1), "bias")
    torch.testing.assert_close(got, sources, rtol=1e-9, atol=1e-9)
    ranged = _rescale(d[:, None] * sources, g, mixing.sum(1), "range")
    assert bool((ranged.amin(1) == 0).all() and (ranged.amax(1) == 1).all())
    r = ranged - ranged.mean(1, keepdim=True)
    t = sources - sources.mean(1, keepdim=True)
    corr = (r * t).sum(1) / (r.norm(dim=1) * t.norm(dim=1))  # signed, row by row
    assert float(corr.min()) > 1 - 1e-9, corr


def test_mlp_batch_of_8_photographs():
    """Eight embedded photographs, ReLU ``mlp``: measured 8/8 at >= 20 dB (20.7 to 48.1,
    mean 36.3 dB)."""
    data = load_samples(count=8)
    model = build_model("mlp", activation="relu", generator=torch.Generator().manual_seed(0))
    obs, truth = observe(model, data.images, data.labels)
    rec = CPA().reconstruct(obs, generator=torch.Generator().manual_seed(0))
    scores = score_images(rec.images, truth.images, data_range=1.0)
    assert rec.options["stage"] == "linear" and rec.options["rank"] == 8
    assert float((scores.psnr >= 20).double().mean()) >= 0.75, scores.psnr
    assert float(scores.psnr.mean()) >= 30, scores.psnr


@pytest.mark.skipif(not CIFAR.is_dir(), reason="CIFAR-10 test images not in ../shared/datasets")
def test_mlp_batch_of_8_cifar10_images():
    """A seeded CIFAR-10 test batch of 8: measured 8/8 at >= 20 dB (mean 33.7 dB) in the
    edges domain, 6/8 (mean 23.7 dB) in the paper's pixel domain."""
    data = load_dataset(str(CIFAR))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:8].tolist()
    batch = data.subset(idx)
    model = build_model("mlp", activation="relu", generator=torch.Generator().manual_seed(3))
    obs, truth = observe(model, batch.images, batch.labels)
    edges = score_images(CPA().reconstruct(obs).images, truth.images, data_range=1.0).psnr
    pixels = score_images(
        CPA(domain="pixels").reconstruct(obs).images, truth.images, data_range=1.0
    ).psnr
    assert float((edges >= 20).double().mean()) >= 0.875 and float(edges.mean()) >= 28, edges
    assert float(edges.mean()) > float(pixels.mean()) + 5, (edges, pixels)


def test_feature_stage_on_lenet():
    """LeNet (ReLU), 4 photographs. CPA unmixes the classifier's 768 input features (12x8x8
    maps, edges domain). The untrained features are strongly correlated across images, so
    only some come out clean: measured |corr| with the true features 0.32, 0.82, 0.96,
    0.998. Feature inversion (300 steps) then gives 12.4, 14.8, 10.1, 19.8 dB against 8.4 dB
    for the U[0, 1] start."""
    data = load_samples(count=4)
    model = build_model("lenet", activation="relu", generator=torch.Generator().manual_seed(0))
    obs, truth = observe(model, data.images, data.labels)
    net = obs.model()
    front = _front_end(net, net.fc)
    with torch.no_grad():
        features = front(truth.images).double()  # (4, 768)
    res = cocktail_party(
        obs.update.tensors[-2], obs.update.tensors[-1], 4, shape=(12, 8, 8), domain="edges", tv=0
    )
    corr = matched_correlation(res.inputs, features).sort().values
    assert float(corr[-1]) > 0.99, corr  # one feature vector comes out clean
    rec = CPA(feature_steps=300).reconstruct(obs)
    assert rec.options["stage"] == "features"
    scores = score_images(rec.images, truth.images, data_range=1.0)
    start = torch.rand(truth.images.shape, generator=torch.Generator().manual_seed(0))
    floor = float(score_images(start, truth.images, data_range=1.0).psnr.mean())
    assert float(scores.psnr.mean()) > floor + 3 and float(scores.psnr.max()) > 17, scores.psnr


@pytest.mark.parametrize(
    "model, batch, attack, message",
    [
        ("lenet", 10, {}, "at most 9 inputs"),
        ("mlp", 2, {"layer": 1}, "not a linear layer's weight; valid: 0, 2, 4"),
        ("lenet", 2, {"feature_steps": 0}, "reads features, not pixels"),
    ],
)
def test_input_errors_say_what_to_fix(model, batch, attack, message):
    data = load_samples(count=batch)
    obs, _ = observe(build_model(model, activation="relu"), data.images, data.labels)
    with pytest.raises(ValueError, match=message):
        CPA(**attack).reconstruct(obs)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"init": "pca"}, "init must be one of"),
        ({"scale": "oracle"}, "scale must be one of"),
        ({"domain": "fourier"}, "domain must be one of"),
        ({"steps": -1}, "steps must be a non-negative integer"),
        ({"label_strategy": "joint"}, "not 'joint'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        CPA(**options)


def test_cocktail_party_refuses_more_sources_than_the_layer_has():
    with pytest.raises(ValueError, match=r"between 1 and min\(m, n\) = 5"):
        cocktail_party(torch.randn(5, 40), torch.randn(5), 6)
    with pytest.raises(ValueError, match="needs the bias gradient"):
        cocktail_party(torch.randn(5, 40), None, 2)


def test_registered_and_reproducible():
    data = load_samples(count=2)
    model = build_model("mlp", activation="relu", width=64)
    obs, _ = observe(model, data.images, data.labels)
    attack = build_attack("cpa", steps=50)
    assert isinstance(attack, CPA)
    a = attack.reconstruct(obs, generator=torch.Generator().manual_seed(1))
    b = attack.reconstruct(obs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and len(a.history) == 50
    assert a.images.shape == (2, 3, 32, 32) and math.isfinite(a.loss)
