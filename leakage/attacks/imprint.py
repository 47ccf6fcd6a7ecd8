"""Robbing the Fed's imprint attack (Fowl et al., ICLR 2022): a malicious server.

Threat model: the server is malicious. It sends the clients the global model
behind an imprint block (:class:`fl_core.malicious.Imprint`): k rows that all
measure the input the same way, m(x) = ⟨w, x⟩, row i firing when m(x) > t_i.
The clients train it as usual. For a FedSGD batch the gradient of row i is

    ∂L/∂W_i = Σ_{n: m(x_n) > t_i} c_n · x_n,    ∂L/∂b_i = Σ_{n: m(x_n) > t_i} c_n,

with c_n the same for every row an image fires (the block's way back to the
input has equal columns). Rows i and i+1 differ by the images whose
measurement lies in [t_i, t_{i+1}); when there is exactly one,

    x = (∂L/∂W_i − ∂L/∂W_{i+1}) / (∂L/∂b_i − ∂L/∂b_{i+1})

is that image, exactly (the last row stands alone). A bin holding two or more
images gives a weighted mean of them, which the scores count as a failure.

:meth:`Imprint.reconstruct` returns one candidate per non-empty bin, padded
with mid-grey images to the batch size when fewer bins fired than images were
sent (the scores then pair every original with a candidate or a blank).
:meth:`Imprint.modification` is what the server must send, given the public
reference images it sets its bins on; ``leakage attack --attack imprint``
does both sides. Out of scope (a clear error before any work): an observation
from an honest server or without an imprint block; a FedAvg update of more
than one local step (the rows then mix iterates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_core.malicious import SPREAD, check_imprint_settings, expected_imprint_recovery
from fl_core.malicious import Imprint as ImprintServer
from fl_core.types import Observation

from .base import ATTACKS, Reconstruction, block_gradients, padded, sent_modification
from .matching import attack_labels

__all__ = ["Imprint", "invert_imprint"]


def invert_imprint(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    *,
    limit: int | None = None,
    tol: float = 1e-4,
    measure: torch.Tensor | None = None,
    thresholds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate per bin that some image fell into.

    Args:
        weight_grad: (k, d) gradient of the block's measuring rows.
        bias_grad: (k,) gradient of their biases.
        limit: at most this many candidates (the batch size), those of the
            largest weight differences.
        tol: a bin is empty when its weight difference's norm is at most
            ``tol`` times the largest (rows with the same images may still
            differ by float rounding: the kernels sum them in different orders).
        measure, thresholds: the block's measurement w (d,) and thresholds t
            (k,), which the server that sent it knows. With them, a candidate
            whose measurement falls outside its bin (the bias difference was
            swamped, e.g. by the client's noise) is read instead as the weight
            difference rescaled to the bin's central measurement: not exact,
            but the image's pattern wherever the weight gradient still carries it.

    Returns:
        ``(candidates, bins)``: (R, d) float64 inputs and the (R,) bin index of each.
    """
    w, b = weight_grad.double(), bias_grad.double()
    dw = w - torch.cat([w[1:], torch.zeros_like(w[:1])])
    db = b - torch.cat([b[1:], torch.zeros_like(b[:1])])
    size = dw.norm(dim=1)
    bins = torch.nonzero(size > tol * float(size.max())).flatten()
    if limit is not None and len(bins) > limit:
        bins = bins[size[bins].topk(limit).indices].sort().values
    x = dw[bins] / db[bins, None]
    if measure is None or thresholds is None:
        return x, bins
    v, t = measure.double(), thresholds.double()
    upper = torch.cat([t[1:], (2 * t[-1] - t[-2]).reshape(1)])  # the top bin's guessed end
    m = x @ v
    width = (upper - t)[bins]
    top = bins == len(t) - 1  # the top bin is open above
    consistent = (m >= t[bins] - 1e-3 * width) & ((m <= upper[bins] + 1e-3 * width) | top)
    centre = ((t + upper) / 2)[bins]
    scaled = dw[bins] * (centre / (dw[bins] @ v))[:, None]
    return torch.where(consistent[:, None], x, scaled), bins


@dataclass(frozen=True)
class Imprint:
    """The imprint attack; also says which modified model the server sends.

    Args:
        bins: rows of the imprint block (k).
        measurement: ``"mean"`` brightness or a ``"random"`` direction
            (:data:`fl_core.malicious.MEASUREMENTS`).
        binning: ``"empirical"`` or ``"gaussian"`` quantiles of the reference
            images' measurements (:data:`fl_core.malicious.BINNINGS`).
        label_strategy: label recovery of :mod:`leakage.labels` (labels are
            not part of the closed form).
        spread: the block's weight back to the input, the server's choice
            (:data:`fl_core.malicious.SPREAD`; larger lifts the block's
            gradients above the clients' noise).
    """

    bins: int = 128
    measurement: str = "mean"
    binning: str = "empirical"
    label_strategy: str = "auto"
    spread: float = SPREAD

    def __post_init__(self) -> None:
        check_imprint_settings(self.bins, self.measurement, self.binning, self.spread)
        if self.label_strategy == "joint":
            raise ValueError("the imprint attack reads labels with a strategy, not 'joint'")

    def modification(self, reference: torch.Tensor) -> ImprintServer:
        """The server's side: the imprint block it sends, bins set on ``reference``."""
        return ImprintServer(
            bins=self.bins,
            measurement=self.measurement,
            binning=self.binning,
            reference=reference,
            spread=self.spread,
        )

    def expected_recovery(self, batch: int) -> float:
        """The closed-form expected recovered share (:func:`expected_imprint_recovery`)."""
        return expected_imprint_recovery(self.bins, batch)

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The images alone in their bins, read off the imprint rows' gradients."""
        spec = obs.model_spec
        settings = sent_modification(obs, "imprint")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        n = obs.protocol.num_samples
        k = settings["bins"]
        weight, bias = block_gradients(obs, k, "imprint")
        sent = obs.parameters  # the server's own block: measurement and thresholds
        x, bins = invert_imprint(weight, bias, limit=n, measure=sent[0][0], thresholds=-sent[1])
        found = len(bins)
        images = padded(x, n, spec.in_shape)  # fewer non-empty bins than images: blanks
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        return Reconstruction(
            images=images,
            labels=labels,
            loss=math.nan,
            stopped="closed-form",
            options={
                "bins": k,
                "nonempty_bins": found,
                "expected_recovery": self.expected_recovery(n),
            },
            candidates=found,
        )


ATTACKS.register("imprint")(Imprint)
