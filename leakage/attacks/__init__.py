"""Reconstruction attacks, one per file, registered by name in :data:`ATTACKS`."""

from .analytic import Analytic
from .base import ATTACKS, Attack, Reconstruction, build_attack
from .dlg import DLG, match_gradients
from .idlg import IDLG
from .inverting import InvertingGradients, invert_gradients

__all__ = [
    "ATTACKS",
    "Analytic",
    "Attack",
    "DLG",
    "IDLG",
    "InvertingGradients",
    "Reconstruction",
    "build_attack",
    "invert_gradients",
    "match_gradients",
]
