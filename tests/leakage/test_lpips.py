"""LPIPS (Zhang et al., CVPR 2018) through the lab's call path, against the ``lpips`` package.

The oracle is the authors' package itself, ``lpips.LPIPS(net=..., pnet_rand=True)`` built
after ``torch.manual_seed(seed)``: the package's shipped linear heads on a backbone with
torchvision's random initialisation. ``leakage.metrics.lpips(..., backbone_seed=seed)`` must
build the same network, so both give the same distances without the ImageNet weights, which
cannot be downloaded where these tests run. The numbers are therefore not LPIPS proper; what
is checked is the lab's part: mapping ``[0, data_range]`` to the package's ``[-1, 1]``,
gray-to-RGB, per-image float64 output, matching, input checks and the one-line errors.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import urllib.error
import warnings

import pytest
import torch

from leakage import metrics
from leakage.metrics import LPIPS_NETS, check_metrics, lpips, score_images
from leakage.metrics.perceptual import _LPIPS_MIN_SIZE

pytestmark = pytest.mark.usefixtures("torch_single_thread")

needs_lpips = pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None,
    reason="needs the lpips package: pip install -e '.[dev]'",
)

COMPARED_NETS = ("alex", "squeeze")  # vgg is checked for its minimum size only (slower)
# (data_range, input dtype): the package sees float32 in [0, 1] either way
RANGES = [
    pytest.param(r, t, id=f"{r:g}-{str(t).split('.')[1]}")
    for r, t in [
        (1.0, torch.float32),
        (1.0, torch.float64),
        (255.0, torch.float32),
        (255.0, torch.uint8),
    ]
]


@functools.cache
def _package_model(net: str, seed: int) -> torch.nn.Module:
    """The lpips package's network with a backbone drawn from ``torch.manual_seed(seed)``."""
    import lpips as package

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package passes torchvision's deprecated pretrained=
        torch.manual_seed(seed)
        return package.LPIPS(net=net, pnet_rand=True, verbose=False).eval()


def _package_lpips(x: torch.Tensor, y: torch.Tensor, net: str, seed: int, data_range: float):
    """The package's distances for images in [0, data_range], gray repeated to RGB."""
    x01, y01 = x.float() / data_range, y.float() / data_range
    if x.shape[1] == 1:
        x01, y01 = x01.repeat(1, 3, 1, 1), y01.repeat(1, 3, 1, 1)
    with torch.no_grad():  # normalize=True: the package's own [0, 1] -> [-1, 1]
        return _package_model(net, seed)(x01, y01, normalize=True).reshape(-1)


def _pair(seed: int, channels: int, size=(36, 40), data_range=1.0, dtype=torch.float32):
    """(x, y): 3 random images in [0, data_range] and a near, a far and an unrelated copy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, channels, *size, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = (x + torch.tensor([0.02, 0.2, 0.0]).view(3, 1, 1, 1) * noise).clamp(0, 1)
    y[2] = torch.rand(channels, *size, generator=g, dtype=torch.float64)
    x, y = x * data_range, y * data_range
    if dtype == torch.uint8:
        return x.round().to(dtype), y.round().to(dtype)
    return x.to(dtype), y.to(dtype)


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty LPIPS model cache for one test (restored after), so the call builds."""
    monkeypatch.setattr(metrics.perceptual, "_LPIPS_MODELS", {})


@needs_lpips
@pytest.mark.parametrize("net", COMPARED_NETS)
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("data_range, dtype", RANGES)
def test_matches_the_lpips_package(net, seed, channels, data_range, dtype):
    x, y = _pair(seed + channels, channels, data_range=data_range, dtype=dtype)
    got = lpips(x, y, net=net, data_range=data_range, backbone_seed=seed)
    expected = _package_lpips(x, y, net, seed, data_range)
    assert got.dtype == torch.float64 and got.shape == (3,)
    # float32 networks: the lab scales by 2 / data_range, the package by 2 after / data_range
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-6)
    assert got[0] < got[1] and (got > 0).all()  # more noise, farther; the package agrees


