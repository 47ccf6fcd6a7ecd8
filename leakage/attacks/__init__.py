"""Reconstruction attacks, one per file, registered by name in :data:`ATTACKS`."""

from .base import ATTACKS, Attack, Reconstruction, build_attack
from .dlg import DLG, match_gradients
from .idlg import IDLG, recover_labels

__all__ = [
    "ATTACKS",
    "Attack",
    "DLG",
    "IDLG",
    "Reconstruction",
    "build_attack",
    "match_gradients",
    "recover_labels",
]
