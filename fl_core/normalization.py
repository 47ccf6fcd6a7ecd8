"""Input normalisation: the published per-channel statistics of each dataset.

:data:`NORMALIZATION` holds the mean/std pairs torchvision's and breaching's recipes
normalise with; :func:`dataset_normalization` gives the ``normalize=(mean, std)`` a
victim trained on a dataset carries (:mod:`fl_core.models`), fitted to the images'
channel count, or computed from the images of a folder dataset.
"""

from __future__ import annotations

import torch

from .images import ImageData

__all__ = ["NORMALIZATION", "Stats", "dataset_normalization", "image_statistics"]

Stats = tuple[tuple[float, ...], tuple[float, ...]]

NORMALIZATION: dict[str, Stats] = {
    # per-channel mean and std of each training split, in [0, 1] pixel units
    "cifar10": (
        (0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
        (0.24703224003314972, 0.24348513782024384, 0.26158785820007324),
    ),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Published input statistics: the mean/std pairs torchvision's and breaching's
recipes normalise with (CIFAR-10's to full precision as breaching's
``config/case/data/CIFAR10.yaml`` gives them; ImageNet's from torchvision's
model documentation). ``samples`` and image files are natural photographs and
take ImageNet's."""

_LUMA = (0.2125, 0.7154, 0.0721)  # BT.709, as skimage.color.rgb2gray


def _fit_channels(stats: Stats, channels: int) -> Stats:
    """Stats for ``channels``: gray replicated to RGB, RGB reduced with the BT.709 weights.

    The RGB -> gray reduction of the std is an approximation (it ignores the
    correlation between channels); the mean is exact.
    """
    mean, std = stats
    if len(mean) == channels:
        return stats
    if len(mean) == 1:
        return mean * channels, std * channels
    return (
        (sum(w * m for w, m in zip(_LUMA, mean)),),
        (sum(w * s for w, s in zip(_LUMA, std)),),
    )


def image_statistics(images: torch.Tensor) -> Stats:
    """Per-channel mean and std over all pixels of ``images`` (N, C, H, W)."""
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1, correction=0).clamp_min(1e-6).tolist())


def dataset_normalization(name: str | None, data: ImageData | None = None) -> Stats:
    """The input normalisation a victim trained on dataset ``name`` would carry.

    Args:
        name: a key of :data:`NORMALIZATION` (``samples`` and ``None``, i.e.
            image files, mean ImageNet's), or a folder of class sub-folders,
            whose statistics are computed from ``data``.
        data: the loaded images (their channel count decides between gray and
            RGB statistics; a folder's statistics are those of these images).

    Returns:
        ``(mean, std)``, one value per channel each.
    """
    key = "imagenet" if name in (None, "samples") else str(name).lower().replace("_", "-")
    channels = data.shape[0] if data is not None else 3
    if key in NORMALIZATION:
        return _fit_channels(NORMALIZATION[key], channels)
    if data is None:
        raise ValueError(f"no published statistics for dataset {name!r}; pass its images")
    return image_statistics(data.images)
