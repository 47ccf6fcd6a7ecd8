"""Gradient-leakage attacks, label recovery, metrics, reports and the CLI."""

from .attacks import (
    ATTACKS,
    DLG,
    IDLG,
    Analytic,
    Attack,
    InvertingGradients,
    Reconstruction,
    build_attack,
)
from .experiment import AttackConfig, load_config, make_config, run_attack
from .labels import LABEL_STRATEGIES, idlg_label, per_class_minimum_labels, recover_labels
from .metrics import (
    ImageScores,
    label_accuracy,
    label_count_accuracy,
    label_set_accuracy,
    match_images,
    mse,
    psnr,
    score_images,
    ssim,
)
from .simulate import THREAT_MODELS, UpdateSimulator

__all__ = [
    "ATTACKS",
    "Analytic",
    "Attack",
    "AttackConfig",
    "DLG",
    "IDLG",
    "ImageScores",
    "InvertingGradients",
    "LABEL_STRATEGIES",
    "Reconstruction",
    "THREAT_MODELS",
    "UpdateSimulator",
    "build_attack",
    "idlg_label",
    "label_accuracy",
    "label_count_accuracy",
    "label_set_accuracy",
    "load_config",
    "make_config",
    "match_images",
    "mse",
    "per_class_minimum_labels",
    "psnr",
    "recover_labels",
    "run_attack",
    "score_images",
    "ssim",
]
