"""Tests for leakage.metrics.

Expected PSNR and SSIM values come from scikit-image (``skimage.metrics.
peak_signal_noise_ratio`` and ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``), evaluated one image at a
time, as the independent oracle. A few closed-form cases check the formulas directly.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize
from torch import Tensor

from leakage.metrics import (
    DEFAULT_METRICS,
    ImageScores,
    check_metrics,
    label_accuracy,
    match_images,
    mse,
    psnr,
    score_images,
    ssim,
    ssim_matrix,
)
from leakage.metrics import images as image_metrics

SIZES = [(28, 28), (32, 32), (40, 24)]
NOISE_LEVELS = (0.02, 0.1, 0.3)  # as a fraction of data_range; a 4th pair is unrelated


@functools.cache
def _natural_image(channels: int) -> np.ndarray:
    """skimage's camera (gray) or astronaut (RGB) as float64 in [0, 1], shape (C, 512, 512)."""
    if channels == 1:
        return skdata.camera()[None].astype(np.float64) / 255.0
    return skdata.astronaut().transpose(2, 0, 1).astype(np.float64) / 255.0


def _make_pair(
    source: str, channels: int, size: tuple[int, int], data_range: float
) -> tuple[np.ndarray, np.ndarray]:
    """(original, reconstruction) batches, float64 in [0, data_range], shape (4, C, H, W)."""
    height, width = size
    seed = {"random0": 0, "random1": 1, "random2": 2, "natural": 3}[source]
    rng = np.random.default_rng(seed + 100 * channels + height + 7 * width)
    if source == "natural":
        image = _natural_image(channels)
        crops = []
        for top, left in [(40, 60), (150, 200), (300, 100), (220, 320)]:
            patch = image[:, top : top + 5 * height, left : left + 5 * width]
            crops.append(resize(patch, (channels, height, width), anti_aliasing=True))
        original = np.stack(crops)
        patch = image[:, 360 : 360 + 5 * height, 380 : 380 + 4 * width]
        unrelated = 1.0 - resize(patch, (channels, height, width), anti_aliasing=True)
    else:
        original = rng.random((4, channels, height, width))
        unrelated = rng.random((channels, height, width))
    recon = np.empty_like(original)
    for i, level in enumerate(NOISE_LEVELS):
        noisy = original[i] + level * rng.standard_normal(original[i].shape)
        recon[i] = np.clip(noisy, 0.0, 1.0)
    recon[3] = unrelated
    return original * data_range, recon * data_range


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5) -> float:
    """scikit-image SSIM of one (C, H, W) image; gray images are passed as 2-D arrays."""
    kwargs = dict(
        data_range=data_range, gaussian_weights=True, sigma=sigma, use_sample_covariance=False
    )
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], **kwargs))
    return float(structural_similarity(a, b, channel_axis=0, **kwargs))


CASES = list(
    itertools.product(
        ["random0", "random1", "random2", "natural"],
        [1, 3],
        SIZES,
        [1.0, 255.0],
        [torch.float32, torch.float64],
    )
)
# Equal to scikit-image within 1e-6 on float64 images, the bar the SSIM speed-up
# keeps. On float32 images scikit-image computes in float32 itself, so the two differ
# by its own float32 rounding.
SSIM_ATOL = {torch.float32: 1e-5, torch.float64: 1e-6}
CASE_IDS = [f"{s}-c{c}-{h}x{w}-r{int(r)}-{str(d)[6:]}" for s, c, (h, w), r, d in CASES]


