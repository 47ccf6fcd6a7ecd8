"""Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen 2020).

The labels are read analytically from the last layer's gradient (iDLG's rule
is exact at batch size 1 when the features entering that layer are
non-negative; for batches the ``auto`` strategy switches to instance-wise
label counting, see :mod:`leakage.labels`), then only the images are
optimised, with the same L-BFGS update matching as DLG.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ATTACKS
from .dlg import DLG

__all__ = ["IDLG"]


@dataclass(frozen=True)
class IDLG(DLG):
    """iDLG: labels read off the last layer's gradient, then L-BFGS on the images only.

    Same parameters as :class:`~leakage.attacks.dlg.DLG`; ``label_strategy``
    defaults to ``"auto"`` (``idlg`` at batch size 1, ``ilrg`` for batches).
    """

    label_strategy: str = "auto"


ATTACKS.register("idlg")(IDLG)
