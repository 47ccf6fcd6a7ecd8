"""The malicious server: a model sent to make the clients' updates leak.

An honest-but-curious server sends the true global model and only studies the
updates it receives. A *malicious* server may send any model it likes (it
controls the architecture and the weights it broadcasts), but it cannot touch
the clients' computation: they train the model they received as they would
the true one, apply their own defenses (clipping, noise, DP-SGD) and may send
their updates through secure aggregation. That is the boundary this module
keeps: a modification is a server-side function ``model -> model`` given to
:class:`~fl_core.server.Server` (``modification=``); the round's observations
say ``server="malicious"`` (:class:`~fl_core.types.Protocol`) and carry the
sent model's :class:`~fl_core.models.ModelSpec`, whose ``modification`` entry
names the change when it alters the architecture.

Modifications:

* :class:`Imprint` (Fowl et al., "Robbing the Fed", ICLR 2022): an imprint
  block in front of the victim. Its k rows all take one linear measurement of
  the input, m(x) = ⟨w, x⟩ (mean brightness, or a random direction), and row i
  fires when m(x) exceeds the threshold t_i (its bias is −t_i); the thresholds
  are quantiles of the measurement's distribution, which the server estimates
  on public images. An image alone between t_i and t_{i+1} is the ratio of the
  differences of the gradients of rows i and i+1 (weights over bias), exactly;
  :func:`expected_imprint_recovery` is the expected share of such images.
* :class:`TrapWeights` (Boenisch et al., "When the Curious Abandon Honesty",
  EuroS&P 2023): many rows, each a random direction with a bias that lets
  only a small share of inputs through, so that many rows are fired by one
  image of the batch alone; each such row's weight gradient over its bias
  gradient is that image. The paper makes rows rarely active without data, by
  scaling down the positive part of random weights; here each row's bias is
  set at a quantile of its response on the server's reference images (the
  same public data imprint uses), which sets the firing rate directly.
* :class:`ClassFishing` (Wen, Geiping, Fowl, Goldblum, Goldstein, "Fishing
  for User Data in Large-Batch Federated Learning via Gradient
  Magnification", ICML 2022): the architecture is unchanged, but the last
  layer is set so that the model is sure, with a tiny loss gradient, of every
  class but the target one: rows of the other classes get weight 0 and a bias
  far above any logit of the target class. An image of another class then
  sends back (almost exactly) no gradient into the network, an image of the
  target class its full gradient, so even the secure aggregate of many
  clients is the gradient of the target class's images alone.

The block here adds its output to the input (a residual: ``x + V·relu(Wx + b)``
with V's columns equal and tiny), so the victim behind it sees its usual input
and keeps its accuracy; the paper's block maps back to the input size with a
linear layer as well. Equal columns of V give every row of an image the same
downstream gradient, which is what makes the differences exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import nn

from .models import MODEL_MODIFICATIONS

__all__ = [
    "BINNINGS",
    "ClassFishing",
    "Imprint",
    "ImprintBlock",
    "Imprinted",
    "MEASUREMENTS",
    "SPREAD",
    "TrapWeights",
    "check_imprint_settings",
    "check_trap_settings",
    "expected_imprint_recovery",
    "imprint_thresholds",
    "last_linear",
]

MEASUREMENTS = ("mean", "random")
"""The imprint rows' measurement: mean brightness (the paper's default) or a random direction."""
BINNINGS = ("empirical", "gaussian")
"""Where the thresholds come from: empirical quantiles of the reference images'
measurements, or the quantiles of a normal distribution fitted to them."""
SPREAD = 1e-3
"""Default weight with which the block's output is added back to the input (per
pixel, summed over rows): small, so the victim's forward pass barely changes.
The block's gradients scale with it; a server facing noisy clients may raise
it (``spread=``) to lift them above the noise, at the cost of perturbing what
the victim sees."""


class ImprintBlock(nn.Module):
    """``x -> x + V·relu(W·flatten(x) + b)``, reshaped to ``x``'s shape.

    ``measure`` is W (bins, d) and b (bins,); ``spread`` is V (d, bins), no bias.
    Built with zero weights: the server sets them (:class:`Imprint`).
    """

    def __init__(self, in_shape: tuple[int, int, int], bins: int) -> None:
        super().__init__()
        d = math.prod(in_shape)
        with torch.device("meta"):
            self.measure = nn.Linear(d, bins)
            self.spread = nn.Linear(bins, d, bias=False)
        self.to_empty(device="cpu")
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.measure(x.flatten(1)))
        return x + self.spread(h).view_as(x)


class Imprinted(nn.Module):
    """The victim ``body`` behind an :class:`ImprintBlock` (its parameters first);
    ``kind`` names the modification in the spec (``"imprint"`` or ``"trap"``)."""

    def __init__(self, body: nn.Module, bins: int, kind: str = "imprint") -> None:
        super().__init__()
        if not hasattr(body, "spec"):
            raise ValueError("imprint needs a victim built by fl_core.build_model (it has no spec)")
        if isinstance(body, Imprinted) or body.spec.modification:
            raise ValueError("the victim is already modified; imprint the original one")
        if not (isinstance(bins, int) and bins >= 2):
            raise ValueError(f"imprint bins must be an integer >= 2; got {bins!r}")
        self.imprint = ImprintBlock(body.spec.in_shape, bins)
        self.body = body
        self.spec = dataclasses.replace(body.spec, modification=(("bins", bins), ("name", kind)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.imprint(x))


MODEL_MODIFICATIONS.register("imprint")(Imprinted)


@MODEL_MODIFICATIONS.register("trap")
def _trapped(body: nn.Module, bins: int) -> Imprinted:
    return Imprinted(body, bins, kind="trap")


def imprint_thresholds(
    measurements: torch.Tensor, bins: int, *, binning: str = "empirical", lowest: float
) -> torch.Tensor:
    """The k thresholds t_0 < … < t_{k−1}: t_0 = ``lowest`` (every image fires row 0),
    t_i the i/k quantile of the measurement's distribution.

    Args:
        measurements: (N,) the measurement of N reference images, N >= 2.
        bins: k.
        binning: ``"empirical"`` (quantiles of the N values) or ``"gaussian"``
            (of the normal distribution with their mean and standard deviation).
        lowest: a value below every possible measurement.

    Returns:
        (k,) float64, increasing.
    """
    if binning not in BINNINGS:
        raise ValueError(f"unknown imprint binning {binning!r}; valid: {', '.join(BINNINGS)}")
    m = measurements.detach().double().flatten()
    if m.numel() < 2:
        raise ValueError("imprint binning needs at least 2 reference images")
    levels = torch.arange(1, bins, dtype=torch.float64) / bins
    if binning == "empirical":
        inner = torch.quantile(m, levels)
    else:
        normal = NormalDist(float(m.mean()), max(float(m.std()), 1e-12))
        inner = torch.tensor([normal.inv_cdf(float(q)) for q in levels], dtype=torch.float64)
    t = torch.cat([torch.tensor([lowest], dtype=torch.float64), inner])
    return torch.cummax(t, 0).values  # ties of an empirical quantile stay ordered


@dataclass(frozen=True, eq=False)
class Imprint:
    """Robbing the Fed's server: an imprint block in front of the global model.

    Args:
        bins: rows of the block (k).
        measurement: ``"mean"`` brightness (w = 1/d) or ``"random"``: a unit
            direction drawn from the round's generator.
        binning: see :func:`imprint_thresholds`.
        reference: (N, C, H, W) public images in [0, 1] from the clients' data
            distribution (the server's prior knowledge), N >= 2; the thresholds
            are quantiles of their measurements.
        spread: the block's weight back to the input (see :data:`SPREAD`).

    Calling it (``Server(modification=Imprint(...))``) returns an
    :class:`Imprinted` copy of the global model with the block's weights set.
    """

    bins: int = 128
    measurement: str = "mean"
    binning: str = "empirical"
    reference: torch.Tensor | None = None
    spread: float = SPREAD

    def __post_init__(self) -> None:
        check_imprint_settings(self.bins, self.measurement, self.binning, self.spread)
        _check_reference(self.reference, "imprint")

    def direction(self, d: int, generator: torch.Generator) -> torch.Tensor:
        """The measurement w (d,), float64."""
        if self.measurement == "mean":
            return torch.full((d,), 1.0 / d, dtype=torch.float64)
        w = torch.randn(d, generator=generator, dtype=torch.float64)
        return w / w.norm()

    def __call__(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator | None = None
    ) -> Imprinted:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        sent = _imprinted_copy(model, self.bins, "imprint", self.reference)
        d = math.prod(model.spec.in_shape)
        w = self.direction(d, generator)
        m = self.reference.detach().double().flatten(1).cpu() @ w
        lowest = float(w.clamp(max=0).sum()) - 1e-3 * float(w.abs().sum())  # below any image
        t = imprint_thresholds(m, self.bins, binning=self.binning, lowest=lowest)
        block = sent.imprint
        with torch.no_grad():
            block.measure.weight.copy_(w.expand(self.bins, d))
            block.measure.bias.copy_(-t)
            span = max(float(t[-1] - t[1]) if self.bins > 2 else 1.0, 1e-12)
            block.spread.weight.fill_(self.spread / (self.bins * span))
        return sent


def check_imprint_settings(bins: int, measurement: str, binning: str, spread: float) -> None:
    """One-line errors for an imprint block's settings (the server's and the attack's)."""
    if not (isinstance(bins, int) and bins >= 2):
        raise ValueError(f"imprint bins must be an integer >= 2; got {bins!r}")
    if measurement not in MEASUREMENTS:
        raise ValueError(
            f"unknown imprint measurement {measurement!r}; valid: {', '.join(MEASUREMENTS)}"
        )
    if binning not in BINNINGS:
        raise ValueError(f"unknown imprint binning {binning!r}; valid: {', '.join(BINNINGS)}")
    if not spread > 0:
        raise ValueError(f"imprint spread must be positive; got {spread!r}")


def check_trap_settings(bins: int, rate: float, spread: float) -> None:
    """One-line errors for a trap block's settings (the server's and the attack's)."""
    if not (isinstance(bins, int) and bins >= 2):
        raise ValueError(f"trap bins must be an integer >= 2; got {bins!r}")
    if not 0 < rate < 1:
        raise ValueError(f"trap rate must lie in (0, 1); got {rate!r}")
    if not spread > 0:
        raise ValueError(f"trap spread must be positive; got {spread!r}")


def _check_reference(reference: torch.Tensor | None, what: str) -> None:
    if reference is None or reference.dim() != 4 or len(reference) < 2:
        raise ValueError(
            f"{what} needs reference images (N >= 2, shape (N, C, H, W)): the public "
            "data the server sets its rows on"
        )


def _imprinted_copy(model: nn.Module, bins: int, kind: str, reference: torch.Tensor) -> Imprinted:
    """An :class:`Imprinted` copy of ``model`` (same weights and mode), block weights zero."""
    spec = model.spec
    if tuple(reference.shape[1:]) != tuple(spec.in_shape):
        raise ValueError(
            f"{kind} reference images have shape {tuple(reference.shape[1:])}; "
            f"the victim takes {tuple(spec.in_shape)}"
        )
    body = spec.build()
    body.load_state_dict(model.state_dict())
    body.train(model.training)
    return Imprinted(body, bins, kind=kind).to(next(model.parameters()).device)


@dataclass(frozen=True, eq=False)
class TrapWeights:
    """Trap weights: a block of ``bins`` rarely active rows in front of the global model.

    Row i measures a random unit direction w_i (drawn from the round's
    generator) and fires for inputs whose response exceeds the (1 − ``rate``)
    quantile of the reference images' responses, so each image fires about
    ``rate`` · ``bins`` rows, and a row with a single image of a batch of n
    occurs for each image with probability about rate · (1 − rate)^(n − 1)
    per row. The way back to the input (V) has a random positive column per
    row, so a row fired by several images gives a mixture that differs from
    row to row, while every row an image fires alone gives that image exactly
    (see :mod:`leakage.attacks.trap`).

    Args:
        bins: rows of the block.
        rate: share of inputs each row lets through; 1/n is best for batches of n.
        reference: (N, C, H, W) public images in [0, 1] (the server's prior knowledge).
        spread: the block's weight back to the input (see :data:`SPREAD`).
    """

    bins: int = 1024
    rate: float = 1 / 64
    reference: torch.Tensor | None = None
    spread: float = SPREAD

    def __post_init__(self) -> None:
        check_trap_settings(self.bins, self.rate, self.spread)
        _check_reference(self.reference, "trap weights")

    def __call__(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator | None = None
    ) -> Imprinted:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        sent = _imprinted_copy(model, self.bins, "trap", self.reference)
        d = math.prod(model.spec.in_shape)
        w = torch.randn(self.bins, d, generator=generator, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True)
        responses = self.reference.detach().double().flatten(1).cpu() @ w.T  # (N, bins)
        t = torch.quantile(responses, 1.0 - self.rate, dim=0)
        v = torch.rand(d, self.bins, generator=generator, dtype=torch.float64) + 0.5
        spread = responses.std(dim=0).clamp_min(1e-12)
        block = sent.imprint
        with torch.no_grad():
            block.measure.weight.copy_(w)
            block.measure.bias.copy_(-t)
            block.spread.weight.copy_(v * (self.spread / (self.bins * self.rate) / spread))
        return sent


@MODEL_MODIFICATIONS.register("fishing")
def _fished(body: nn.Module, target: int) -> nn.Module:
    """Class fishing changes weights only: the architecture is the victim's."""
    if not hasattr(body, "spec"):
        raise ValueError("fishing needs a victim built by fl_core.build_model (it has no spec)")
    if not 0 <= target < body.spec.num_classes:
        raise ValueError(
            f"fishing target {target} is not a class of a {body.spec.num_classes}-class victim"
        )
    body.spec = dataclasses.replace(
        body.spec, modification=(("name", "fishing"), ("target", target))
    )
    return body


def last_linear(model: nn.Module) -> nn.Linear:
    """The victim's output layer (its last ``nn.Linear``, with bias)."""
    layer = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layer or layer[-1].bias is None:
        raise ValueError("fishing needs a victim whose output layer is nn.Linear with a bias")
    return layer[-1]


@dataclass(frozen=True, eq=False)
class ClassFishing:
    """Class fishing: every class but ``target`` made certain, so only the target
    class's images send a gradient into the network.

    Args:
        target: the class to fish for.
        margin: how far (in logits) the other classes' bias lies above the
            largest target logit of the reference images; the non-target
            images' share of the gradient is about e^(−margin).
        reference: (N, C, H, W) public images in [0, 1] on which the server
            measures the target logit.
    """

    target: int = 0
    margin: float = 30.0
    reference: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.target, int) and self.target >= 0):
            raise ValueError(f"fishing target must be a class index; got {self.target!r}")
        if not self.margin > 0:
            raise ValueError(f"fishing margin must be positive; got {self.margin!r}")
        _check_reference(self.reference, "class fishing")

    def __call__(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator | None = None
    ) -> nn.Module:
        spec = model.spec
        if tuple(self.reference.shape[1:]) != tuple(spec.in_shape):
            raise ValueError(
                f"fishing reference images have shape {tuple(self.reference.shape[1:])}; "
                f"the victim takes {tuple(spec.in_shape)}"
            )
        sent = _fished(spec.build(), self.target)
        sent.load_state_dict(model.state_dict())
        device = next(model.parameters()).device
        sent.to(device).eval()
        with torch.no_grad():
            logits = torch.cat([sent(x.to(device)) for x in self.reference.split(256)])
            top = float(logits[:, self.target].max())
            layer = last_linear(sent)
            others = torch.arange(layer.out_features, device=device) != self.target
            layer.weight[others] = 0.0
            layer.bias[others] = top + self.margin
        sent.train(model.training)
        return sent


def expected_imprint_recovery(bins: int, batch: int) -> float:
    """Expected share of a batch that an imprint block with ``bins`` equal-mass
    bins recovers exactly: (1 − 1/k)^(n − 1).

    Each image falls into one of k bins of probability 1/k each, independently
    of the others (thresholds at the k-quantiles of the measurement's true
    distribution); it is recovered when none of the other n − 1 images shares
    its bin. (breaching's ``analysis/imprint_guarantee.py`` counts bin
    configurations as equally likely instead, which is a different model of the
    batch and gives a different number.)
    """
    if bins < 1 or batch < 1:
        raise ValueError("bins and batch must be positive")
    return (1.0 - 1.0 / bins) ** (batch - 1)
