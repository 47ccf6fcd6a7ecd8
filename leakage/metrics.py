"""Image-reconstruction and label-recovery metrics for gradient-leakage attacks.

Image metrics take batches ``(B, C, H, W)`` of any real dtype and return one float64 value
per image, shape ``(B,)``, on the input device; they compute in float64.

References:
    Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from
    error visibility to structural similarity", IEEE Trans. Image Processing 13(4), 2004.
    R. Zhang, P. Isola, A. A. Efros, E. Shechtman, O. Wang, "The Unreasonable Effectiveness
    of Deep Features as a Perceptual Metric", CVPR 2018 (LPIPS; computed with the authors'
    ``lpips`` package, an optional dependency: ``pip install 'leakage-lab[lpips]'``).
    L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019 (reconstructions
    are matched to originals before scoring, since the attack returns them unordered).
    H. W. Kuhn, "The Hungarian method for the assignment problem", Naval Research
    Logistics Quarterly 2, 1955 (minimum-cost matching).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "DEFAULT_METRICS",
    "IMAGE_METRICS",
    "LPIPS_NETS",
    "ImageScores",
    "check_metrics",
    "label_accuracy",
    "label_count_accuracy",
    "label_set_accuracy",
    "lpips",
    "match_images",
    "mse",
    "psnr",
    "score_images",
    "ssim",
]

IMAGE_METRICS = ("psnr", "ssim", "lpips")
"""Per-image metrics :func:`score_images` can report (PSNR and SSIM always are)."""
DEFAULT_METRICS = ("psnr", "ssim")
"""What :func:`score_images` reports unless told otherwise."""

_TRUNCATE = 3.5  # Gaussian window truncated at 3.5 sigma, as in Wang et al. (2004).


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor shaped (B, C, H, W); got {type(x)!r}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W); got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one image; got shape {tuple(x.shape)}")


def _check_pair(x: Tensor, y: Tensor) -> None:
    _check_images(x, "x")
    _check_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape (B, C, H, W); got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def _is_positive(value: object) -> bool:
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return real and math.isfinite(value) and value > 0


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_data_range(data_range: float | None) -> float:
    if not _is_positive(data_range):
        raise ValueError(
            f"data_range is required and must be positive (e.g. 1.0 or 255.0); got {data_range!r}"
        )
    return float(data_range)


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image, over all ``C * H * W`` values.

    Args:
        x: Images, shape ``(B, C, H, W)``.
        y: Images, shape ``(B, C, H, W)``.

    Returns:
        Float64 tensor of shape ``(B,)`` on ``x.device``.

    Raises:
        ValueError: If the inputs are not 4-D tensors of equal shape.
    """
    _check_pair(x, y)
    return (x.double() - y.double().to(x.device)).square().flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor, *, data_range: float | None = None) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 * log10(data_range**2 / MSE)`` in dB.

    This is the PSNR reported by gradient-inversion papers (e.g. Zhu et al., 2019); it
    matches ``skimage.metrics.peak_signal_noise_ratio`` applied to each image.

    Args:
        x: Images, shape ``(B, C, H, W)``.
        y: Images, shape ``(B, C, H, W)``.
        data_range: Distance between the smallest and largest possible pixel value
            (1.0 for images in [0, 1], 255.0 for 8-bit images). Required.

    Returns:
        Float64 tensor of shape ``(B,)`` in dB on ``x.device``; ``inf`` where the images
        are identical.

    Raises:
        ValueError: If ``data_range`` is missing or not positive, or the shapes differ.
    """
    dr = _check_data_range(data_range)
    err = mse(x, y)
    return 10.0 * torch.log10(dr * dr / err)


def _gaussian_window(sigma: float, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian of radius ``int(3.5 * sigma + 0.5)``, shape ``(2r + 1,)``."""
    radius = int(_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 * (offsets / sigma).square())
    return weights / weights.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity index per image (Wang et al., 2004).

    Local means, variances and covariance come from a Gaussian window of standard
    deviation ``sigma`` truncated at 3.5 sigma (11 x 11 for ``sigma = 1.5``), with
    population (biased) statistics. The SSIM map

        ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    with ``C1 = (k1 * data_range)**2`` and ``C2 = (k2 * data_range)**2``, is computed per
    channel only where the window fits inside the image ('valid' convolution) and averaged
    over those positions and the channels. This equals ``skimage.metrics.
    structural_similarity(..., channel_axis=0, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False)``, which crops the window radius from each border.

    Args:
        x: Images, shape ``(B, C, H, W)``, with ``H`` and ``W`` at least the window size.
        y: Images, shape ``(B, C, H, W)``.
        data_range: Distance between the smallest and largest possible pixel value.
            Required.
        sigma: Standard deviation of the Gaussian window, in pixels.
        k1: Luminance stabilising constant.
        k2: Contrast stabilising constant.

    Returns:
        Float64 tensor of shape ``(B,)`` on ``x.device``; 1.0 for identical images.

    Raises:
        ValueError: On missing/non-positive ``data_range``, non-positive ``sigma``, ``k1``
            or ``k2``, shape mismatch, or images smaller than the window.
    """
    dr = _check_data_range(data_range)
    _check_pair(x, y)
    for name, value in (("sigma", sigma), ("k1", k1), ("k2", k2)):
        if not _is_positive(value):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    window = _gaussian_window(float(sigma), x.device)
    size = window.numel()
    _, channels, height, width = x.shape
    if height < size or width < size:
        raise ValueError(
            f"images must be at least {size}x{size} pixels for SSIM with sigma={sigma}; "
            f"got {height}x{width}"
        )
    xd, yd = x.double(), y.double().to(x.device)
    # One separable 'valid' filter pass over the five statistics of every channel of every
    # image. Folding channels into the batch is the depthwise (groups = channels) convolution
    # without its slow float64 CPU kernel.
    stacked = torch.cat([xd, yd, xd * xd, yd * yd, xd * yd], dim=1)
    planes = stacked.reshape(-1, 1, height, width)
    planes = F.conv2d(planes, window.view(1, 1, size, 1))
    planes = F.conv2d(planes, window.view(1, 1, 1, size))
    filtered = planes.reshape(stacked.shape[0], stacked.shape[1], *planes.shape[-2:])
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.split(channels, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * dr) ** 2
    c2 = (k2 * dr) ** 2
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


LPIPS_NETS = ("alex", "vgg", "squeeze")
"""Backbones of the ``lpips`` package; ``alex`` is the paper's recommended metric."""

_LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}
# The smallest H and W each backbone's last LPIPS layer still has a pixel for (AlexNet's
# stride-4 first convolution and two max-pools; VGG-16's four max-pools; SqueezeNet's three);
# checked against the package in tests/leakage/test_lpips.py.

_LPIPS_WEIGHTS = {  # torchvision weight enums the lpips package's backbones load
    "alex": "AlexNet_Weights",
    "vgg": "VGG16_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}

_LPIPS_MODELS: dict[tuple[str, int | None, str], torch.nn.Module] = {}
"""Loaded LPIPS networks by ``(net, backbone_seed, device)``."""


def _lpips_package() -> Any:
    """The ``lpips`` package, imported on first use; a one-line ImportError if missing."""
    try:
        return importlib.import_module("lpips")
    except ImportError as e:
        raise ImportError(
            f"LPIPS needs the lpips package ({e}): pip install 'leakage-lab[lpips]' "
            "(or pip install lpips), or leave lpips out of the metrics"
        ) from None


def _check_lpips_options(net: str, backbone_seed: int | None) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_NETS)}")
    whole = isinstance(backbone_seed, int) and not isinstance(backbone_seed, bool)
    if backbone_seed is not None and not (whole and 0 <= backbone_seed < 2**64):
        raise ValueError(
            f"backbone_seed must be None (ImageNet weights) or a whole number in [0, 2**64); "
            f"got {backbone_seed!r}"
        )


def _check_lpips_images(x: Tensor, net: str) -> None:
    _, channels, height, width = x.shape
    if channels not in (1, 3):
        raise ValueError(f"LPIPS takes images with 1 or 3 channels; got {channels}")
    size = _LPIPS_MIN_SIZE[net]
    if height < size or width < size:
        fits = [n for n, m in _LPIPS_MIN_SIZE.items() if m <= min(height, width)]
        hint = f" (net {' or '.join(map(repr, fits))} takes them)" if fits else ""
        raise ValueError(
            f"images must be at least {size}x{size} pixels for LPIPS with net={net!r}; "
            f"got {height}x{width}{hint}"
        )


