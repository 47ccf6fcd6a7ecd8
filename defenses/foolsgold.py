"""FoolsGold (Fung, Yoon and Beschastnikh 2020): the stateful, sybil-resistant robust rule.

Re-exported by :mod:`defenses.robust`, whose ``AGGREGATORS`` registers it as
``foolsgold``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .robust_checks import _check_params, _prepare

__all__ = ["FoolsGold", "foolsgold_weights"]

log = logging.getLogger(__name__)

Tensor = torch.Tensor


def foolsgold_weights(histories: Tensor, *, confidence: float = 1.0) -> Tensor:
    """FoolsGold's per-client weights from the clients' update histories.

    Fung, Yoon and Beschastnikh 2020, "The Limitations of Federated Learning in
    Sybil Settings", Algorithm 1 (without the optional feature-importance step), as
    in the authors' ``foolsgold.py``: cosine similarities cs_ij of the histories
    (cs_ii = 0); v_i = max_j cs_ij; pardoning cs_ij ← cs_ij·v_i/v_j when v_j > v_i;
    α_i = 1 − max_j cs_ij clipped to [0, 1]; α ← α / max α, with 1 replaced by
    0.99; α ← κ(ln[α/(1 − α)] + 0.5) clipped to [0, 1].

    Args:
        histories: (k, d) one history (sum of past updates) per client.
        confidence: κ > 0, the logit's confidence.

    Returns:
        (k,) float64 weights in [0, 1]; all zero when every client looks like a sybil.
    """
    _check_params("foolsgold", {"confidence": confidence})
    h = histories.to(torch.float64)
    unit = h / h.norm(dim=1, keepdim=True).clamp_min(1e-300)  # (k, d)
    cs = unit @ unit.T  # (k, k)
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values  # (k,)
    pardon = v[:, None] < v[None, :]  # (k, k): v_i < v_j
    cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(1e-300), cs)
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)  # (k,)
    if alpha.max() == 0:
        return alpha
    alpha = alpha / alpha.max()
    alpha = torch.where(alpha == 1, torch.full_like(alpha, 0.99), alpha)
    alpha = confidence * (torch.log(alpha / (1 - alpha)) + 0.5)  # ln 0 = -inf -> 0 below
    return alpha.clamp(0, 1)


class FoolsGold:
    """FoolsGold (Fung et al. 2020): down-weights clients whose histories look alike.

    Keeps, per client id, the sum of all that client's updates so far, so a client
    that skips rounds (client sampling) keeps its history. Each call adds the
    current updates to their senders' histories, computes :func:`foolsgold_weights`
    over every client with a history (Algorithm 1 loops over all clients, so a sybil
    is caught even when its twins were not sampled this round), and returns the
    α-weighted average of the current updates (α times the sample weights when
    given). When every current weight is 0, it returns zeros (no step).

    Args:
        confidence: κ > 0, the logit's confidence.

    Attributes:
        history: client id -> (d,) float64 sum of that client's updates.
        last_weights: (n,) the normalised weights of the last call's updates.
    """

    def __init__(self, confidence: float = 1.0) -> None:
        _check_params("foolsgold", {"confidence": confidence})
        self.confidence = confidence
        self.history: dict[int, Tensor] = {}
        self.last_weights: Tensor | None = None

    def __call__(
        self,
        updates: Tensor,
        *,
        client_ids: Sequence[int],
        weights: Tensor | None = None,
    ) -> Tensor:
        """Aggregate one round: ``updates`` (n, d) from ``client_ids`` (n,); returns (d,)."""
        x, w = _prepare("foolsgold", updates, weights)
        ids = [int(c) for c in client_ids]
        if len(ids) != x.shape[0] or len(set(ids)) != len(ids):
            raise ValueError(
                f"foolsgold needs one distinct client id per update ({x.shape[0]}); got {ids}"
            )
        if self.history and next(iter(self.history.values())).shape != x.shape[1:]:
            raise ValueError("foolsgold got updates of a different size than its history")
        for c, xi in zip(ids, x):
            self.history[c] = self.history[c] + xi if c in self.history else xi.clone()
        known = list(self.history)
        alpha_all = foolsgold_weights(
            torch.stack([self.history[c] for c in known]), confidence=self.confidence
        )  # (k,)
        row = {c: i for i, c in enumerate(known)}
        alpha = alpha_all[[row[c] for c in ids]]  # (n,)
        if w is not None:
            alpha = alpha * w
        if alpha.sum() == 0:
            log.warning("foolsgold: every update this round looks like a sybil; no step")
            self.last_weights = alpha
            return torch.zeros(x.shape[1], dtype=updates.dtype, device=updates.device)
        self.last_weights = alpha / alpha.sum()
        return (self.last_weights @ x).to(updates.dtype)