@needs_lpips
@pytest.mark.parametrize("net", COMPARED_NETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_identical_images_give_zero(net, channels):
    x, _ = _pair(3, channels)
    d = lpips(x, x.clone(), net=net, backbone_seed=0)
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64))  # unit features, no head bias


@needs_lpips
def test_score_images_scores_lpips_on_the_psnr_matching():
    """Every metric scores the pairs of the MSE matching (Zhu et al., 2019), LPIPS included."""
    g = torch.Generator().manual_seed(0)
    original = torch.rand(4, 3, 32, 32, generator=g)
    perm = torch.tensor([2, 0, 3, 1])  # reconstructed[j] is a noisy original[perm[j]]
    reconstructed = (original + 0.05 * torch.randn(original.shape, generator=g)).clamp(0, 1)[perm]
    scores = score_images(
        reconstructed, original, data_range=1.0, metrics="psnr,ssim,lpips", lpips_backbone_seed=0
    )
    assert torch.equal(scores.order, torch.argsort(perm))
    paired = reconstructed[scores.order]
    assert torch.equal(scores.lpips, lpips(paired, original, backbone_seed=0))
    torch.testing.assert_close(scores.psnr, metrics.psnr(paired, original, data_range=1.0))
    unmatched = lpips(reconstructed, original, backbone_seed=0)
    assert scores.lpips.max() < unmatched.min()  # 0.003 vs 0.08: the pairing matters
    by_index = score_images(
        paired, original, data_range=1.0, match=False, metrics=["lpips"], lpips_backbone_seed=0
    )
    assert torch.equal(by_index.lpips, scores.lpips)
    assert score_images(reconstructed, original, data_range=1.0).lpips is None  # not asked


@needs_lpips
@pytest.mark.parametrize("net", LPIPS_NETS)
def test_min_size_is_where_the_package_stops_working(net):
    """_LPIPS_MIN_SIZE[net] works in the package and one pixel less fails there, per side."""
    size = _LPIPS_MIN_SIZE[net]
    model = _package_model(net, 0)
    g = torch.Generator().manual_seed(1)
    for h, w, works in [(size, size, True), (size - 1, size - 1, False), (size - 1, 64, False)]:
        x = torch.rand(1, 3, h, w, generator=g)
        y = torch.rand(1, 3, h, w, generator=g)
        if works:
            with torch.no_grad():
                model(x, y, normalize=True)
            assert lpips(x, y, net=net, backbone_seed=0).shape == (1,)
            continue
        with pytest.raises(RuntimeError), torch.no_grad():  # a pooling output of size 0
            model(x, y, normalize=True)
        with pytest.raises(ValueError, match=f"at least {size}x{size} pixels .* got {h}x{w}"):
            lpips(x, y, net=net, backbone_seed=0)


@needs_lpips
def test_callers_random_state_is_left_as_it_was(fresh_cache, monkeypatch):
    x, y = _pair(0, 3)
    cuda_seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeded.append)
    torch.manual_seed(1234)
    cuda_seeded.clear()
    before = torch.get_rng_state()
    first = lpips(x, y, backbone_seed=3)  # builds the network: the backbone draws 2.5M numbers
    assert torch.equal(torch.get_rng_state(), before)
    assert cuda_seeded == []  # nor are the caller's CUDA generators reseeded
    metrics.perceptual._LPIPS_MODELS.clear()
    torch.manual_seed(99)  # another caller state, the same network
    assert torch.equal(lpips(x, y, backbone_seed=3), first)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"net": "resnet"}, "unknown LPIPS net 'resnet'; valid: alex, vgg, squeeze"),
        ({"backbone_seed": -1}, "backbone_seed must be None"),
        ({"backbone_seed": True}, "got True"),
        ({"backbone_seed": 1.5}, "got 1.5"),
        ({"backbone_seed": "3"}, "got '3'"),
        ({"backbone_seed": 2**64}, "[0, 2**64)"),
        ({"data_range": 0}, "data_range must be positive"),
        ({"data_range": None}, "data_range must be positive"),
    ],
)
def test_bad_options_are_refused(kwargs, needle):
    x, y = _pair(0, 3)
    with pytest.raises(ValueError) as e:
        lpips(x, y, **{"backbone_seed": 0, **kwargs})
    assert needle in _one_line(e)


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((2, 3, 30, 40), "at least 31x31 pixels for LPIPS with net='alex'; got 30x40"),
        ((2, 3, 20, 20), "net 'vgg' or 'squeeze' takes them"),
        ((2, 2, 32, 32), "1 or 3 channels; got 2"),
    ],
)
def test_images_lpips_cannot_take_are_refused(shape, needle, monkeypatch):
    x = torch.rand(shape)
    with pytest.raises(ValueError) as e:
        lpips(x, x, backbone_seed=0)
    assert needle in _one_line(e)

    def too_late(*_):
        raise AssertionError("matched before the LPIPS checks")

    monkeypatch.setattr(metrics.scoring, "match_images", too_late)
    with pytest.raises(ValueError) as e:  # score_images checks before any scoring
        score_images(x, x, data_range=1.0, metrics="psnr,ssim,lpips", lpips_backbone_seed=0)
    assert needle in _one_line(e)


