"""Model inspection: a client that checks the model it received before training it.

The malicious-server attacks (:mod:`fl_core.malicious`) send a model built to
leak. A client can look before it computes: a model that is not the agreed
architecture, or whose weights no training run would produce, is refused; the
client then abstains (its update is all zeros, so the server learns nothing
from it). The checks, each cheap and on the client's side only:

* ``architecture``: the parameters (names and shapes) differ from those of the
  architecture the federation agreed on (the victim as registered; an
  imprint or trap block adds rows in front of it);
* ``duplicate_rows``: a weight matrix many of whose rows are the same vector
  (an imprint block measures one quantity in every row);
* ``dead_classes``: an output layer with zero rows whose bias stands far above
  the others' (class fishing makes every class but one certain);
* ``rare_units``: a first fully connected ReLU layer most of whose units fire
  for at most one of the client's own images (trap weights).

The last three look for the attacks inside the agreed architecture, where an
adaptive server would hide them; each has a threshold, and what a server that
knows the thresholds can do about them is the benchmark's note
(``benchmarks/malicious_server.py``): spread the imprint rows by small random
jitter, fish with a mild bias margin, or set trap rates just above the bar,
each at a cost in what the attack recovers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from fl_core.client import Client
from fl_core.types import GroundTruth, Update

from .wrapping import WrappedClient

__all__ = ["CHECKS", "InspectingClient", "inspect_model"]

CHECKS = ("architecture", "duplicate_rows", "dead_classes", "rare_units")


@functools.lru_cache(maxsize=32)
def _shapes_of(spec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameter names and shapes of the architecture ``spec`` names (built once per spec)."""
    return tuple((n, tuple(p.shape)) for n, p in spec.build().named_parameters())


def _agreed_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return dict(_shapes_of(dataclasses.replace(model.spec, modification=())))


def _duplicate_rows(weight: torch.Tensor, *, share: float) -> bool:
    """Whether more than ``share`` of the rows (of a matrix with >= 8 rows) repeat another."""
    w = weight.detach().flatten(1).double()
    w = w[w.norm(dim=1) > 0]  # zero rows are dead_classes' concern
    if len(w) < 8 or w.shape[1] < 2:
        return False
    scale = w.norm(dim=1)
    dist = torch.cdist(w, w) / scale[:, None]
    dist.fill_diagonal_(float("inf"))
    return float((dist.min(dim=1).values < 1e-6).double().mean()) > share


def _dead_classes(layer: nn.Linear) -> bool:
    """Zero rows of the output layer whose bias is far above the live rows' biases."""
    w, b = layer.weight.detach(), layer.bias.detach()
    dead = w.norm(dim=1) <= 1e-8 * max(float(w.norm(dim=1).max()), 1e-30)
    if not dead.any() or dead.all():
        return False
    live = b[~dead]
    spread = float(live.abs().max()) + float(w[~dead].norm(dim=1).max()) * 10
    return float(b[dead].min()) > float(live.max()) + spread


def _rare_units(model: nn.Module, images: torch.Tensor, *, share: float) -> bool:
    """Whether most units of the first linear layer fire for at most one of ``images``."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear) or len(images) < 4:
        return False
    x = images.flatten(1).to(first.weight)
    if first.in_features != x.shape[1]:
        return False
    with torch.no_grad():
        fires = (first(x) > 0).sum(dim=0)
    return float((fires <= 1).double().mean()) > share


def inspect_model(
    model: nn.Module,
    images: torch.Tensor | None = None,
    *,
    checks: tuple[str, ...] = CHECKS,
    duplicate_share: float = 0.25,
    rare_share: float = 0.5,
) -> list[str]:
    """The checks ``model`` fails (empty: it looks like an honest global model).

    Args:
        model: the model the client received (built by ``fl_core``: it has a spec).
        images: the client's own images, for ``rare_units`` (skipped without them).
        checks: which of :data:`CHECKS` to run.
        duplicate_share: ``duplicate_rows`` fails above this share of repeated rows.
        rare_share: ``rare_units`` fails above this share of units firing for <= 1 image.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(
            f"unknown inspection check(s) {', '.join(unknown)}; valid: {', '.join(CHECKS)}"
        )
    failed = []
    if "architecture" in checks:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if shapes != _agreed_shapes(model):
            failed.append("architecture")
    if "duplicate_rows" in checks:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if any(_duplicate_rows(m.weight, share=duplicate_share) for m in layers):
            failed.append("duplicate_rows")
    if "dead_classes" in checks:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if layers and layers[-1].bias is not None and _dead_classes(layers[-1]):
            failed.append("dead_classes")
    if "rare_units" in checks and images is not None:
        if _rare_units(model, images, share=rare_share):
            failed.append("rare_units")
    return failed


@dataclass
class InspectingClient(WrappedClient):
    """A client that inspects the received model and abstains when it fails a check.

    A wrapper (like :class:`defenses.dpsgd.DPSGDClient`): the server uses it as a
    client. On a refused model the update is all zeros with the plain client's
    metadata (the server sees that nothing came); the ground truth stays the
    client's images, what an attack on the round is scored against. Every
    refusal is kept in :attr:`refusals` as ``(round, checks)``.
    """

    client: Client
    checks: tuple[str, ...] = CHECKS
    refusals: list[tuple[int, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.checks) - set(CHECKS))
        if unknown:
            raise ValueError(
                f"unknown inspection check(s) {', '.join(unknown)}; valid: {', '.join(CHECKS)}"
            )

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        failed = inspect_model(model, self.client.images, checks=self.checks)
        if not failed:
            return self.client.compute_update(model, round=round, generator=generator)
        self.refusals.append((round, failed))
        update, truth = self.client.compute_update(model, round=round, generator=generator)
        zeros = tuple(torch.zeros_like(t) for t in update.tensors)
        return dataclasses.replace(update, tensors=zeros), truth
