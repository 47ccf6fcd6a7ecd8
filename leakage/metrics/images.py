"""Pixel metrics: MSE, PSNR and SSIM (Wang et al. 2004), one float64 value per image."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mse", "psnr", "ssim", "ssim_matrix"]

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
    over those positions and the channels. It is computed in float64, one separable
    filter pass over the five statistics of every channel of every image at once.
    This equals ``skimage.metrics.structural_similarity(..., channel_axis=0,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False)``, which crops the
    window radius from each border.

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
    taps = _ssim_window(x, sigma, k1, k2)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for lo, hi in _chunks(x.shape[0], 5 * x[0].numel()):
        planes = torch.empty((5, hi - lo, *x.shape[1:]), dtype=torch.float64, device=x.device)
        xd, yd = planes[0].copy_(x[lo:hi]), planes[1].copy_(y[lo:hi])
        torch.mul(xd, xd, out=planes[2])
        torch.mul(yd, yd, out=planes[3])
        torch.mul(xd, yd, out=planes[4])
        mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(planes, taps)
        # the SSIM map in place, over the filtered statistics (no new full-size tensor
        # but one): e_xy becomes the numerator, e_xx the denominator
        mu_xy = mu_x * mu_y
        e_xy.sub_(mu_xy).mul_(2.0).add_(c2).mul_(mu_xy.mul_(2.0).add_(c1))
        mu_x.square_()
        mu_y.square_()
        e_xx.sub_(mu_x).add_(e_yy).sub_(mu_y).add_(c2).mul_(mu_x.add_(mu_y).add_(c1))
        out[lo:hi] = e_xy.div_(e_xx).mean(dim=(1, 2, 3))
    return out


def ssim_matrix(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """SSIM of every image of ``x`` against every image of ``y``, in one call.

    Entry ``[i, j]`` equals ``ssim(x[i:i+1], y[j:j+1])`` (see :func:`ssim` for the
    definition and the arguments). Each image's local means and variances are
    filtered once; only the cross term is filtered per pair. This is the score
    matrix that matching reconstructions to originals by SSIM needs.

    Args:
        x: Images, shape ``(B, C, H, W)``.
        y: Images, shape ``(R, C, H, W)`` (the same ``C``, ``H`` and ``W``).

    Returns:
        Float64 tensor of shape ``(B, R)`` on ``x.device``.
    """
    dr = _check_data_range(data_range)
    _check_images(x, "x")
    _check_images(y, "y")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"x and y must hold images of the same (C, H, W); got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    taps = _ssim_window(x, sigma, k1, k2)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2

    def moments(images: Tensor) -> tuple[Tensor, Tensor]:
        d = images.to(device=x.device, dtype=torch.float64)
        mu, e_sq = _filter_valid(torch.stack([d, d * d]), taps)
        return mu, e_sq.sub_(mu * mu)

    mu_x, var_x = moments(x)
    mu_y, var_y = moments(y)
    xd = x.to(torch.float64)
    yd = y.to(device=x.device, dtype=torch.float64)
    out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device)
    for lo, hi in _chunks(x.shape[0], y.shape[0] * x[0].numel()):
        cross = _filter_valid(xd[lo:hi, None] * yd[None], taps)  # (k, R, C, h, w)
        out[lo:hi] = _ssim_mean(
            mu_x[lo:hi, None], mu_y[None], var_x[lo:hi, None], var_y[None], cross, c1, c2
        )
    return out


_WORKSPACE = 1 << 18
"""Float64 values of the filtered planes per chunk (2 MiB; 17 CIFAR-sized pairs): the
batch is cut into chunks so that a large batch or image never needs all its planes
at once, and so that each chunk reuses the memory the one before freed. One large
workspace per call ran ~2.5x slower whenever its pages were fresh (64 pairs, after
other work had run: 16.7 ms against 6.5 in a loop of calls)."""


def _chunks(count: int, values_per_item: int) -> list[tuple[int, int]]:
    step = max(1, _WORKSPACE // max(1, values_per_item))
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)]


def _ssim_window(x: Tensor, sigma: float, k1: float, k2: float) -> list[float]:
    """The Gaussian taps as Python floats, after checking the options and the image size."""
    for name, value in (("sigma", sigma), ("k1", k1), ("k2", k2)):
        if not _is_positive(value):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    window = _gaussian_window(float(sigma), torch.device("cpu"))
    size = window.numel()
    height, width = x.shape[-2:]
    if height < size or width < size:
        raise ValueError(
            f"images must be at least {size}x{size} pixels for SSIM with sigma={sigma}; "
            f"got {height}x{width}"
        )
    return window.tolist()


def _filter_valid(planes: Tensor, taps: list[float]) -> Tensor:
    """Separable 'valid' filtering of the last two dimensions with the 1-D ``taps``.

    One multiply-add of a shifted view per tap and direction, over every plane at
    once. In float64 on the CPU this is several times faster than ``conv2d``,
    whose float64 kernel unfolds each plane separately, and exact to rounding.
    """
    size = len(taps)
    height = planes.shape[-2] - size + 1
    width = planes.shape[-1] - size + 1
    rows = torch.mul(planes[..., :height, :], taps[0])
    for k in range(1, size):
        rows.add_(planes[..., k : k + height, :], alpha=taps[k])
    out = torch.mul(rows[..., :width], taps[0])
    for k in range(1, size):
        out.add_(rows[..., k : k + width], alpha=taps[k])
    return out


def _ssim_mean(mu_x, mu_y, var_x, var_y, e_xy, c1: float, c2: float) -> Tensor:
    """Mean over (C, h, w) of the SSIM map; ``e_xy`` (full shape) is overwritten.

    ``((2 mu_x mu_y + C1)(2 cov + C2)) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))``
    with ``cov = e_xy - mu_x mu_y``; the other inputs may broadcast against ``e_xy``.
    """
    mu_xy = mu_x * mu_y
    numerator = e_xy.sub_(mu_xy).mul_(2.0).add_(c2).mul_(mu_xy.mul_(2.0).add_(c1))
    denominator = (mu_x * mu_x + mu_y * mu_y + c1).mul_(var_x + var_y + c2)
    return numerator.div_(denominator).mean(dim=(-3, -2, -1))
