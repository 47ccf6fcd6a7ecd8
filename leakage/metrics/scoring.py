"""Scoring a reconstruction: matching it to the originals, then every per-image metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .images import _check_data_range, _check_images, _shown, mse, psnr, ssim, ssim_matrix
from .perceptual import _check_lpips_images, _check_lpips_options, lpips

__all__ = [
    "DEFAULT_METRICS",
    "IMAGE_METRICS",
    "ImageScores",
    "check_metrics",
    "match_images",
    "score_images",
]

IMAGE_METRICS = ("psnr", "ssim", "lpips")
"""Per-image metrics :func:`score_images` can report (PSNR and SSIM always are)."""


DEFAULT_METRICS = ("psnr", "ssim")
"""What :func:`score_images` reports unless told otherwise."""


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


MATCH_BY = ("mse", "ssim")
"""Scores :func:`match_images` can pair images by."""


def match_images(
    reconstructed: Tensor,
    original: Tensor,
    *,
    by: str = "mse",
    data_range: float | None = None,
) -> Tensor:
    """Pair each original image with a distinct reconstruction at minimum total MSE
    (or maximum total SSIM).

    Solves the linear assignment problem (Kuhn, 1955) on the ``(B, R)`` matrix of
    per-image scores with ``scipy.optimize.linear_sum_assignment``; the SSIM
    matrix comes from :func:`~leakage.metrics.images.ssim_matrix` in one call.

    Args:
        reconstructed: Reconstructions, shape ``(R, C, H, W)`` with ``R >= B``.
        original: Ground-truth images, shape ``(B, C, H, W)``.
        by: ``"mse"`` (as in Zhu et al., 2019) or ``"ssim"``.
        data_range: the pixel range, required with ``by="ssim"``.

    Returns:
        Long tensor ``perm`` of shape ``(B,)`` on ``original.device`` with distinct
        entries such that ``reconstructed[perm[i]]`` is matched to ``original[i]``.

    Raises:
        ValueError: If the image shapes differ, ``R < B``, ``by`` is unknown or
            ``data_range`` is missing for SSIM.
    """
    if by not in MATCH_BY:
        raise ValueError(f"by must be one of {', '.join(MATCH_BY)}; got {_shown(by)}")
    if by == "ssim":
        _check_data_range(data_range)
    _check_images(reconstructed, "reconstructed")
    _check_images(original, "original")
    if reconstructed.shape[1:] != original.shape[1:] or reconstructed.shape[0] < original.shape[0]:
        raise ValueError(
            "reconstructed must be (R, C, H, W) and original (B, C, H, W) with the same C, H, W "
            f"and R >= B; got {tuple(reconstructed.shape)} and {tuple(original.shape)}"
        )
    if by == "ssim":
        similarity = ssim_matrix(original, reconstructed, data_range=data_range)
        _, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
        return torch.as_tensor(cols, dtype=torch.long, device=original.device)
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
