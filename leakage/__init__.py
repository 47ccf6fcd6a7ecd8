"""Gradient-leakage attacks, label recovery, metrics, reports and the CLI."""

from .attacks import ATTACKS, DLG, IDLG, Attack, Reconstruction, build_attack
from .experiment import AttackConfig, load_config, make_config, run_attack
from .labels import idlg_label, per_class_minimum_labels
from .metrics import (
    ImageScores,
    label_accuracy,
    match_images,
    mse,
    psnr,
    score_images,
    ssim,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "DLG",
    "IDLG",
    "ImageScores",
    "Reconstruction",
    "build_attack",
    "idlg_label",
    "label_accuracy",
    "load_config",
    "make_config",
    "match_images",
    "mse",
    "per_class_minimum_labels",
    "psnr",
    "run_attack",
    "score_images",
    "ssim",
]
