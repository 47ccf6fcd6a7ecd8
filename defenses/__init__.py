"""Countermeasures: the public skeleton the defenses plug into.

A defense is a small object with one call, composed in order, never a
subclass of the client (composition, as Flower's differential-privacy
wrappers wrap a strategy: adap/flower,
``src/py/flwr/server/strategy/dp_fixed_clipping.py``):

* :class:`ClientDefense`: ``update -> update`` before it leaves the client
  (clipping, noise, pruning, quantisation);
* :class:`Aggregator`: ``updates -> aggregate`` at the server (robust rules);
* :class:`PostAggregation`: ``global parameters -> global parameters`` (CRFL).

They match the hooks of :class:`fl_core.server.Server`. The concrete ones:

* :mod:`defenses.transforms`: :class:`Clip`, :class:`GaussianNoise`,
  :class:`LaplaceNoise`, :class:`Prune`, :class:`Quantize` (client side);
* :mod:`defenses.server_side`: :class:`NormDiffClip` (per-update clipping at
  the server) and :class:`WeakDP` (noise on the aggregate);
* :mod:`defenses.robust`: robust aggregation rules (median, trimmed mean,
  Krum, multi-Krum, geometric median, Bulyan, centered clipping, FoolsGold);
* :mod:`defenses.dpsgd`: DP-SGD clients through Opacus, with accounting;
* :mod:`defenses.crfl`: CRFL training and certification;
* :mod:`defenses.config`: defenses from a YAML/CLI list (:func:`build_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from fl_core.models import MODEL_CONVERTERS
from fl_core.types import Update

from .config import DEFENSES, DefensePlan, build_plan
from .crfl import CRFL, CertifyResult, ThreatModel, certified_accuracy, certified_radius, certify
from .robust import AGGREGATORS, FoolsGold, RobustAggregator, make_aggregator
from .server_side import NormDiffClip, WeakDP
from .transforms import Clip, GaussianNoise, LaplaceNoise, Prune, Quantize

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CRFL",
    "CertifyResult",
    "ClientDefense",
    "Clip",
    "DEFENSES",
    "DPSGDClient",
    "DefensePlan",
    "FoolsGold",
    "GaussianNoise",
    "Identity",
    "LaplaceNoise",
    "NormDiffClip",
    "PostAggregation",
    "Prune",
    "Quantize",
    "RobustAggregator",
    "ThreatModel",
    "WeakDP",
    "build_plan",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "compose",
    "dp_compatible",
    "make_aggregator",
    "privacy_report",
]


class ClientDefense(Protocol):
    """Transforms one client update before it leaves the client."""

    def __call__(self, update: Update, *, generator: torch.Generator) -> Update: ...


class Aggregator(Protocol):
    """Combines the round's updates into one aggregate (tensors in parameter order)."""

    def __call__(self, updates: Sequence[Update]) -> tuple[torch.Tensor, ...]: ...


class PostAggregation(Protocol):
    """Transforms the new global parameters after aggregation."""

    def __call__(
        self, parameters: Sequence[torch.Tensor], *, round: int, generator: torch.Generator
    ) -> Sequence[torch.Tensor]: ...


class Identity:
    """The disabled defense: returns the update unchanged (bit-identical)."""

    def __call__(self, update: Update, *, generator: torch.Generator) -> Update:
        return update


def compose(*defenses: ClientDefense) -> ClientDefense:
    """One client defense applying ``defenses`` in order."""

    def composed(update: Update, *, generator: torch.Generator) -> Update:
        for defense in defenses:
            update = defense(update, generator=generator)
        return update

    return composed


_LAZY = {
    "DPSGDClient": "dpsgd",
    "dp_compatible": "dpsgd",
    "privacy_report": "dpsgd",
}


def __getattr__(name: str):
    """Opacus-backed names load on first use (importing Opacus takes seconds)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _opacus_converter(model):
    """The ``opacus`` model converter, registered without importing Opacus up front."""
    from .dpsgd import _opacus_fix

    return _opacus_fix(model)


if "opacus" not in MODEL_CONVERTERS:
    MODEL_CONVERTERS.register("opacus")(_opacus_converter)
