"""Image-reconstruction and label-recovery metrics for gradient-leakage attacks.

Image metrics take batches ``(B, C, H, W)`` of any real dtype and return one float64 value
per image, shape ``(B,)``, on the input device; they compute in float64.

References:
    Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from
    error visibility to structural similarity", IEEE Trans. Image Processing 13(4), 2004.
    L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019 (reconstructions
    are matched to originals before scoring, since the attack returns them unordered).
    H. W. Kuhn, "The Hungarian method for the assignment problem", Naval Research
    Logistics Quarterly 2, 1955 (minimum-cost matching).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "ImageScores",
    "label_accuracy",
    "label_count_accuracy",
    "label_set_accuracy",
    "match_images",
    "mse",
    "psnr",
    "score_images",
    "ssim",
]

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


@dataclass(frozen=True)
class ImageScores:
    """Per-image scores of a reconstruction batch against the originals.

    Attributes:
        psnr: PSNR in dB, float64, shape ``(B,)``, indexed like the originals.
        ssim: Mean SSIM, float64, shape ``(B,)``.
        mse: Mean squared error, float64, shape ``(B,)``.
        order: Long, shape ``(B,)``; ``reconstructed[order[i]]`` was scored against
            ``original[i]``.
    """

    psnr: Tensor
    ssim: Tensor
    mse: Tensor
    order: Tensor


def score_images(
    reconstructed: Tensor,
    original: Tensor,
    *,
    data_range: float | None = None,
    match: bool = True,
) -> ImageScores:
    """Match reconstructions to originals, then score each pair with PSNR, SSIM and MSE.

    Args:
        reconstructed: Reconstructions, shape ``(R, C, H, W)``; ``R >= B`` when matching,
            ``R == B`` otherwise.
        original: Ground-truth images, shape ``(B, C, H, W)``.
        data_range: Distance between the smallest and largest possible pixel value.
            Required.
        match: If True, pair images by :func:`match_images`; if False, pair them by index.

    Returns:
        :class:`ImageScores` with one entry per original image.

    Raises:
        ValueError: On missing/non-positive ``data_range`` or incompatible shapes.
    """
    dr = _check_data_range(data_range)
    if match:
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
    )
