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
statistics too (see :class:`RobustAggregator`). The rules themselves are in
:mod:`defenses.robust_rules`; they import from here too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fl_core.types import Update

from .foolsgold import FoolsGold, foolsgold_weights
from .robust_checks import _check_params
from .robust_rules import (
    _bulyan_combine,
    _bulyan_selection,
    _krum_selection,
    _multi_krum_selection,
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)

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
