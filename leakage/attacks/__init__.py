"""Reconstruction attacks, one per file, registered by name in :data:`ATTACKS`."""

from .analytic import Analytic
from .base import ATTACKS, Attack, Reconstruction, build_attack
from .best import Best
from .cpa import CPA, UnmixResult, cocktail_party, invert_features
from .dlg import DLG, match_gradients
from .fishing import Fishing
from .gradinversion import GradInversion
from .ica import fast_ica
from .idlg import IDLG
from .imprint import Imprint, invert_imprint
from .inverting import InvertingGradients, invert_gradients
from .rgap import RGAP, LayerRank, rank_analysis
from .spear import Spear, SpearResult, spear_linear
from .trap import Trap, invert_trap

__all__ = [
    "ATTACKS",
    "Analytic",
    "Attack",
    "Best",
    "CPA",
    "DLG",
    "Fishing",
    "GradInversion",
    "IDLG",
    "Imprint",
    "InvertingGradients",
    "LayerRank",
    "RGAP",
    "Reconstruction",
    "Spear",
    "SpearResult",
    "Trap",
    "UnmixResult",
    "build_attack",
    "cocktail_party",
    "fast_ica",
    "invert_features",
    "invert_gradients",
    "invert_imprint",
    "invert_trap",
    "match_gradients",
    "rank_analysis",
    "spear_linear",
]
