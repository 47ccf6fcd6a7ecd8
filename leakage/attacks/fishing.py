"""Class fishing (Wen, Geiping, Fowl, Goldblum, Goldstein, "Fishing for User
Data in Large-Batch Federated Learning via Gradient Magnification", ICML 2022):
a malicious server against aggregates.

Threat model: the server is malicious and may see only the (secure) aggregate
of many clients' updates. It sends the global model with its last layer set so
that every class but the target one is certain
(:class:`fl_core.malicious.ClassFishing`): an image of another class then
sends back almost no gradient into the network, and the aggregate is the
gradient of the target class's images alone, scaled by their share of the
aggregate. When one image of the target class was in the round (the targeted
client's), the aggregate is that image's gradient, and a single-image attack
recovers it; here the first layer's closed form of :mod:`.analytic`, which
is exact for victims whose first layer is fully connected (``mlp``).

The reconstruction is the fished image followed by mid-grey placeholders up
to the aggregate's batch size (so the scores pair the fished image with its
closest original); its labels are the target class throughout.

Not built: feature fishing (the paper's second step, which separates several
images of the target class over further rounds) and the optimisation attack
for convolutional front-ends; several images of the target class give their
mixture. Out of scope (a clear error before any work): an observation from an
honest server or without fishing; a victim whose first layer is not fully
connected; a FedAvg update of more than one local step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_core.malicious import ClassFishing
from fl_core.types import Observation

from ..labels import update_as_gradient
from .analytic import first_linear_layer, invert_linear
from .base import ATTACKS, Reconstruction

__all__ = ["Fishing"]


@dataclass(frozen=True)
class Fishing:
    """Class fishing against an aggregate, then the first layer's closed form.

    Args:
        target: the class the server fishes for (``leakage attack`` sets it to
            the label of the targeted client's first image unless
            ``--target-class`` says otherwise).
        margin: logits by which the other classes are made certain.
    """

    target: int = 0
    margin: float = 30.0

    def __post_init__(self) -> None:
        if not (isinstance(self.target, int) and self.target >= 0):
            raise ValueError(f"fishing target must be a class index; got {self.target!r}")
        if not self.margin > 0:
            raise ValueError(f"fishing margin must be positive; got {self.margin!r}")

    def modification(self, reference: torch.Tensor) -> ClassFishing:
        """The server's side: the fished model it sends."""
        return ClassFishing(target=self.target, margin=self.margin, reference=reference)

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The target class's image, read off the fished aggregate's first layer."""
        spec = obs.model_spec
        settings = dict(spec.modification)
        if obs.protocol.server != "malicious" or settings.get("name") != "fishing":
            raise ValueError(
                "the fishing attack needs a malicious server that sent a fished model; this "
                "observation's model is not one (leakage attack --attack fishing sends it)"
            )
        if obs.protocol.local_steps > 1:
            raise ValueError(
                "the fishing attack reads one gradient; this update took "
                f"{obs.protocol.local_steps} local steps (use FedSGD or one local step)"
            )
        w_idx, b_idx = first_linear_layer(spec.build(), spec.in_shape)
        weight, bias = update_as_gradient(obs, w_idx), update_as_gradient(obs, b_idx)
        n = obs.protocol.num_samples
        target = int(settings["target"])
        images = torch.full((n, *spec.in_shape), 0.5)
        if not bias.abs().max() > 0:  # nothing came back (a client that abstained)
            return Reconstruction(images, torch.full((n,), target), math.nan, candidates=0)
        x, spread = invert_linear(weight, bias, 1)
        mean, std = spec.mean_std
        images[0] = (x.double().view(*spec.in_shape) * std + mean).float().clamp(0, 1)
        residual = float(spread[0])
        return Reconstruction(
            images=images,
            labels=torch.full((n,), target, dtype=torch.int64),
            loss=residual,
            restart_losses=[residual],
            stopped="closed-form",
            options={"target": target, "residual": residual},
            candidates=1,
        )


ATTACKS.register("fishing")(Fishing)
