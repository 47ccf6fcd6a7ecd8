"""Whitening and FastICA: the blind source separation under the Cocktail Party Attack.

Pure functions on tensors (m mixtures of k sources, n samples each, rows as
mixtures), float64 inside. :func:`fast_ica` is the symmetric fixed-point
algorithm of Hyvärinen ("Fast and robust fixed-point algorithms for
independent component analysis", IEEE Trans. Neural Networks, 1999) with
G = log cosh, step for step as scikit-learn's ``FastICA(algorithm="parallel",
fun="logcosh")``, which the tests check it against.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

__all__ = ["LOGCOSH_GAUSS", "fast_ica", "ica_rotation", "whiten"]

log = logging.getLogger(__name__)


def _gauss_logcosh() -> float:
    """E log cosh(ν) for ν ~ N(0, 1), by 64-point Gauss-Hermite quadrature (≈ 0.37457)."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    return float((w * np.log(np.cosh(x))).sum() / w.sum())


LOGCOSH_GAUSS = _gauss_logcosh()


def whiten(mixtures: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre the rows of ``mixtures`` (m, n) and project them onto k whitened components.

    Returns ``(signals (k, n), whitening K (k, m), spectrum (min(m, n),))`` with
    signals = K·(mixtures − row means) of unit variance over the n entries
    (scikit-learn's ``FastICA(whiten="arbitrary-variance")``: eigenvectors
    signed so their first entry is positive, variance normalised by n). The
    spectrum holds the singular values of the centred mixtures, largest first.
    """
    x = mixtures - mixtures.mean(1, keepdim=True)
    m, n = x.shape
    if m <= n:  # eigen-decompose the smaller Gram matrix, largest eigenvalues first
        evals, u = torch.linalg.eigh(x @ x.T)  # (m,), (m, m)
        s, u = evals.flip(0).clamp_min(0).sqrt(), u.flip(1)[:, :k]
    else:
        evals, v = torch.linalg.eigh(x.T @ x)  # (n,), (n, n)
        s, v = evals.flip(0).clamp_min(0).sqrt(), v.flip(1)[:, :k]
        u = (x @ v) / s[:k].clamp_min(1e-300)  # (m, k)
    u = u * torch.where(u[0] < 0, -1.0, 1.0).to(u)  # sign convention of scikit-learn
    whitening = (u / s[:k].clamp_min(1e-300)).T * math.sqrt(n)  # (k, m)
    return whitening @ x, whitening, s


def _sym_decorrelate(w: torch.Tensor) -> torch.Tensor:
    """(W Wᵀ)^(-1/2) W: the nearest matrix with orthonormal rows."""
    s, u = torch.linalg.eigh(w @ w.T)
    return (u / s.clamp_min(1e-300).sqrt()) @ u.T @ w


def fast_ica(
    mixtures: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    w_init: torch.Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
) -> torch.Tensor:
    """FastICA, parallel (symmetric) version with G = log cosh (Hyvärinen 1999).

    The fixed-point iteration of scikit-learn's ``FastICA(algorithm="parallel",
    fun="logcosh")``: W ← sym(E[x·tanh(Wx)ᵀ] − diag(E[1 − tanh²(Wx)])·W) on the
    whitened mixtures until the rows stop turning (|⟨w_new, w⟩| within ``tol``
    of 1).

    Args:
        mixtures: (m, n) m observed mixtures of k sources, n samples each.
        k: number of sources (≤ min(m, n)).
        generator: draws the initial rotation, N(0, 1) entries (default: seed 0).
        w_init: (k, k) initial rotation instead of a random one.
        max_iter: fixed-point iterations at most.
        tol: convergence tolerance.

    Returns:
        Unmixing (k, m), in ``mixtures``' dtype: the sources, each up to scale
        and sign, are the rows of ``unmixing @ mixtures`` (row means kept).
    """
    if mixtures.dim() != 2 or not 1 <= k <= min(mixtures.shape):
        raise ValueError(
            f"fast_ica needs mixtures shaped (m, n) and 1 <= k <= min(m, n); "
            f"got {tuple(mixtures.shape)} and k={k}"
        )
    x = mixtures.double()
    xw, whitening, _ = whiten(x, k)
    if w_init is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        w_init = torch.randn(k, k, generator=gen, dtype=torch.float64)
    w = ica_rotation(xw, w_init.to(x), max_iter, tol)
    return (w @ whitening).to(mixtures.dtype)


def ica_rotation(xw: torch.Tensor, w: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """FastICA's fixed point on whitened signals xw (k, n) from w (k, k): a rotation (k, k)."""
    w = _sym_decorrelate(w)
    n = xw.shape[1]
    for _ in range(max_iter):
        g = torch.tanh(w @ xw)  # (k, n)
        w1 = _sym_decorrelate(g @ xw.T / n - (1 - g.square()).mean(1, keepdim=True) * w)
        lim = float(((w1 * w).sum(1).abs() - 1).abs().max())
        w = w1
        if lim < tol:
            break
    else:
        log.warning("FastICA did not converge in %d iterations", max_iter)
    return w
