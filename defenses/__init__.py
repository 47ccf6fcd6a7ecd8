"""Countermeasures: the public skeleton the defenses plug into.

A defense is a small object with one call, composed in order, never a
subclass of the client (see ``DESIGN.md``):

* :class:`ClientDefense`: ``update -> update`` before it leaves the client
  (clipping, noise, pruning, quantisation);
* :class:`Aggregator`: ``updates -> aggregate`` at the server (robust rules);
* :class:`PostAggregation`: ``global parameters -> global parameters`` (CRFL).

They match the hooks of :class:`fl_core.server.Server`. The concrete defenses
arrive in later releases; :func:`compose` and :class:`Identity` are here now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from fl_core.types import Update

__all__ = ["Aggregator", "ClientDefense", "Identity", "PostAggregation", "compose"]


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
