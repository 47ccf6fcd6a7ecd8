"""RLG: the label set from an SVD of the weight gradient and one small LP per class.

Reference:
    T. Dang, O. Thakkar, S. Ramaswamy, R. Mathews, P. Chin, F. Beaufays, "Revealing and
    Protecting Labels in Distributed Training", NeurIPS 2021.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor, nn

from .base import LABEL_STRATEGIES, LastLayer, _check_num_labels

__all__ = ["rlg"]

_RLG_MARGIN = 1e-6  # separation margin (between unit rows) that counts as present


def _separation_margin(rows: Tensor, c: int) -> float:
    """Largest t with some ‖x‖∞ ≤ 1: rows[c]·x ≤ −t and rows[j]·x ≥ t for all j ≠ c.

    A linear programme in (x, t); 0 when no hyperplane through the origin puts row c
    alone on its negative side.
    """
    k, r = rows.shape
    a = rows.numpy()
    sign = np.ones(k)
    sign[c] = -1.0
    res = linprog(
        c=np.r_[np.zeros(r), -1.0],  # maximise t
        A_ub=np.hstack([-sign[:, None] * a, np.ones((k, 1))]),  # t − sign_j·rows_j·x ≤ 0
        b_ub=np.zeros(k),
        bounds=[(-1.0, 1.0)] * r + [(None, 1.0)],
        method="highs",
    )
    return max(0.0, -float(res.fun)) if res.status == 0 else 0.0


@LABEL_STRATEGIES.register("rlg")
def rlg(
    layer: LastLayer,
    num_labels: int,
    *,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RLG (Dang et al., NeurIPS 2021): the label set from an SVD of the weight gradient.

    ∇W = (1/B) Δᵀ H with Δ the (B, K) rows ``δ_i = p_i − y_i``, so the column space of
    ∇W is the span of the ``δ_i``, each negative at its label only. With ∇W = U Σ Vᵀ
    and ``r`` its rank, class ``c`` is present when row ``c`` of ``U[:, :r]`` can be put
    alone on the negative side of a hyperplane through the origin (``δ_i`` itself does
    that for the label of sample i). We decide that with one small linear programme
    per class — the largest separation margin, present above 1e-6 — on rows scaled to
    unit length, so that classes with tiny softmax outputs (rows near zero) are judged
    by direction, not size. The public implementation (as ported in iLRG's code)
    separates one row from 999 others with a perceptron and then runs an LP, which
    ties it to ~1,000 classes; this works for any K. The rank is ``num_labels`` unless
    the singular values say fewer (duplicate samples), with a tolerance of σ_max times
    the gradient dtype's epsilon.

    Requirement: the span must be a proper part of the (K − 1)-dimensional space of
    vectors summing to zero (every ``δ_i`` does) and H must have full row rank, so
    the rank must stay below ``min(F, K − 1)``: ``B < min(F, K − 1)`` (the paper's
    ``B < min(F, K)`` plus the sum-to-zero constraint); a larger ``num_labels``
    raises ``ValueError``. Even below it the test needs ``B ≪ K``: measured here on the
    untrained sigmoid LeNet with 10 classes, about 2% of the absent classes pass it
    at B = 4 and 40% at B = 8, against 0.1% with 100 classes at B = 24.

    RLG recovers a set, not counts: when more classes pass than ``num_labels``, the
    ``num_labels`` with the largest margins are kept; when fewer pass, the remaining
    labels repeat the found classes in order of their weight-gradient row sums
    (lowest first, cyclically) — a guess. ``model`` and ``generator`` are unused.

    Args:
        layer: the last layer, weight_grad (K, F).
        num_labels: B, the samples behind the gradient.

    Returns:
        (num_labels,) int64, sorted.

    Raises:
        ValueError: If ``num_labels`` is too large for the classes to separate.
    """
    _check_num_labels(layer, num_labels)
    w = layer.weight_grad.detach().double().cpu()  # (K, F)
    k, f = w.shape
    u, s, _ = torch.linalg.svd(w, full_matrices=False)  # u (K, min(K, F)), s (min(K, F),)
    if num_labels >= min(f, k - 1):
        raise ValueError(
            f"rlg needs fewer samples than min(F, K − 1) = {min(f, k - 1)} for {k} classes and "
            f"{f} features; got {num_labels}: use ilrg or llg"
        )
    tol = float(s.max()) * torch.finfo(layer.weight_grad.dtype).eps
    rank = min(num_labels, int((s > tol).sum()))
    g = w.sum(dim=1)  # (K,) row sums, for the fallback and the repeats
    if rank == 0:
        return torch.full((num_labels,), int(g.argmin()), dtype=torch.int64)
    rows = u[:, :rank]  # (K, r): class coordinates in the span of the δ_i
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    margins = torch.tensor([_separation_margin(rows, c) for c in range(k)])  # (K,)
    found = [int(c) for c in margins.argsort(descending=True) if margins[c] > _RLG_MARGIN]
    found = found[:num_labels] or [int(g.argmin())]
    order = sorted(found, key=lambda c: float(g[c]))
    picked = found + [order[i % len(order)] for i in range(num_labels - len(found))]
    return torch.tensor(sorted(picked), dtype=torch.int64)
