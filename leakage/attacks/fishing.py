"""Class fishing (Wen, Geiping, Fowl, Goldblum, Goldstein, "Fishing for User
Data in Large-Batch Federated Learning via Gradient Magnification", ICML 2022):
a malicious server against aggregates.

Threat model: the server is malicious and may see only the (secure) aggregate
of many clients' updates. It sends the global model with its last layer set so
that every class but the target one is certain
(:class:`fl_core.malicious.ClassFishing`): an image of another class then
sends back almost no gradient into the network, and the aggregate is the
gradient of the target class's images alone, scaled by their share of the
aggregate. The target bias's gradient counts them (−m/N for m target-class
images among N). When the targeted client's image is the only one of its
class, the aggregate is that image's gradient, and the first layer's closed
form of :mod:`.analytic` returns it exactly (victims whose first layer is
fully connected: ``mlp``). With m > 1, the first layer's rows are mixtures of
the m images, and a ReLU row active for one of them alone gives that one
exactly; the m largest clusters of agreeing rows are returned (the analytic
attack's batch step), among them the targeted client's. Which of the m belongs
to which client the gradient does not say.

The reconstruction is the m fished images followed by mid-grey placeholders
up to the aggregate's batch size (so the scores pair the fished images with
their closest originals); its labels are the target class throughout.

Not built: feature fishing (the paper's way to separate several images of
the target class over further rounds, needed where the first layer does not
separate them: sigmoid victims, or many target-class images) and the
optimisation attack for convolutional front-ends. Out of scope (a clear
error before any work): an observation from an honest server or without
fishing; a victim whose first layer is not fully connected; a FedAvg update
of more than one local step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_core.malicious import ClassFishing, last_linear
from fl_core.types import Observation

from ..labels import update_as_gradient
from .analytic import first_linear_layer, invert_linear
from .base import ATTACKS, Reconstruction, padded, sent_modification

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
        settings = sent_modification(obs, "fishing")
        built = spec.build()
        w_idx, b_idx = first_linear_layer(built, spec.in_shape)
        weight, bias = update_as_gradient(obs, w_idx), update_as_gradient(obs, b_idx)
        n = obs.protocol.num_samples
        target = int(settings["target"])
        if not bias.abs().max() > 0:  # nothing came back (a client that abstained)
            blank = padded(weight.new_zeros(0, 1), n, spec.in_shape)
            return Reconstruction(blank, torch.full((n,), target), math.nan, candidates=0)
        count = self.target_count(obs, built, target)
        x, spread = invert_linear(weight, bias, count)
        mean, std = spec.mean_std
        images = padded(x.double().view(count, *spec.in_shape) * std + mean, n, spec.in_shape)
        finite = spread[torch.isfinite(spread)]
        residual = float(finite.mean()) if len(finite) else math.nan
        return Reconstruction(
            images=images,
            labels=torch.full((n,), target, dtype=torch.int64),
            loss=residual,
            restart_losses=[residual],
            stopped="closed-form",
            options={"target": target, "target_images": count, "residual": residual},
            candidates=count,
        )

    @staticmethod
    def target_count(obs: Observation, model, target: int) -> int:
        """How many images of the target class the aggregate holds: with every other
        class certain, the target bias's gradient is −m/N for m such images of N
        (FedSGD means weighted by the clients' sample counts)."""
        layer = last_linear(model)
        ids = {id(p): i for i, p in enumerate(model.parameters())}
        grad = update_as_gradient(obs, ids[id(layer.bias)])[target]
        m = round(-float(grad) * obs.protocol.num_samples)
        return min(max(m, 1), obs.protocol.num_samples)


ATTACKS.register("fishing")(Fishing)
