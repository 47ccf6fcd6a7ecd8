"""The robust aggregation rules, as pure functions on a stack of updates.

Each takes ``updates`` (n, d) and optional ``weights`` (n,), computes in float64
and returns the (d,) aggregate in the input dtype: the mean (FedAvg, McMahan et
al. 2017), the coordinate-wise median and trimmed mean (Yin et al. 2018), Krum and
multi-Krum (Blanchard et al. 2017), RFA's geometric median (Pillutla et al. 2019),
Bulyan (El Mhamdi et al. 2018) and centered clipping (Karimireddy et al. 2021).
:mod:`defenses.robust` adapts them to the server's ``aggregator`` hook.
"""

from __future__ import annotations

import math

import torch

from .robust_checks import _check_params, _prepare, _uniform

__all__ = [
    "bulyan",
    "centered_clipping",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
]

Tensor = torch.Tensor


def mean(updates: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """The mean of the updates, sample-weighted when ``weights`` are given (FedAvg).

    McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data": Σ n_k u_k / Σ n_k. Not robust: one client moves it anywhere.

    Args:
        updates: (n, d) one update per row.
        weights: (n,) sample counts; ``None`` for the plain mean.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    x, w = _prepare("mean", updates, weights)
    out = x.mean(0) if w is None else w @ x  # (d,)
    return out.to(updates.dtype)


def _median(x: Tensor) -> Tensor:
    """Coordinate-wise median of (n, d); the mean of the two middle values for even n."""
    n = x.shape[0]
    s = x.sort(dim=0).values  # (n, d)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median(updates: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

    For even n the two middle values are averaged (``numpy.median``, as in Flower's
    ``aggregate_median``; ``torch.median`` would return the lower one).

    Args:
        updates: (n, d) one update per row.
        weights: (n,) checked but ignored: the median is unweighted, as in Flower.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    x, _ = _prepare("median", updates, weights)
    return _median(x).to(updates.dtype)


def trimmed_mean(updates: Tensor, *, weights: Tensor | None = None, beta: float) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Per coordinate, drops the k = floor(beta·n) smallest and k largest values and
    averages the rest, like ``scipy.stats.trim_mean(x, beta, axis=0)`` and Flower's
    ``aggregate_trimmed_avg``.

    Args:
        updates: (n, d) one update per row.
        weights: (n,) checked but ignored (unweighted, as in scipy and Flower).
        beta: the fraction cut from EACH end, 0 <= beta < 0.5.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    _check_params("trimmed_mean", {"beta": beta})
    x, _ = _prepare("trimmed_mean", updates, weights)
    n = x.shape[0]
    k = int(beta * n)  # scipy's int(proportiontocut * nobs); n - 2k >= 1 since beta < 0.5
    s = x.sort(dim=0).values  # (n, d)
    return s[k : n - k].mean(0).to(updates.dtype)


def _pairwise_sq_distances(x: Tensor) -> Tensor:
    """(n, n) squared Euclidean distances from exact differences (no Gram-matrix cancellation)."""
    return torch.stack([((x - xi) ** 2).sum(1) for xi in x])  # (n, n)


def _krum_scores(d2: Tensor, f: int) -> Tensor:
    """Krum scores (n,): each row's sum of squared distances to its n − f − 2 nearest others.

    The neighbour count is ``max(1, n − f − 2)`` (capped at n − 1), as in Flower's
    ``aggregate_krum``; the floor only matters inside :func:`bulyan`, whose later
    Krum rounds run on fewer than 2f + 3 updates.
    """
    n = d2.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    if k == 0:
        return torch.zeros(n, dtype=d2.dtype, device=d2.device)
    others = d2.clone()
    others.fill_diagonal_(math.inf)  # exclude self (Flower drops argsort position 0)
    return others.sort(dim=1).values[:, :k].sum(1)


def _check_krum_n(rule: str, n: int, f: int) -> None:
    if n < 2 * f + 3:
        raise ValueError(f"{rule} needs n >= 2f + 3 (n={n}, f={f})")


def _krum_order(x: Tensor, f: int) -> Tensor:
    """Indices (n,) sorted by Krum score; ties broken by the lower index (stable sort)."""
    scores = _krum_scores(_pairwise_sq_distances(x), f)
    return torch.sort(scores, stable=True).indices


def krum(updates: Tensor, *, weights: Tensor | None = None, f: int) -> Tensor:
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries").

    score_i = Σ of the squared distances from update i to its n − f − 2 nearest
    other updates; returns the update with the lowest score. Exact ties go to the
    lowest index, like ``numpy.argmin`` in Flower's ``aggregate_krum`` (so on
    [[1,2,3],[4,5,6],[7,8,9]] with f = 0, where all scores are 27, Krum returns
    [1,2,3]). With a single neighbour (n = f + 3) mutual nearest neighbours tie
    exactly, so the choice then depends on client order. Blanchard et al.'s
    guarantee assumes 2f + 2 < n, i.e. n >= 2f + 3; smaller n is rejected (Flower
    does not check).

    Args:
        updates: (n, d) one update per row, n >= 2f + 3.
        weights: (n,) checked but ignored: Krum selects one update.
        f: the number of Byzantine clients tolerated.

    Returns:
        (d,) the selected update, in the dtype of ``updates``.
    """
    return updates[_krum_selection(updates, weights, f)].clone()


def _krum_selection(updates: Tensor, weights: Tensor | None, f: int) -> int:
    """The row :func:`krum` selects (inputs checked)."""
    _check_params("krum", {"f": f})
    x, _ = _prepare("krum", updates, weights)
    _check_krum_n("krum", x.shape[0], f)
    return int(_krum_order(x, f)[0])


def multi_krum(
    updates: Tensor, *, weights: Tensor | None = None, f: int, m: int | None = None
) -> Tensor:
    """Multi-Krum (Blanchard et al. 2017): the mean of the m updates with the lowest Krum scores.

    The selected updates are averaged with their sample counts when ``weights`` are
    given (as Flower's ``aggregate_krum`` with ``to_keep``); ties in score go to the
    lower index. m = 1 is :func:`krum`; m = n is :func:`mean`.

    Args:
        updates: (n, d) one update per row, n >= 2f + 3.
        weights: (n,) sample counts used to average the selected updates.
        f: the number of Byzantine clients tolerated.
        m: how many updates to keep, 1 <= m <= n; ``None``: n − f (the paper's choice).

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    keep, a = _multi_krum_selection(updates, weights, f, m)
    x = updates.to(torch.float64)
    return (a @ x[keep] / a.sum()).to(updates.dtype)


def _multi_krum_selection(
    updates: Tensor, weights: Tensor | None, f: int, m: int | None
) -> tuple[Tensor, Tensor]:
    """The rows :func:`multi_krum` keeps (m,) and their float64 weights (m,) (inputs checked)."""
    _check_params("multi_krum", {"f": f, "m": m})
    x, w = _prepare("multi_krum", updates, weights)
    n = x.shape[0]
    _check_krum_n("multi_krum", n, f)
    m = n - f if m is None else m
    if m > n:
        raise ValueError(f"multi_krum needs m <= n (n={n}, m={m})")
    keep = _krum_order(x, f)[:m]  # (m,)
    return keep, (_uniform(x)[keep] if w is None else w[keep])


def geometric_median(
    updates: Tensor,
    *,
    weights: Tensor | None = None,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    """The (weighted) geometric median by RFA's smoothed Weiszfeld iterations.

    Pillutla, Kakade and Harchaoui 2019, "Robust Aggregation for Federated
    Learning", Algorithm 3: start at the weighted mean z, then repeat
    z ← Σ β_i x_i / Σ β_i with β_i = α_i / max(nu, ‖x_i − z‖) (α = normalised
    weights) until ‖z_new − z‖ <= tol·‖z_new‖ or after ``max_iter`` iterations.

    Args:
        updates: (n, d) one update per row.
        weights: (n,) sample counts (α); ``None``: uniform.
        nu: smoothing, > 0: distances below it count as ``nu``.
        max_iter: the most Weiszfeld iterations, >= 1.
        tol: relative-change stopping threshold, >= 0.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    _check_params("geometric_median", {"nu": nu, "max_iter": max_iter, "tol": tol})
    x, w = _prepare("geometric_median", updates, weights)
    alpha = _uniform(x) if w is None else w  # (n,)
    z = alpha @ x  # (d,)
    for _ in range(max_iter):
        beta = alpha / (x - z).norm(dim=1).clamp_min(nu)  # (n,)
        z_new = beta @ x / beta.sum()  # (d,)
        change = float((z_new - z).norm())
        z = z_new
        if change <= tol * float(z.norm()):
            break
    return z.to(updates.dtype)


def bulyan(updates: Tensor, *, weights: Tensor | None = None, f: int) -> Tensor:
    """Bulyan over Krum (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden
    Vulnerability of Distributed Learning in Byzantium").

    1. Selection: θ = n − 2f updates are chosen by Krum applied repeatedly, each
       chosen update removed from the candidates (Krum with the same f on the
       remaining set; neighbour count max(1, n' − f − 2) as in Flower; ties to the
       lowest index).
    2. Aggregation, per coordinate: the mean of the β = θ − 2f selected values
       closest to the selected values' median (ties in distance go to the earlier
       selected update), as in the paper and Flower's ``aggregate_bulyan``.

    The last Krum rounds run on 2f + 1 updates with max(1, f − 1) neighbours; for
    f <= 2 that is one neighbour, where mutual nearest neighbours tie exactly and the
    lowest-index rule decides, so the result can depend on client order (as in Flower).

    Args:
        updates: (n, d) one update per row, n >= 4f + 3 (the paper's assumption).
        weights: (n,) checked but ignored (selection and order statistics).
        f: the number of Byzantine clients tolerated.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    selected = _bulyan_selection(updates, weights, f)
    return _bulyan_combine(updates.to(torch.float64)[selected], f).to(updates.dtype)


def _bulyan_selection(updates: Tensor, weights: Tensor | None, f: int) -> list[int]:
    """Bulyan's step 1: the θ = n − 2f rows chosen by repeated Krum, in order (inputs checked)."""
    _check_params("bulyan", {"f": f})
    x, _ = _prepare("bulyan", updates, weights)
    n = x.shape[0]
    if n < 4 * f + 3:
        raise ValueError(f"bulyan needs n >= 4f + 3 (n={n}, f={f})")
    d2 = _pairwise_sq_distances(x)  # (n, n)
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(n - 2 * f):
        sub = d2[remaining][:, remaining]
        best = int(torch.argmin(_krum_scores(sub, f)))  # first minimum: lowest index
        selected.append(remaining.pop(best))
    return selected


def _bulyan_combine(s: Tensor, f: int) -> Tensor:
    """Bulyan's step 2 on the θ selected rows (θ, d): per coordinate, the mean of the
    β = θ − 2f values closest to their median."""
    dev = (s - _median(s)).abs()  # (θ, d)
    closest = torch.sort(dev, dim=0, stable=True).indices[: s.shape[0] - 2 * f]  # (β, d)
    return s.gather(0, closest).mean(0)


def centered_clipping(
    updates: Tensor,
    *,
    weights: Tensor | None = None,
    tau: float,
    iterations: int = 1,
    center: Tensor | None = None,
) -> Tensor:
    """Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for
    Byzantine Robust Optimization").

    Repeats ``iterations`` times v ← v + Σ α_i (x_i − v)·min(1, tau/‖x_i − v‖),
    starting at ``center`` (the previous aggregate; zeros by default). α is uniform
    (the paper's mean) or the normalised ``weights``. Each step moves v by at most
    ``tau``, whatever the outliers.

    Args:
        updates: (n, d) one update per row.
        weights: (n,) sample counts; ``None``: the plain mean of the paper.
        tau: the clipping radius, > 0.
        iterations: clipping iterations, >= 1.
        center: (d,) the starting point; ``None``: zeros.

    Returns:
        (d,) the aggregate, in the dtype of ``updates``.
    """
    _check_params("centered_clipping", {"tau": tau, "iterations": iterations})
    x, w = _prepare("centered_clipping", updates, weights)
    alpha = _uniform(x) if w is None else w  # (n,)
    if center is None:
        v = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    else:
        if center.shape != (x.shape[1],):
            raise ValueError(
                f"centered_clipping needs center of shape ({x.shape[1]},); "
                f"got {tuple(center.shape)}"
            )
        v = center.to(x)
    for _ in range(iterations):
        diff = x - v  # (n, d)
        norms = diff.norm(dim=1)  # (n,)
        scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
        v = v + alpha @ (diff * scale[:, None])
    return v.to(updates.dtype)
