"""What every poisoning client shares: the :class:`Adversary` base and the update math.

:class:`Adversary` delegates the client interface to the honest client it wraps and
is that client outside its :class:`~fl_core.schedule.Schedule`; the pure functions
give the updates of the Byzantine modes (FedMLSecurity, Han et al. 2023,
arXiv:2306.04959). The adversary kinds themselves and their wiring are in
:mod:`fl_core.adversaries`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .client import Client, float_buffers
from .schedule import Schedule
from .types import GroundTruth, Protocol, Update

__all__ = ["Adversary", "flip_update", "random_update", "zero_update"]

# --------------------------------------------------------------------------- pure update math


def zero_update(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """All-zero tensors of the same shapes (the ``zero`` Byzantine mode)."""
    return tuple(torch.zeros_like(t) for t in tensors)


def flip_update(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``−u``: a delta ``−Δ`` sends the model ``w_g + (w_g − w_l)``; a gradient turns to ``−g``."""
    return tuple(-t for t in tensors)


def random_update(
    global_params: Sequence[torch.Tensor], kind: str, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """The ``random`` Byzantine mode: a model (or gradient) drawn U[−1, 1) per coordinate.

    Args:
        global_params: ``w_g``, the global parameters as received.
        kind: ``"delta"``: returns ``w_rand − w_g`` so the model sent is
            ``w_rand``; ``"gradient"``: returns ``w_rand`` as the gradient.
        generator: a CPU generator; draws happen in parameter order.
    """
    out = []
    for w in global_params:
        r = torch.rand(w.shape, generator=generator, dtype=w.dtype) * 2 - 1  # U[−1, 1)
        r = r.to(w.device)
        out.append(r - w if kind == "delta" else r)
    return tuple(out)


# --------------------------------------------------------------------------- shared plumbing


class Adversary:
    """Base of the poisoning clients: the client interface delegated to ``self.client``.

    Honest outside ``self.schedule``: there the update comes from
    :attr:`honest`, which is ``self.client`` unless :meth:`with_honest` set
    another computation for the honest rounds (a training defense such as
    DP-SGD wrapping the same client). In the malicious rounds the attack is
    computed from ``self.client`` (and the adversary's own poisoned copies),
    never through that defense: a malicious client does not run the defense
    honestly, it sends its attack.
    """

    client: Any
    schedule: Schedule
    _honest: Any = None

    def __init__(self, client: Any, rounds: Schedule | tuple[int, int | None] | None) -> None:
        _check_client(client)
        self.client = client
        self.schedule = Schedule.of(rounds)

    @property
    def honest(self) -> Any:
        """What computes this client's updates outside its malicious rounds."""
        return self.client if self._honest is None else self._honest

    def with_honest(self, honest: Any) -> Adversary:
        """A copy of this adversary whose honest rounds go through ``honest``.

        ``honest`` is another client object for the same data and id (e.g.
        ``DPSGDClient(self.client)``); the malicious rounds are unchanged.
        This adversary is not modified.
        """
        _check_client(honest)
        if honest.client_id != self.client_id:
            raise ValueError(
                f"the honest computation is client {honest.client_id}'s; this adversary is "
                f"client {self.client_id}: wrap the same client"
            )
        twin = copy.copy(self)
        twin._honest = honest
        return twin

    @property
    def client_id(self) -> int:
        return self.client.client_id

    def __len__(self) -> int:
        return len(self.client)

    def protocol(self) -> Protocol:
        """The wrapped client's protocol: what the server sees is unchanged."""
        return self.client.protocol()

    def active(self, round: int) -> bool:
        """Whether the client misbehaves in ``round``."""
        return round in self.schedule

    def _kind(self) -> str:
        return "gradient" if self.protocol().algorithm == "fedsgd" else "delta"

    def _no_work(
        self, model: nn.Module, round: int, tensors: tuple[torch.Tensor, ...]
    ) -> tuple[Update, GroundTruth]:
        """An update computed without touching the data: protocol metadata, global
        buffers, and an empty ground truth (no sample was used)."""
        update = Update(
            tensors,
            self._kind(),
            num_samples=self.protocol().num_samples,
            client_id=self.client_id,
            round=round,
            buffers=tuple(b.detach().clone() for b in float_buffers(model)),
            weight=self.protocol().weight,
        )
        images, labels = _data(self.client)
        truth = GroundTruth(images[:0], labels[:0], self.client_id, round)
        return update, truth


def _check_client(client: Any) -> None:
    for attr in ("client_id", "protocol", "compute_update"):
        if not hasattr(client, attr):
            raise ValueError(f"the wrapped client has no {attr!r}: wrap an fl_core Client")


def _data(client: Any) -> tuple[torch.Tensor, torch.Tensor]:
    inner = client
    while not hasattr(inner, "images") and hasattr(inner, "client"):
        inner = inner.client
    if not hasattr(inner, "images"):
        raise ValueError("the wrapped client holds no images/labels: wrap an fl_core Client")
    return inner.images, inner.labels


def _plain(client: Any, who: str) -> Client:
    if not isinstance(client, Client):
        raise ValueError(
            f"{who} retrains on altered data and needs a plain fl_core Client; "
            f"got {type(client).__name__} (wrap the poisoned client instead)"
        )
    return client