@pytest.mark.parametrize(("source", "channels", "size", "data_range", "dtype"), CASES, ids=CASE_IDS)
def test_psnr_and_ssim_match_skimage(source, channels, size, data_range, dtype):
    original, recon = _make_pair(source, channels, size, data_range)
    x = torch.from_numpy(recon).to(dtype)
    y = torch.from_numpy(original).to(dtype)
    # The oracle sees exactly the values given to us (same dtype: skimage keeps float32).
    x_np, y_np = x.numpy(), y.numpy()
    want_psnr = [
        peak_signal_noise_ratio(y_np[i], x_np[i], data_range=data_range) for i in range(len(x_np))
    ]
    want_ssim = [_skimage_ssim(x_np[i], y_np[i], data_range) for i in range(len(x_np))]

    got_psnr = psnr(x, y, data_range=data_range)
    got_ssim = ssim(x, y, data_range=data_range)

    assert got_psnr.dtype == torch.float64 and got_psnr.shape == (4,)
    assert got_ssim.dtype == torch.float64 and got_ssim.shape == (4,)
    np.testing.assert_allclose(got_psnr.numpy(), want_psnr, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_ssim.numpy(), want_ssim, rtol=0, atol=SSIM_ATOL[dtype])
    # The batch spans good to unrelated reconstructions, so the comparison is not trivial.
    assert got_ssim[0] > got_ssim[1] > got_ssim[2] and got_ssim.max() - got_ssim.min() > 0.5
    assert got_psnr[0] > got_psnr[1] > got_psnr[2]


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_ssim_other_sigma_matches_skimage(sigma):
    original, recon = _make_pair("natural", 3, (32, 32), 1.0)
    got = ssim(torch.from_numpy(recon), torch.from_numpy(original), data_range=1.0, sigma=sigma)
    want = [_skimage_ssim(recon[i], original[i], 1.0, sigma=sigma) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_ssim_smallest_image_matches_skimage():
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 2, 3, 11, 11))
    got = ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=1.0)
    want = [_skimage_ssim(a[i], b[i], 1.0) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matrix_matches_skimage_for_every_pair(channels):
    """Every entry of the (B, R) matrix is scikit-image's SSIM of that pair."""
    original, recon = _make_pair("natural", channels, (32, 32), 1.0)
    rng = np.random.default_rng(3)
    extra = rng.random((2, channels, 32, 32))
    candidates = np.concatenate([recon, extra])  # R = 6 against B = 4
    got = ssim_matrix(torch.from_numpy(original), torch.from_numpy(candidates), data_range=1.0)
    want = [[_skimage_ssim(o, c, 1.0) for c in candidates] for o in original]
    assert got.shape == (4, 6) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_ssim_in_small_chunks_equals_ssim_in_one(monkeypatch):
    """A batch cut into chunks (large images, large batches) scores as one call."""
    original, recon = _make_pair("random1", 3, (28, 28), 1.0)
    x, y = torch.from_numpy(recon), torch.from_numpy(original)
    whole, pairs = ssim(x, y, data_range=1.0), ssim_matrix(x, y, data_range=1.0)
    monkeypatch.setattr(image_metrics, "_WORKSPACE", 1)  # one image per chunk
    assert len(image_metrics._chunks(4, 5 * x[0].numel())) == 4
    torch.testing.assert_close(ssim(x, y, data_range=1.0), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(ssim_matrix(x, y, data_range=1.0), pairs, rtol=0, atol=1e-12)


def test_match_images_by_ssim_recovers_shuffle():
    original, recon = _make_pair("natural", 3, (32, 32), 1.0)
    order = torch.tensor([2, 0, 1])  # the three reconstructions that resemble an original
    shuffled = torch.from_numpy(recon[:3])[order]
    perm = match_images(shuffled, torch.from_numpy(original[:3]), by="ssim", data_range=1.0)
    assert perm.tolist() == torch.argsort(order).tolist()
    with pytest.raises(ValueError, match="data_range"):
        match_images(shuffled, torch.from_numpy(original[:3]), by="ssim")
    with pytest.raises(ValueError, match="by must be one of mse, ssim"):
        match_images(shuffled, torch.from_numpy(original[:3]), by="lpips")


def test_ssim_of_batch_equals_ssim_of_each_image():
    original, recon = _make_pair("random0", 3, (28, 28), 1.0)
    x, y = torch.from_numpy(recon), torch.from_numpy(original)
    batched = ssim(x, y, data_range=1.0)
    single = torch.cat([ssim(x[i : i + 1], y[i : i + 1], data_range=1.0) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-12)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_identical_images_give_infinite_psnr_and_unit_ssim(data_range):
    original, _ = _make_pair("natural", 3, (32, 32), data_range)
    x = torch.from_numpy(original)
    assert torch.isinf(psnr(x, x.clone(), data_range=data_range)).all()
    torch.testing.assert_close(
        ssim(x, x.clone(), data_range=data_range),
        torch.ones(4, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    assert (mse(x, x.clone()) == 0).all()


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_closed_form_values(data_range):
    # Constant images a and b: MSE = (a - b)^2, and with zero variances the SSIM map
    # reduces to (2ab + C1) / (a^2 + b^2 + C1) everywhere (Wang et al., 2004, eq. 13).
    a, b = 0.2 * data_range, 0.3 * data_range
    x = torch.full((2, 3, 16, 12), a, dtype=torch.float32)
    y = torch.full((2, 3, 16, 12), b, dtype=torch.float32)
    y[1] = a  # second pair identical
    err = mse(x, y)
    assert err[0].item() == pytest.approx((a - b) ** 2, rel=1e-6)
    assert err[1].item() == 0.0
    assert psnr(x, y, data_range=data_range)[0].item() == pytest.approx(20.0, abs=1e-4)
    c1 = (0.01 * data_range) ** 2
    # float32 inputs hold 0.2 and 0.3 only approximately, so compare with the stored values.
    a32, b32 = x[0, 0, 0, 0].double().item(), y[0, 0, 0, 0].double().item()
    expected = (2 * a32 * b32 + c1) / (a32**2 + b32**2 + c1)
    assert ssim(x, y, data_range=data_range)[0].item() == pytest.approx(expected, abs=1e-9)


def test_label_accuracy_examples():
    assert label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    assert label_accuracy([2, 1, 2], [1, 2, 2]) == 1.0  # repeated labels count repeatedly
    assert label_accuracy([2, 2], [2, 2, 2]) == pytest.approx(2 / 3)
    assert label_accuracy([2, 0, 1], [0, 1, 2]) == 1.0
    assert label_accuracy(torch.tensor([3, 3, 3]), torch.tensor([3, 4, 5])) == pytest.approx(1 / 3)
    assert label_accuracy(np.array([7, 8]), [9, 10]) == 0.0
    assert label_accuracy([1, 2, 3, 4], [1, 2]) == 1.0  # extra predictions earn nothing more
    assert label_accuracy([1], [1, 1, 1, 1]) == 0.25
    assert label_accuracy(torch.tensor([[0], [5]]), (5, 0)) == 1.0
    assert label_accuracy([], [1, 2]) == 0.0
    assert isinstance(label_accuracy([1], [1]), float)


def _noisy_shuffled(n_orig: int, n_extra: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    original = rng.random((n_orig, 3, 12, 12))
    noisy = np.clip(original + 0.05 * rng.standard_normal(original.shape), 0, 1)
    pool = np.concatenate([noisy, rng.random((n_extra, 3, 12, 12))])
    shuffle = rng.permutation(len(pool))  # reconstructed[j] = pool[shuffle[j]]
    expected = np.argsort(shuffle)[:n_orig]  # reconstructed[expected[i]] = noisy[i]
    return (torch.from_numpy(pool[shuffle]), torch.from_numpy(original), torch.from_numpy(expected))


@pytest.mark.parametrize(("n_orig", "n_extra"), [(6, 0), (4, 3)])
def test_match_images_recovers_shuffle(n_orig, n_extra):
    recon, original, expected = _noisy_shuffled(n_orig, n_extra, seed=n_orig + n_extra)
    perm = match_images(recon, original)
    assert perm.dtype == torch.long and perm.shape == (n_orig,)
    assert torch.equal(perm, expected)


def test_match_images_minimises_total_mse():
    # Against brute force over all injective assignments; unrelated images make it nontrivial.
    rng = np.random.default_rng(11)
    original = torch.from_numpy(rng.random((4, 1, 3, 3)))
    recon = torch.from_numpy(rng.random((5, 1, 3, 3)))
    cost = ((original[:, None] - recon[None]) ** 2).flatten(2).mean(2)
    best = min(
        sum(cost[i, p[i]].item() for i in range(4)) for p in itertools.permutations(range(5), 4)
    )
    perm = match_images(recon, original)
    assert len(set(perm.tolist())) == 4
    assert sum(cost[i, perm[i]].item() for i in range(4)) == pytest.approx(best, abs=1e-12)


def test_score_images_is_invariant_to_shuffling():
    original_np, recon_np = _make_pair("natural", 3, (32, 32), 255.0)
    original, recon = torch.from_numpy(original_np), torch.from_numpy(recon_np)
    # Give the unrelated 4th reconstruction a closer stand-in so matching is unambiguous.
    recon[3] = (original[3] + 10.0).clamp(0, 255)
    reference = score_images(recon, original, data_range=255.0, match=False)
    shuffle = torch.tensor([2, 0, 3, 1])
    shuffled = score_images(recon[shuffle], original, data_range=255.0)
    assert isinstance(shuffled, ImageScores)
    assert torch.equal(recon[shuffle][shuffled.order], recon)
    for name in ("psnr", "ssim", "mse"):
        torch.testing.assert_close(getattr(shuffled, name), getattr(reference, name))
    assert torch.equal(reference.order, torch.arange(4))
    torch.testing.assert_close(reference.psnr, psnr(recon, original, data_range=255.0))


def test_score_images_with_extra_reconstructions():
    recon, original, expected = _noisy_shuffled(3, 2, seed=21)
    scores = score_images(recon, original, data_range=1.0)
    assert torch.equal(scores.order, expected)
    torch.testing.assert_close(scores.mse, mse(recon[expected], original))


def test_bad_inputs_raise_value_error():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x)
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x)
    with pytest.raises(ValueError, match="data_range"):
        score_images(x, x)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="data_range"):
            psnr(x, x, data_range=bad)
        with pytest.raises(ValueError, match="data_range"):
            ssim(x, x, data_range=bad)
    with pytest.raises(ValueError, match="same shape"):
        mse(x, torch.rand(2, 3, 16, 15))
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, torch.rand(3, 3, 16, 16), data_range=1.0)
    with pytest.raises(ValueError, match="4-D"):
        psnr(x[0], x[0], data_range=1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 10, 30), torch.rand(1, 1, 10, 30), data_range=1.0)
    with pytest.raises(ValueError, match="sigma"):
        ssim(x, x, data_range=1.0, sigma=0.0)
    with pytest.raises(ValueError, match="R >= B"):
        match_images(x[:1], x)
    with pytest.raises(ValueError, match="same C, H, W"):
        match_images(torch.rand(3, 1, 16, 16), x)
    with pytest.raises(ValueError, match="same shape"):
        score_images(torch.rand(3, 3, 16, 16), x, data_range=1.0, match=False)
    with pytest.raises(ValueError, match="at least one label"):
        label_accuracy([1], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_stay_on_device():
    original_np, recon_np = _make_pair("random1", 3, (28, 28), 1.0)
    x = torch.from_numpy(recon_np).float().cuda()
    y = torch.from_numpy(original_np).float().cuda()
    scores = score_images(x[[1, 0, 3, 2]], y, data_range=1.0)
    for value in (scores.psnr, scores.ssim, scores.mse, scores.order):
        assert value.device == y.device
    cpu = ssim(x.cpu(), y.cpu(), data_range=1.0)
    torch.testing.assert_close(ssim(x, y, data_range=1.0).cpu(), cpu, rtol=0, atol=1e-10)
    assert math.isfinite(scores.psnr.sum().item())


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, ("psnr", "ssim")),
        ([], ("psnr", "ssim")),
        ("ssim", ("psnr", "ssim")),
        ("lpips", ("psnr", "ssim", "lpips")),
        (" lpips , psnr ", ("psnr", "ssim", "lpips")),
        (("lpips", "ssim", "lpips"), ("psnr", "ssim", "lpips")),
    ],
)
def test_check_metrics_gives_names_in_order_with_psnr_and_ssim(given, expected):
    assert check_metrics(given) == expected
    assert DEFAULT_METRICS == ("psnr", "ssim")
