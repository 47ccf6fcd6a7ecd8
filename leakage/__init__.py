"""The attacker's library: gradient-leakage attacks, label recovery, threat-model
simulation, objectives, optimisers and metrics.

The application that runs the lab (the ``leakage`` commands, experiment wiring,
configs, sweeps, the results store, reports, the Flower apps) lives in
:mod:`leakage.app`; it imports this library, never the other way. Its
entry points ``AttackConfig``, ``load_config``, ``make_config`` and
``run_attack`` are importable from here too, loaded on first use.
"""

from .attacks import (
    ATTACKS,
    CPA,
    DLG,
    IDLG,
    RGAP,
    Analytic,
    Attack,
    Best,
    GradInversion,
    InvertingGradients,
    Reconstruction,
    Spear,
    build_attack,
)
from .labels import LABEL_STRATEGIES, idlg_label, per_class_minimum_labels, recover_labels
from .metrics import (
    ImageScores,
    check_metrics,
    label_accuracy,
    label_count_accuracy,
    label_set_accuracy,
    lpips,
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
    "Best",
    "CPA",
    "DLG",
    "GradInversion",
    "IDLG",
    "ImageScores",
    "InvertingGradients",
    "LABEL_STRATEGIES",
    "RGAP",
    "Reconstruction",
    "Spear",
    "THREAT_MODELS",
    "UpdateSimulator",
    "build_attack",
    "check_metrics",
    "idlg_label",
    "label_accuracy",
    "label_count_accuracy",
    "label_set_accuracy",
    "load_config",
    "lpips",
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


_APP = {"AttackConfig", "load_config", "make_config", "run_attack"}


def __getattr__(name: str):
    """The application's entry points, imported on first use (the library never imports
    the application at import time)."""
    if name in _APP:
        from .app import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'leakage' has no attribute {name!r}")
