"""Robust aggregation rules: pure functions on a stack of updates, and the server hook.

Every rule takes ``updates`` (n, d), one flattened update per row, and optional
``weights`` (n,) (the clients' sample counts), and returns the aggregate (d,)
in the dtype of ``updates``:

* :func:`mean`: the (sample-weighted) mean, FedAvg (McMahan et al. 2017);
* :func:`median`: coordinate-wise median (Yin et al. 2018);
* :func:`trimmed_mean`: coordinate-wise trimmed mean (Yin et al. 2018);
* :func:`krum` and :func:`multi_krum` (Blanchard et al. 2017);
* :func:`geometric_median`: RFA's smoothed Weiszfeld (Pillutla et al. 2019);
* :func:`bulyan` (El Mhamdi et al. 2018);
* :func:`centered_clipping` (Karimireddy et al. 2021);
* :class:`FoolsGold` (Fung et al. 2020), stateful: it keeps each client's history.

Weights are the clients' *reported* weights (``Update.weight``: the dataset
size n_k by default, McMahan et al. 2017). :func:`mean`,
:func:`multi_krum`, :func:`geometric_median`, :func:`centered_clipping` and
:class:`FoolsGold` use them; :func:`median`, :func:`trimmed_mean`,
:func:`krum` and :func:`bulyan` are order statistics or selections and ignore
them (they are still checked). A rule that uses them trusts them.

Numerics: every rule computes in float64 (exact pairwise differences, no
``‖a‖² + ‖b‖² − 2ab`` cancellation, so exactly tied Krum scores stay tied) and
returns the input dtype. That costs one float64 copy of the (n, d) stack.

:class:`RobustAggregator` (or :func:`make_aggregator`) adapts a rule to the
``aggregator`` hook of :class:`fl_core.server.Server`; :data:`AGGREGATORS`
maps rule names to the functions (and the :class:`FoolsGold` class); its
``aggregate_with_buffers`` applies each rule to the clients' BatchNorm
statistics too (see :class:`RobustAggregator`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fl_core.types import Update

from .foolsgold import FoolsGold, foolsgold_weights
from .robust_checks import _check_params, _prepare, _uniform

__all__ = [
    "AGGREGATORS",
    "FoolsGold",
    "RobustAggregator",
    "bulyan",
    "centered_clipping",
    "foolsgold_weights",
    "geometric_median",
    "krum",
    "make_aggregator",
    "mean",
    "median",
    "multi_krum",
    "rule_parameters",
    "trimmed_mean",
]

log = logging.getLogger(__name__)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the rules


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


# ----------------------------------------------------------------------------- server hook

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "bulyan": bulyan,
    "centered_clipping": centered_clipping,
    "foolsgold": FoolsGold,
    "geometric_median": geometric_median,
    "krum": krum,
    "mean": mean,
    "median": median,
    "multi_krum": multi_krum,
    "trimmed_mean": trimmed_mean,
}
"""Rule name -> pure function (or, for ``foolsgold``, the stateful class)."""

_STATE_PARAMS = {"updates", "weights", "center", "client_ids", "self"}


def rule_parameters(rule: str) -> dict[str, inspect.Parameter]:
    """The configurable parameters of ``rule`` (not the inputs, not the server's state)."""
    target = AGGREGATORS[rule]
    sig = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    return {n: p for n, p in sig.parameters.items() if n not in _STATE_PARAMS}


class RobustAggregator:
    """A robust rule as :class:`fl_core.server.Server`'s ``aggregator`` hook.

    Stacks ``u.flat`` of the round's updates into (n, d), passes their
    reported ``weight`` (the FedAvg weight, n_k by default) as weights, calls
    the rule and cuts the (d,) result back into tensors shaped like
    ``updates[0].tensors``. ``foolsgold`` gets the client ids and keeps its
    histories across rounds; ``centered_clipping`` starts each round at the
    previous round's aggregate (zeros in the first).

    BatchNorm statistics (:meth:`aggregate_with_buffers`, which the server
    calls): the clients' buffers (n, d_b) follow the same rule, so a robust
    rule also protects them (a client cannot poison the running mean or
    variance the way FedAvg of the buffers would let it):

    * ``mean``, ``median``, ``trimmed_mean``, ``geometric_median``: the same
      rule, with the same weights and parameters, on the buffers
      (coordinate-wise for median and trimmed mean; the geometric median of
      the buffer vectors for RFA);
    * ``krum``: the buffers of the client Krum selects on the parameters;
      ``multi_krum``: the weighted mean of the selected clients' buffers;
      ``bulyan``: Bulyan's second stage (per coordinate, the mean of the β
      values closest to the median) over the buffers of the θ clients its
      first stage selected on the parameters;
    * ``foolsgold``: the buffers averaged with FoolsGold's client weights of
      the round (a client FoolsGold trusts moves the buffers as it moves the
      parameters; when it trusts no client, the global buffers stay);
    * ``centered_clipping``: its radius τ and its center (the previous
      aggregate) are in units of parameter deltas, and buffers are absolute
      statistics, so the rule has no meaning for them; the buffers take the
      coordinate-wise median instead (Yin et al. 2018).

    Args:
        rule: a name in :data:`AGGREGATORS`.
        **params: the rule's parameters (e.g. ``f=1`` for ``krum``); names and the
            values that do not depend on n are checked here, the n-dependent rules
            (Krum n >= 2f + 3, Bulyan n >= 4f + 3) at each call.
    """

    def __init__(self, rule: str, **params: Any) -> None:
        if rule not in AGGREGATORS:
            raise ValueError(
                f"unknown robust aggregator {rule!r}; valid names: {', '.join(sorted(AGGREGATORS))}"
            )
        valid = rule_parameters(rule)
        listed = ", ".join(valid) or "none"
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for {rule}; valid parameters: {listed}"
            )
        missing = [n for n, p in valid.items() if p.default is p.empty and n not in params]
        if missing:
            raise ValueError(f"{rule} needs parameter(s) {', '.join(missing)}; valid: {listed}")
        _check_params(rule, params)
        self.rule = rule
        self.params = dict(params)
        self._foolsgold = FoolsGold(**params) if rule == "foolsgold" else None
        self._center: Tensor | None = None

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"RobustAggregator({self.rule!r}{args})"

    def check_clients(self, n: int) -> None:
        """Raise ``ValueError`` now if the rule cannot aggregate ``n`` updates (Krum's
        n >= 2f + 3, Bulyan's n >= 4f + 3, multi-Krum's m <= n ...), so a run with too
        few clients per round stops before its first round; no state changes."""
        x = torch.zeros(n, 1)
        try:
            if self.rule == "foolsgold":
                FoolsGold(**self.params)(x, client_ids=list(range(n)))
            else:
                AGGREGATORS[self.rule](x, **self.params)
        except ValueError as e:
            raise ValueError(f"{e}: {n} clients per round cannot run {self!r}") from None

    def __call__(self, updates: Sequence[Update]) -> tuple[Tensor, ...]:
        """Aggregate one round's updates; returns tensors in parameter order."""
        return self._aggregate(updates, with_buffers=False)[0]

    def aggregate_with_buffers(
        self, updates: Sequence[Update]
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        """Aggregate one round's updates and their buffers under this rule.

        Returns ``(tensors, buffers)``: the tensors as :meth:`__call__` returns
        them (the rule's state advances once), and the clients' floating-point
        buffers (BatchNorm running statistics, ``Update.buffers``) aggregated as
        the rule says (see the class docstring); ``()`` when the updates carry
        none, ``None`` when the rule keeps the global model's buffers (FoolsGold
        trusting no client this round).
        """
        return self._aggregate(updates, with_buffers=True)

    def _aggregate(self, updates: Sequence[Update], *, with_buffers: bool):
        if not updates:
            raise ValueError("cannot aggregate an empty list of updates")
        x = torch.stack([u.flat for u in updates])  # (n, d)
        w = torch.tensor([u.weight for u in updates], dtype=torch.float64)  # (n,)
        b = _stack_buffers(updates) if with_buffers else None  # (n, d_b) or None
        p, rule = self.params, self.rule
        buf: Tensor | None = None
        if self._foolsgold is not None:
            agg = self._foolsgold(x, client_ids=[u.client_id for u in updates], weights=w)
            alpha = self._foolsgold.last_weights  # (n,), normalised; all 0: no step
            if b is not None and alpha is not None and float(alpha.sum()) > 0:
                buf = (alpha.to(b.device) @ b.to(torch.float64)).to(b.dtype)
        elif rule == "centered_clipping":
            agg = centered_clipping(x, weights=w, center=self._center, **p)
            self._center = agg.detach().clone()
            buf = None if b is None else median(b)  # τ and the center are in delta units
        elif rule == "krum":
            i = _krum_selection(x, w, p["f"])
            agg = x[i].clone()
            buf = None if b is None else b[i].clone()
        elif rule == "multi_krum":
            keep, a = _multi_krum_selection(x, w, p["f"], p.get("m"))
            agg = (a @ x[keep].to(torch.float64) / a.sum()).to(x.dtype)
            if b is not None:
                a = a.to(b.device)
                buf = (a @ b[keep].to(torch.float64) / a.sum()).to(b.dtype)
        elif rule == "bulyan":
            selected = _bulyan_selection(x, w, p["f"])
            agg = _bulyan_combine(x.to(torch.float64)[selected], p["f"]).to(x.dtype)
            if b is not None:
                buf = _bulyan_combine(b.to(torch.float64)[selected], p["f"]).to(b.dtype)
        else:  # mean, median, trimmed_mean, geometric_median: the same rule on the buffers
            agg = AGGREGATORS[rule](x, weights=w, **p)
            buf = None if b is None else AGGREGATORS[rule](b, weights=w.to(b.device), **p)
        tensors = updates[0].with_flat(agg).tensors
        if not with_buffers:
            return tensors, None
        if b is None:
            return tensors, ()
        return tensors, None if buf is None else _cut(buf, updates[0].buffers)


def _stack_buffers(updates: Sequence[Update]) -> Tensor | None:
    """The updates' buffers as one (n, d_b) stack, or ``None`` when they carry none."""
    if not updates[0].buffers:
        return None
    shapes = [tuple(t.shape) for t in updates[0].buffers]
    if any([tuple(t.shape) for t in u.buffers] != shapes for u in updates):
        raise ValueError("every update must carry the same buffers (BatchNorm statistics)")
    return torch.stack([torch.cat([t.reshape(-1) for t in u.buffers]) for u in updates])


def _cut(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A flat (d_b,) vector cut into tensors shaped like ``like``."""
    parts = torch.split(flat, [t.numel() for t in like])
    return tuple(p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, like))


def make_aggregator(name: str, **params: Any) -> RobustAggregator:
    """The server hook for rule ``name`` with ``params`` (see :class:`RobustAggregator`)."""
    return RobustAggregator(name, **params)
