"""Server-side defenses: per-update norm clipping before aggregation, noise after it.

* :class:`NormDiffClip` wraps an aggregator: every received update (the
  difference between a client's model and the global model, or its gradient)
  is clipped to an L2 norm bound before the inner aggregator combines them
  (norm-difference clipping, Sun et al. 2019, "Can you really backdoor
  federated learning?").
* :class:`WeakDP` runs after aggregation and adds N(0, σ²) to every parameter
  of the new global model ("weak differential privacy", same paper).

Both act at the server, after it has seen each update: they limit what a
malicious client can do to the model, not what a curious server learns. Only
client-side noise (local DP, e.g. DP-SGD on the client, Abadi et al. 2016) or
secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS) protects against a server-side
attacker; noise after aggregation, as here and in Flower's server-side DP
wrappers (adap/flower, ``src/py/flwr/server/strategy/dp_fixed_clipping.py``),
comes after the server has seen each clean update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fl_core.server import aggregate_with_buffers, fedavg
from fl_core.types import Update

from .crfl import add_gaussian_noise
from .transforms import Clip

__all__ = ["NormDiffClip", "WeakDP"]


@dataclass(frozen=True)
class NormDiffClip:
    """Clip each update to ``max_norm`` at the server, then aggregate with ``aggregator``.

    Attributes:
        max_norm: the L2 bound on each update (``inf``: the inner aggregator alone).
        aggregator: the rule applied to the clipped updates (default FedAvg).
    """

    max_norm: float
    aggregator: Callable[[Sequence[Update]], tuple[torch.Tensor, ...]] = field(default=fedavg)

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"norm_diff_clip max_norm must be positive; got {self.max_norm}")

    def __call__(self, updates: Sequence[Update]) -> tuple[torch.Tensor, ...]:
        clip = Clip(self.max_norm)
        return self.aggregator([clip(u) for u in updates])

    def aggregate_with_buffers(
        self, updates: Sequence[Update]
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """The clipped updates and their buffers under the inner aggregator (clipping
        leaves the buffers as they are; a robust inner rule still governs them)."""
        clip = Clip(self.max_norm)
        return aggregate_with_buffers(self.aggregator, [clip(u) for u in updates])


@dataclass(frozen=True)
class WeakDP:
    """Adds N(0, σ²) to every parameter of the aggregated global model.

    Attributes:
        sigma: the standard deviation (0 disables: parameters returned unchanged).
    """

    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"weak_dp sigma must be finite and non-negative; got {self.sigma}")

    def __call__(
        self, parameters: Sequence[torch.Tensor], *, round: int, generator: torch.Generator
    ) -> Sequence[torch.Tensor]:
        if self.sigma == 0:
            return parameters
        return add_gaussian_noise(parameters, self.sigma, generator=generator)