def _backbone_weights_file(net: str) -> tuple[str, str]:
    """``(url, path)`` of the torchvision ImageNet weights of ``net``'s backbone."""
    from torchvision import models

    url = getattr(models, _LPIPS_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _fetch_backbone_weights(net: str) -> None:
    """Download ``net``'s backbone weights into the torch hub cache unless they are there.

    Done here rather than inside torchvision so that a machine without network gets one
    line that says what to do, not a traceback (and nothing is printed unless the download
    starts: then torch's progress bar).
    """
    url, path = _backbone_weights_file(net)
    if os.path.isfile(path):
        return
    found = re.search(r"-([a-f0-9]*)\.", os.path.basename(path))  # torch.hub's hash suffix
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, hash_prefix=found and found.group(1))
    except (OSError, RuntimeError) as e:  # no network (URLError), no disk space, bad hash
        raise OSError(
            f"LPIPS (net={net!r}) needs torchvision's ImageNet weights {path}, and downloading "
            f"them failed ({type(e).__name__}: {_first_line(e)}): fetch {url} into "
            f"{os.path.dirname(path)} where there is network (or point TORCH_HOME at a torch "
            "cache that has it), or leave lpips out of the metrics"
        ) from None


def _build_lpips(net: str, backbone_seed: int | None) -> torch.nn.Module:
    """A new LPIPS network on the CPU, in eval mode, without gradients.

    The linear heads are the package's calibrated ones (shipped inside it). The backbone
    has torchvision's ImageNet weights (downloaded into the torch hub cache on first use),
    or, with ``backbone_seed``, torchvision's random initialisation drawn from the CPU
    generator seeded with it (the stream ``torch.manual_seed(backbone_seed)`` gives). Either
    way it is built inside :func:`torch.random.fork_rng`, so the caller's random stream is
    left as it was.
    """
    package = _lpips_package()

    def build() -> torch.nn.Module:
        # torchvision initialises every backbone at random (before loading weights, if any):
        # on a forked CPU stream, so the caller's is left as it was. Only the CPU generator
        # is seeded: torch.manual_seed would also reseed (or, before CUDA starts, queue a
        # reseed of) the caller's CUDA generators, which fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # the package still passes torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
            if backbone_seed is not None:
                torch.default_generator.manual_seed(backbone_seed)
            return package.LPIPS(net=net, pnet_rand=backbone_seed is not None, verbose=False)

    if backbone_seed is None:
        _fetch_backbone_weights(net)
    try:
        model = build()
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if backbone_seed is not None:
            raise
        # a truncated or corrupt file in the cache, or one that cannot be read
        _, path = _backbone_weights_file(net)
        raise OSError(
            f"LPIPS (net={net!r}) could not load torchvision's ImageNet weights {path} "
            f"({type(e).__name__}: {_first_line(e)}): delete the file and retry, or leave "
            "lpips out of the metrics"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _lpips_model(net: str, backbone_seed: int | None, device: torch.device) -> torch.nn.Module:
    """The cached LPIPS network of ``(net, backbone_seed)`` on ``device``, loaded once."""
    key = (net, backbone_seed, str(device))
    if key not in _LPIPS_MODELS:
        cpu = (net, backbone_seed, "cpu")
        if cpu not in _LPIPS_MODELS:
            _LPIPS_MODELS[cpu] = _build_lpips(net, backbone_seed)
        if key != cpu:
            _LPIPS_MODELS[key] = copy.deepcopy(_LPIPS_MODELS[cpu]).to(device)
    return _LPIPS_MODELS[key]


def lpips(
    x: Tensor,
    y: Tensor,
    *,
    net: str = "alex",
    data_range: float = 1.0,
    backbone_seed: int | None = None,
) -> Tensor:
    """Learned Perceptual Image Patch Similarity per image (Zhang et al., 2018), v0.1.

    The distance between the unit-normalised deep features of ``x`` and ``y`` at five
    layers of an ImageNet backbone, weighted channel-wise by linear heads fitted to human
    judgements and averaged over positions, computed by the authors' ``lpips`` package
    (``lpips.LPIPS(net=net)``). **Lower is better**: 0 for identical images, larger the
    less alike they look. Images are mapped from ``[0, data_range]`` to the ``[-1, 1]``
    the package takes; one-channel images are repeated to three (the backbones take RGB).
    It computes in float32 (the networks' precision) under ``torch.no_grad``.

    The package's linear heads ship inside it; the backbone's ImageNet weights are
    torchvision's, downloaded into the torch hub cache (``torch.hub.get_dir()``) on first
    use. Each network is loaded once per ``(net, backbone_seed, device)`` and kept.

    Args:
        x: Images, shape ``(B, C, H, W)`` with ``C`` 1 or 3 and ``H``, ``W`` at least 31
            (``alex``), 16 (``vgg``) or 17 (``squeeze``).
        y: Images, shape ``(B, C, H, W)``.
        net: Backbone: ``alex`` (the paper's recommended metric), ``vgg`` or ``squeeze``.
        data_range: The largest possible pixel value (1.0 for images in [0, 1], 255.0 for
            8-bit images); pixels run from 0 to it.
        backbone_seed: ``None`` for the ImageNet backbone (LPIPS proper). A whole number
            gives a backbone with torchvision's random initialisation drawn from that seed,
            without touching the global random state: for tests where no weights can be
            downloaded; its numbers are not LPIPS and not comparable to published ones.

    Returns:
        Float64 tensor of shape ``(B,)`` on ``x.device``.

    Raises:
        ValueError: On an unknown ``net``, a bad ``backbone_seed`` or ``data_range``, shape
            mismatch, a channel count other than 1 or 3, or images too small for ``net``.
        ImportError: If the ``lpips`` package is not installed.
        OSError: If the backbone's ImageNet weights are neither cached nor downloadable.
    """
    _check_lpips_options(net, backbone_seed)
    if not _is_positive(data_range):
        raise ValueError(f"data_range must be positive (e.g. 1.0 or 255.0); got {data_range!r}")
    _check_pair(x, y)
    _check_lpips_images(x, net)
    channels = x.shape[1]
    model = _lpips_model(net, backbone_seed, x.device)
    scale = 2.0 / float(data_range)
    x1 = x.to(torch.float32) * scale - 1.0  # [0, data_range] -> [-1, 1]
    y1 = y.to(device=x.device, dtype=torch.float32) * scale - 1.0
    if channels == 1:
        x1, y1 = x1.expand(-1, 3, -1, -1), y1.expand(-1, 3, -1, -1)
    with torch.no_grad():
        distance = model(x1, y1)
    return distance.reshape(-1).to(torch.float64)


def check_metrics(metrics: Any) -> tuple[str, ...]:
    """The image metrics ``metrics`` names, in :data:`IMAGE_METRICS` order, PSNR and SSIM
    always among them.

    Args:
        metrics: Names from :data:`IMAGE_METRICS`, as a sequence or as comma-separated
            text (``"psnr,ssim,lpips"``); ``None`` means :data:`DEFAULT_METRICS`.

    Returns:
        A tuple such as ``("psnr", "ssim")`` or ``("psnr", "ssim", "lpips")``.

    Raises:
        ValueError: If ``metrics`` is not text or a sequence of text, or names a metric
            not in :data:`IMAGE_METRICS`.
    """
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        names = [m.strip() for m in metrics.split(",")]
    elif isinstance(metrics, (list, tuple)):
        names = list(metrics)
    else:
        raise ValueError(
            "metrics must be a list of names or comma-separated text such as psnr,ssim,lpips; "
            f"got {_shown(metrics)}"
        )
    for name in names:
        if not isinstance(name, str) or name not in IMAGE_METRICS:
            raise ValueError(f"unknown metric {_shown(name)}; valid: {', '.join(IMAGE_METRICS)}")
    return tuple(m for m in IMAGE_METRICS if m in (*DEFAULT_METRICS, *names))


def _as_label_list(labels: Tensor | np.ndarray | Iterable[Any], name: str) -> list[Any]:
    if isinstance(labels, (Tensor, np.ndarray)):
        return labels.reshape(-1).tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise ValueError(f"{name} must be a tensor or a sequence of labels; got {type(labels)!r}")
    return [item.item() if isinstance(item, (Tensor, np.generic)) else item for item in labels]


def label_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of true labels recovered, ignoring order.

    Label-inference attacks (e.g. iDLG, Zhao et al., 2020) recover the multiset of labels in
    a batch but not which image each belongs to, so this counts the multiset overlap:
    ``sum_c min(#c in predicted, #c in true) / len(true)``. For example predicted
    ``[1, 1, 2]`` against true ``[1, 2, 2]`` gives 2/3.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence, length ``P``.
        true: Ground-truth labels, a tensor of any shape or a sequence, length ``N >= 1``.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    pred_list = _as_label_list(predicted, "predicted")
    true_list = _as_label_list(true, "true")
    if not true_list:
        raise ValueError("true must contain at least one label")
    overlap = Counter(pred_list) & Counter(true_list)
    return sum(overlap.values()) / len(true_list)


def label_count_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of the batch's labels recovered with their counts: ``Σ_c min(n̂_c, n_c) / B``.

    The multiset overlap of :func:`label_accuracy`, under the name used next to
    :func:`label_set_accuracy`; it is iLRG's instance-level recall (Ma et al., ICLR
    2023, "IRec"). For example predicted ``[1, 1, 2]`` against true ``[1, 2, 2]``
    gives 2/3.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence.
        true: Ground-truth labels, a tensor of any shape or a sequence, ``B >= 1`` long.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    return label_accuracy(predicted, true)


def label_set_accuracy(
    predicted: Tensor | np.ndarray | Iterable[Any], true: Tensor | np.ndarray | Iterable[Any]
) -> float:
    """Fraction of the distinct true classes that the recovered labels contain.

    Label existence, as in iLRG (Ma et al., ICLR 2023, "LeAcc"), counted over the
    classes present in the batch: ``|set(predicted) ∩ set(true)| / |set(true)|``.
    iLRG's LeAcc scores the existence decision of every one of the K classes, absent
    ones included; this one needs no K and ignores counts, so ``[1, 1, 2]`` against
    ``[1, 2, 2]`` gives 1.0 and ``[1, 1, 1]`` against ``[1, 2]`` gives 0.5. Recovered
    labels come ``B`` at a time, so extra classes cost through the missed ones.

    Args:
        predicted: Recovered labels, a tensor of any shape or a sequence.
        true: Ground-truth labels, a tensor of any shape or a sequence, ``B >= 1`` long.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: If ``true`` is empty or an argument is not a tensor or sequence.
    """
    pred_set = set(_as_label_list(predicted, "predicted"))
    true_set = set(_as_label_list(true, "true"))
    if not true_set:
        raise ValueError("true must contain at least one label")
    return len(pred_set & true_set) / len(true_set)


def match_images(reconstructed: Tensor, original: Tensor) -> Tensor:
    """Pair each original image with a distinct reconstruction at minimum total MSE.

    Solves the linear assignment problem (Kuhn, 1955) on the ``(B, R)`` matrix of
    per-image MSE with ``scipy.optimize.linear_sum_assignment``.

    Args:
        reconstructed: Reconstructions, shape ``(R, C, H, W)`` with ``R >= B``.
        original: Ground-truth images, shape ``(B, C, H, W)``.

    Returns:
        Long tensor ``perm`` of shape ``(B,)`` on ``original.device`` with distinct
        entries such that ``reconstructed[perm[i]]`` is matched to ``original[i]``.

    Raises:
        ValueError: If the image shapes differ or ``R < B``.
    """
    _check_images(reconstructed, "reconstructed")
    _check_images(original, "original")
    if reconstructed.shape[1:] != original.shape[1:] or reconstructed.shape[0] < original.shape[0]:
        raise ValueError(
            "reconstructed must be (R, C, H, W) and original (B, C, H, W) with the same C, H, W "
            f"and R >= B; got {tuple(reconstructed.shape)} and {tuple(original.shape)}"
        )
    orig = original.to(torch.float64).flatten(1)
    recon = reconstructed.to(device=original.device, dtype=torch.float64).flatten(1)
    # Exact (non-matmul) Euclidean distances avoid cancellation for near-identical images.
    dist = torch.cdist(orig[None], recon[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    cost = dist.square() / orig.shape[1]
    # With B <= R every original row is assigned, and rows come back as 0..B-1 in order.
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long, device=original.device)


def _match_attempts(reconstructed: Tensor, original: Tensor, candidates: int) -> Tensor:
    """:func:`match_images` of the first ``candidates`` reconstructions (each to a distinct
    original), the originals left over taking the placeholders after them in order."""
    b = original.shape[0]
    if not 0 <= candidates <= b or reconstructed.shape[0] < b:
        raise ValueError(
            f"candidates must lie in [0, {b}] and the reconstruction hold at least {b} images; "
            f"got {candidates} of {reconstructed.shape[0]}"
        )
    order = torch.full((b,), -1, dtype=torch.long, device=original.device)
    if candidates:
        attempts = match_images(original, reconstructed[:candidates])  # (R,) originals
        order[attempts] = torch.arange(candidates, device=original.device)
    left = (order < 0).nonzero().flatten()
    order[left] = torch.arange(candidates, candidates + len(left), device=original.device)
    return order


@dataclass(frozen=True)
class ImageScores:
    """Per-image scores of a reconstruction batch against the originals.

    Attributes:
        psnr: PSNR in dB, float64, shape ``(B,)``, indexed like the originals.
        ssim: Mean SSIM, float64, shape ``(B,)``.
        mse: Mean squared error, float64, shape ``(B,)``.
        order: Long, shape ``(B,)``; ``reconstructed[order[i]]`` was scored against
            ``original[i]``.
        lpips: LPIPS distance (:func:`lpips`), float64, shape ``(B,)``, **lower is better**
            (0 for identical images); ``None`` unless ``"lpips"`` was among the metrics.
    """

    psnr: Tensor
    ssim: Tensor
    mse: Tensor
    order: Tensor
    lpips: Tensor | None = None


def score_images(
    reconstructed: Tensor,
    original: Tensor,
    *,
    data_range: float | None = None,
    match: bool = True,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    lpips_net: str = "alex",
    lpips_backbone_seed: int | None = None,
    candidates: int | None = None,
) -> ImageScores:
    """Match reconstructions to originals, then score each pair with PSNR, SSIM and MSE,
    and with LPIPS when asked.

    Every metric scores the same pairs: those of the MSE matching (as in Zhu et al.,
    2019), not a matching of its own.

    Args:
        reconstructed: Reconstructions, shape ``(R, C, H, W)``; ``R >= B`` when matching,
            ``R == B`` otherwise.
        original: Ground-truth images, shape ``(B, C, H, W)``.
        data_range: Distance between the smallest and largest possible pixel value.
            Required.
        match: If True, pair images by :func:`match_images`; if False, pair them by index.
        metrics: Names from :data:`IMAGE_METRICS` (a sequence or comma-separated text);
            PSNR, SSIM and MSE are always scored, ``"lpips"`` adds :func:`lpips`.
        lpips_net: LPIPS backbone (see :func:`lpips`).
        lpips_backbone_seed: ``None`` for LPIPS proper; a seed for a random backbone in
            tests (see :func:`lpips`).
        candidates: when only the first ``candidates`` reconstructions are attempts
            and the rest placeholders (an attack that found fewer images than the
            batch holds, e.g. :mod:`leakage.attacks.imprint`): the attempts are
            matched first, to the originals they fit best, and the placeholders
            take the originals left over. ``None``: all are attempts. Matching
            placeholders with the rest would let a blank image "win" an original
            whose exact reconstruction then pairs with another image.

    Returns:
        :class:`ImageScores` with one entry per original image.

    Raises:
        ValueError: On missing/non-positive ``data_range``, an unknown metric or LPIPS
            option, or incompatible shapes.
        ImportError, OSError: If LPIPS is asked for and its package or weights are missing
            (see :func:`lpips`).
    """
    dr = _check_data_range(data_range)
    names = check_metrics(metrics)
    with_lpips = "lpips" in names
    if with_lpips:
        _check_lpips_options(lpips_net, lpips_backbone_seed)
        _check_images(original, "original")
        _check_lpips_images(original, lpips_net)
    if match and candidates is not None and candidates < original.shape[0]:
        order = _match_attempts(reconstructed, original, candidates)
    elif match:
        order = match_images(reconstructed, original)
    else:
        _check_images(reconstructed, "reconstructed")
        _check_images(original, "original")
        if reconstructed.shape != original.shape:
            raise ValueError(
                "with match=False, reconstructed and original must have the same shape "
                f"(B, C, H, W); got {tuple(reconstructed.shape)} and {tuple(original.shape)}"
            )
        order = torch.arange(original.shape[0], device=original.device)
    paired = reconstructed.to(original.device)[order]
    return ImageScores(
        psnr=psnr(paired, original, data_range=dr),
        ssim=ssim(paired, original, data_range=dr),
        mse=mse(paired, original),
        order=order,
        lpips=lpips(
            paired, original, net=lpips_net, data_range=dr, backbone_seed=lpips_backbone_seed
        )
        if with_lpips
        else None,
    )
