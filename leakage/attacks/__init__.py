"""Reconstruction attacks, one per file, registered by name in :data:`ATTACKS`."""

from .analytic import Analytic
from .base import ATTACKS, Attack, Reconstruction, build_attack
from .best import Best
from .cpa import CPA, UnmixResult, cocktail_party, invert_features
from .dlg import DLG, match_gradients
from .gradinversion import GradInversion
from .ica import fast_ica
from .idlg import IDLG
from .inverting import InvertingGradients, invert_gradients
from .rgap import RGAP, LayerRank, rank_analysis
from .spear import Spear, SpearResult, spear_linear

__all__ = [
    "ATTACKS",
    "Analytic",
    "Attack",
    "Best",
    "CPA",
    "DLG",
    "GradInversion",
    "IDLG",
    "InvertingGradients",
    "LayerRank",
    "RGAP",
    "Reconstruction",
    "Spear",
    "SpearResult",
    "UnmixResult",
    "build_attack",
    "cocktail_party",
    "fast_ica",
    "invert_features",
    "invert_gradients",
    "match_gradients",
    "rank_analysis",
    "spear_linear",
]
