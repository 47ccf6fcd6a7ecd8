"""Trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot,
"When the Curious Abandon Honesty: Federated Learning Is Not Private",
EuroS&P 2023): a malicious server.

Threat model: the server is malicious. It sends the global model behind a
block of many rarely active rows (:class:`fl_core.malicious.TrapWeights`);
the clients train it as usual. For a FedSGD batch, row i's gradients are

    ∂L/∂W_i = Σ_{n fires i} c_{n,i} · x_n,    ∂L/∂b_i = Σ_{n fires i} c_{n,i},

so a row fired by one image alone gives that image as the ratio of the two,
exactly. Which rows those are is not known, but it can be read off the
gradient: the way back to the input differs from row to row, so a row fired
by several images gives a mixture with row-specific weights, while every row
an image fires alone gives the same image. Candidates that agree across two
or more rows (to ``agree`` root-mean-square, 1e-3 by default: 60 dB) are
taken as exact images; the rest of the batch is filled with the single-row
candidates that lie in the pixel box, then with mid-grey images.

Out of scope (a clear error before any work): an observation from an honest
server or without a trap block; a FedAvg update of more than one local step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_core.malicious import SPREAD, TrapWeights, check_trap_settings
from fl_core.types import Observation

from .base import ATTACKS, Reconstruction, block_gradients, padded, sent_modification
from .matching import attack_labels

__all__ = ["Trap", "invert_trap"]


def _components(adjacent: torch.Tensor) -> torch.Tensor:
    """Connected-component label of each node of a symmetric boolean adjacency matrix."""
    label = torch.arange(len(adjacent))
    while True:  # each node takes the smallest label among its neighbours, until stable
        masked = torch.where(adjacent, label[None, :], len(adjacent))
        new = torch.minimum(label, masked.min(dim=1).values)
        new = new[new]  # jump to the label's own label: logarithmic rounds
        if torch.equal(new, label):
            return label
        label = new


def invert_trap(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    *,
    limit: int | None = None,
    tol: float = 1e-6,
    agree: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a trap block's gradient that some rows give alone.

    Args:
        weight_grad: (R, d) gradient of the block's rows.
        bias_grad: (R,) gradient of their biases.
        limit: at most this many images (the batch size), the most confirmed first.
        tol: a row is silent when its bias gradient is at most ``tol`` times the
            largest one.
        agree: candidates of two rows are the same image when their
            root-mean-square difference is below this.

    Returns:
        ``(images, support)``: (M, d) float64 images, most confirmed first, and
        the (M,) number of rows that gave each (1: unconfirmed).
    """
    w, b = weight_grad.double(), bias_grad.double()
    active = torch.nonzero(b.abs() > tol * float(b.abs().max())).flatten()
    if len(active) == 0:
        return w.new_zeros(0, w.shape[1]), torch.zeros(0, dtype=torch.int64)
    cand = w[active] / b[active, None]
    rms = torch.cdist(cand, cand) / math.sqrt(cand.shape[1])
    label = _components(rms < agree)
    groups, support = torch.unique(label, return_counts=True)
    images = torch.stack([cand[label == g].mean(0) for g in groups])
    # confirmed images first (most rows), then single-row candidates inside the pixel box
    outside = (images.clamp(0, 1) - images).abs().amax(dim=1)
    key = torch.where(support > 1, -support.double(), outside)
    order = torch.argsort(key, stable=True)
    if limit is not None:
        order = order[:limit]
    return images[order], support[order]


@dataclass(frozen=True)
class Trap:
    """The trap-weights attack; also says which modified model the server sends.

    Args:
        bins: rows of the trap block.
        rate: share of inputs each row lets through (best near 1/batch size).
        agree: root-mean-square agreement that confirms an image (see :func:`invert_trap`).
        label_strategy: label recovery of :mod:`leakage.labels`.
        spread: the block's weight back to the input, the server's choice
            (:data:`fl_core.malicious.SPREAD`).
    """

    bins: int = 1024
    rate: float = 1 / 64
    agree: float = 1e-3
    label_strategy: str = "auto"
    spread: float = SPREAD

    def __post_init__(self) -> None:
        check_trap_settings(self.bins, self.rate, self.spread)
        if not self.agree > 0:
            raise ValueError(f"trap agree must be positive; got {self.agree!r}")
        if self.label_strategy == "joint":
            raise ValueError("the trap attack reads labels with a strategy, not 'joint'")

    def modification(self, reference: torch.Tensor) -> TrapWeights:
        """The server's side: the trap block it sends, rows set on ``reference``."""
        return TrapWeights(bins=self.bins, rate=self.rate, reference=reference, spread=self.spread)

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The images some trap rows give alone, confirmed ones first."""
        spec = obs.model_spec
        settings = sent_modification(obs, "trap")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        n = obs.protocol.num_samples
        k = settings["bins"]
        weight, bias = block_gradients(obs, k, "trap")
        x, support = invert_trap(weight, bias, limit=n, agree=self.agree)
        found = len(x)
        images = padded(x, n, spec.in_shape)
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        return Reconstruction(
            images=images,
            labels=labels,
            loss=math.nan,
            stopped="closed-form",
            options={
                "bins": k,
                "active_rows": int((bias.abs() > 0).sum()),
                "confirmed": int((support > 1).sum()),
            },
            candidates=found,
        )


ATTACKS.register("trap")(Trap)
