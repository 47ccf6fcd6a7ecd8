"""Image-reconstruction and label-recovery metrics for gradient-leakage attacks.

One module per concept: :mod:`~leakage.metrics.images` (MSE, PSNR, SSIM),
:mod:`~leakage.metrics.perceptual` (LPIPS), :mod:`~leakage.metrics.labels` (label
recovery) and :mod:`~leakage.metrics.scoring` (matching, then every metric at once).

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

from .images import mse, psnr, ssim, ssim_matrix
from .labels import label_accuracy, label_count_accuracy, label_set_accuracy
from .perceptual import LPIPS_NETS, lpips
from .scoring import (
    DEFAULT_METRICS,
    IMAGE_METRICS,
    ImageScores,
    check_metrics,
    match_images,
    score_images,
)

__all__ = [
    "DEFAULT_METRICS",
    "IMAGE_METRICS",
    "ImageScores",
    "LPIPS_NETS",
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
    "ssim_matrix",
]
