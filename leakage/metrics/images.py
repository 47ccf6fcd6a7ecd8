"""Pixel metrics: MSE, PSNR and SSIM (Wang et al. 2004), one float64 value per image."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["mse", "psnr", "ssim"]

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
