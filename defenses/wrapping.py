"""What every client-side defense that wraps a client shares: the client interface.

A wrapper (:class:`defenses.dpsgd.DPSGDClient`, :class:`defenses.inspection.InspectingClient`)
holds a :class:`~fl_core.client.Client` in ``self.client`` and replaces only its
``compute_update``; the server reads everything else (``client_id``, the data, the
training settings, the protocol) through these delegations.
"""

from __future__ import annotations

import torch

from fl_core.client import LocalTraining
from fl_core.types import Protocol

__all__ = ["WrappedClient"]


class WrappedClient:
    """The client interface of ``self.client``, for a wrapper to inherit."""

    client: object

    @property
    def client_id(self) -> int:
        return self.client.client_id

    @property
    def images(self) -> torch.Tensor:
        return self.client.images

    @property
    def labels(self) -> torch.Tensor:
        return self.client.labels

    @property
    def training(self) -> LocalTraining:
        return self.client.training

    def __len__(self) -> int:
        return len(self.client)

    def protocol(self) -> Protocol:
        """The wrapped client's protocol (for DP-SGD, ``batch_size`` is the expected
        Poisson batch size: the plain client's)."""
        return self.client.protocol()