@pytest.mark.parametrize("bad", ["psnr,fid", ["psnr", "LPIPS"], ["ssim", 3], 5, ""])
def test_unknown_metric_names_are_refused(bad):
    with pytest.raises(ValueError) as e:
        check_metrics(bad)
    assert "valid: psnr, ssim, lpips" in _one_line(e) or "comma-separated" in str(e.value)
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError):
        score_images(x, x, data_range=1.0, metrics=bad)


@needs_lpips
@pytest.mark.parametrize("entry", ["lpips", "score_images"])
def test_missing_weights_without_network_is_one_line_oserror(
    entry, tmp_path, monkeypatch, fresh_cache
):
    from torchvision.models import AlexNet_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    tried = []

    def offline(url, dst, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    x, y = _pair(0, 3)
    with pytest.raises(OSError) as e:
        if entry == "lpips":
            lpips(x, y)
        else:
            score_images(x, y, data_range=1.0, metrics="psnr,ssim,lpips")
    text = _one_line(e)
    url = AlexNet_Weights.IMAGENET1K_V1.url
    assert tried == [url] and url in text and str(tmp_path / "torch") in text
    assert "URLError" in text and "leave lpips out of the metrics" in text
    assert metrics.perceptual._LPIPS_MODELS == {}  # nothing half-built is kept


@needs_lpips
def test_corrupt_cached_weights_are_one_line_oserror(tmp_path, monkeypatch, fresh_cache):
    from torchvision.models import AlexNet_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = AlexNet_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a checkpoint")  # e.g. a download cut short
    x, y = _pair(0, 3)
    with pytest.raises(OSError) as e:
        lpips(x, y)
    text = _one_line(e)
    assert str(cached) in text and "delete the file and retry" in text


def test_missing_lpips_package_is_one_line_importerror(monkeypatch, fresh_cache):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    x, y = _pair(0, 3)
    for call in (
        lambda: lpips(x, y, backbone_seed=0),
        lambda: score_images(x, y, data_range=1.0, metrics="lpips", lpips_backbone_seed=0),
    ):
        with pytest.raises(ImportError) as e:
            call()
        assert "pip install 'leakage-lab[lpips]'" in _one_line(e)


@needs_lpips
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_numbers_on_the_device():
    x, y = _pair(0, 3)
    cpu = lpips(y, x, backbone_seed=0)
    scores = score_images(
        y.cuda()[[2, 0, 1]], x.cuda(), data_range=1.0, metrics="lpips", lpips_backbone_seed=0
    )
    assert scores.lpips.device == x.cuda().device and scores.lpips.dtype == torch.float64
    assert torch.equal(scores.order.cpu(), torch.tensor([1, 2, 0]))
    torch.testing.assert_close(scores.lpips.cpu(), cpu, rtol=1e-4, atol=1e-5)  # float32 kernels
