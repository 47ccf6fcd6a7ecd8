"""Label recovery from the last layer's gradient: plain functions on tensors.

Every strategy reads the last linear layer, ``logits = W h + b`` with ``W`` (K, F),
trained with the mean cross-entropy over a batch of ``B`` samples. Its gradient is

    ∇W = (1/B) Σ_i (p_i − y_i) h_iᵀ  (K, F),    ∇b = (1/B) Σ_i (p_i − y_i)  (K,),

with ``p_i`` the softmax output and ``y_i`` the one-hot label of sample ``i``. With
non-negative features ``h_i`` (after a sigmoid or a ReLU) the rows of present classes
are pulled down and the others pushed up; the strategies differ in how they turn
that into labels and counts.

A strategy is a function ``(layer, num_labels, *, model=None, generator=None)``
returning a sorted ``(num_labels,)`` int64 tensor, registered in
:data:`LABEL_STRATEGIES`; :func:`recover_labels` applies one to an Observation.

References:
    B. Zhao, K. R. Mopuri, H. Bilen, "iDLG: Improved Deep Leakage from Gradients",
    arXiv:2001.02610, 2020.
    H. Yin, A. Mallya, A. Vahdat, J. M. Alvarez, J. Kautz, P. Molchanov, "See through
    Gradients: Image Batch Recovery via GradInversion", CVPR 2021.
    A. Wainakh, F. Ventola, T. Müßig, J. Keim, C. Garcia Cordero, E. Zimmer, T. Grube,
    K. Kersting, M. Mühlhäuser, "User-Level Label Leakage from Gradients in Federated
    Learning", PETS 2022 (2), pp. 227-244.
    T. Dang, O. Thakkar, S. Ramaswamy, R. Mathews, P. Chin, F. Beaufays, "Revealing and
    Protecting Labels in Distributed Training", NeurIPS 2021.
    K. Ma, Y. Sun, J. Cui, D. Li, Z. Guan, J. Liu, "Instance-wise Batch Label
    Restoration via Gradients in Federated Learning", ICLR 2023.
"""

from __future__ import annotations

# Importing each strategy module registers it in LABEL_STRATEGIES (auto imports
# idlg, ilrg and llg; rlg and yin are imported here), so the registry is complete
# once the package is imported. Private helpers are re-exported (``x as x``) for
# the callers that import them from ``leakage.labels``.
from .auto import _auto as _auto
from .base import (
    LABEL_STRATEGIES,
    LastLayer,
    delta_coefficients,
    last_layer,
    recover_labels,
    update_as_gradient,
)
from .base import _check_num_labels as _check_num_labels
from .base import _counts_to_labels as _counts_to_labels
from .base import _round_counts as _round_counts
from .base import log as log
from .idlg import idlg, idlg_label
from .ilrg import _ILRG_MIN_MASS as _ILRG_MIN_MASS
from .ilrg import _ilrg_counts as _ilrg_counts
from .ilrg import _solve_counts as _solve_counts
from .ilrg import ilrg
from .llg import _LLG_DUMMY_BUDGET as _LLG_DUMMY_BUDGET
from .llg import _LLG_DUMMY_DRAWS as _LLG_DUMMY_DRAWS
from .llg import _dummy_impact as _dummy_impact
from .llg import _fill_by_impact as _fill_by_impact
from .llg import llg
from .rlg import _RLG_MARGIN as _RLG_MARGIN
from .rlg import _separation_margin as _separation_margin
from .rlg import rlg
from .yin import per_class_minimum_labels, yin

__all__ = [
    "LABEL_STRATEGIES",
    "LastLayer",
    "delta_coefficients",
    "idlg",
    "idlg_label",
    "ilrg",
    "last_layer",
    "llg",
    "per_class_minimum_labels",
    "recover_labels",
    "rlg",
    "update_as_gradient",
    "yin",
]
