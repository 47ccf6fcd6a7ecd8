"""Cocktail Party unmixing of a linear layer's weight gradient (Kariyappa et al., ICML 2023).

The weight gradient of a linear layer is a mixture of its B inputs; whitening
and an ICA rotation (:mod:`leakage.attacks.ica`) with the paper's
non-Gaussianity, decorrelation and total-variation terms unmix them, in the
pixel or the edges domain, and the bias gradient fixes each source's scale and
sign. :class:`leakage.attacks.cpa.CPA` explains the choices and runs it as an attack.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import trange

from ..objectives import total_variation
from .ica import LOGCOSH_GAUSS, ica_rotation, whiten

log = logging.getLogger(__name__)

__all__ = ["DOMAINS", "INITS", "SCALES", "UnmixResult", "cocktail_party"]


SCALES = ("bias", "range")


INITS = ("identity", "fastica")


DOMAINS = ("pixels", "edges")


@dataclass(frozen=True, eq=False)
class UnmixResult:
    """What :func:`cocktail_party` recovered.

    Attributes:
        inputs: (B, n) the layer's inputs, float64, scaled as ``scale`` says.
        unmixing: (B, m) rows applied to the weight gradient give the sources.
        history: the objective (to minimise) after each Adam step.
        rank: numerical rank of the weight gradient.
        seconds: wall time.
    """

    inputs: torch.Tensor
    unmixing: torch.Tensor
    history: list[float] = field(default_factory=list)
    rank: int = 0
    seconds: float = 0.0


def _edges(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Horizontal then vertical neighbour differences of each row shown as an image.

    (m, C·H·W) -> (m, C·H·(W−1) + C·(H−1)·W); linear, so mixtures of images
    become the same mixtures of the images' edges. The mean absolute entry of
    each part is the anisotropic TV of :func:`~leakage.objectives.total_variation`.
    """
    x = rows.view(len(rows), *shape)
    dx = (x[..., :, 1:] - x[..., :, :-1]).flatten(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).flatten(1)
    return torch.cat([dx, dy], 1)


def _objective(
    v: torch.Tensor,
    xw: torch.Tensor,
    tv_of: Callable[[torch.Tensor], torch.Tensor] | None,
    negentropy: float,
    mi: float,
    temperature: float,
    tv: float,
) -> torch.Tensor:
    """The CPA objective to minimise for unmixing rows ``v`` (k, k) on whitened signals (k, n).

    ``tv_of`` maps the unmixed signals (k, n) to their mean TV as images
    (``None``: no TV term).
    """
    k = v.shape[0]
    vn = v / v.norm(dim=1, keepdim=True)  # unit rows: unit-variance outputs
    s = vn @ xw  # (k, n) unmixed signals
    loss = s.new_zeros(())
    if negentropy:
        j = (torch.log(torch.cosh(s)).mean(1) - LOGCOSH_GAUSS).square()  # (k,)
        loss = loss - negentropy * j.mean()
    if mi and k > 1:
        cos = (vn @ vn.T).abs()  # (k, k)
        off = ~torch.eye(k, dtype=torch.bool, device=v.device)
        loss = loss + mi * (torch.exp(temperature * cos[off]) - 1).mean()
    if tv and tv_of is not None:
        loss = loss + tv * tv_of(s)
    return loss


def cocktail_party(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    count: int,
    *,
    shape: tuple[int, ...] | None = None,
    steps: int = 500,
    lr: float = 0.01,
    negentropy: float = 1.0,
    mi: float = 0.2,
    temperature: float = 12.4,
    tv: float = 3.1,
    init: str = "fastica",
    domain: str = "pixels",
    scale: str = "bias",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> UnmixResult:
    """Recover a linear layer's B inputs from its batch gradient (CPA, Kariyappa et al. 2023).

    Args:
        weight_grad: (m, n) ∂L/∂W of the batch (the mixtures).
        bias_grad: (m,) ∂L/∂b, which fixes each source's scale and sign; ``None``
            for a layer without bias (then the sign stays free and ``scale``
            must be ``"range"``).
        count: B, the number of inputs behind the gradient.
        shape: (C, H, W) of one input when the inputs are images: turns on the
            TV prior; ``None`` for feature vectors.
        steps: Adam steps on the unmixing matrix.
        lr: Adam's step size.
        negentropy: weight of the negentropy term J.
        mi: weight λ_MI of the mutual-independence penalty.
        temperature: T of that penalty.
        tv: weight λ_TV of the TV prior (images only).
        init: ``"identity"`` (the paper's start) or ``"fastica"`` (start from
            :func:`~leakage.attacks.ica.fast_ica`'s rotation, drawn from ``generator``).
        domain: ``"pixels"`` (the paper's: whiten and unmix the rows as they
            are) or ``"edges"`` (whiten and unmix the rows' pixel differences,
            then apply the unmixing to the rows; images only, see the module
            docstring).
        scale: ``"bias"`` (least squares on the bias gradient, see the module
            docstring) or ``"range"`` (the bias's sign, then each input
            min-max normalised to [0, 1], the paper's).
        generator: draws FastICA's initial rotation (default: seed 0).
        progress: show a progress bar.

    Returns:
        An :class:`UnmixResult` with inputs (B, n). Where the gradient's rank r
        is below B, only r sources exist; the last is repeated.
    """
    start = time.perf_counter()
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}; got {domain!r}")
    if scale == "bias" and bias_grad is None:
        raise ValueError("scale='bias' needs the bias gradient; use scale='range'")
    g = weight_grad.detach().double()
    if g.dim() != 2:
        raise ValueError(f"weight_grad must be (m, n); got {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= count <= min(m, n):
        raise ValueError(
            f"batch size {count} must be between 1 and min(m, n) = {min(m, n)}: a layer "
            f"with {m} outputs and {n} inputs mixes at most that many inputs separably"
        )
    if shape is not None and math.prod(shape) != n:
        raise ValueError(f"shape {tuple(shape)} has {math.prod(shape)} entries, not n = {n}")
    if domain == "edges":
        if shape is None:
            raise ValueError("domain='edges' needs the image shape; use domain='pixels'")
        signals = _edges(g, shape)  # (m, n_dx + n_dy): the same mixtures of the images' edges
        n_dx = math.prod(shape[:-1]) * (shape[-1] - 1)

        def tv_of(y: torch.Tensor) -> torch.Tensor:  # y: (k, n_dx + n_dy) edge signals
            return y[:, :n_dx].abs().mean() + y[:, n_dx:].abs().mean()

    else:
        signals = g

        def tv_of(y: torch.Tensor) -> torch.Tensor:  # y: (k, C·H·W) images
            return total_variation(y.reshape(1, len(y), *shape))[0]

    xw, whitening, spectrum = whiten(signals, count)  # (B, n'), (B, m)
    # numerical rank: the gradient's own precision (matrix_rank's rtol), and at least the
    # Gram matrix's (singular values from eigenvalues resolve ~1e-8 of the largest)
    rtol = max(torch.finfo(weight_grad.dtype).eps * max(m, n), 1e-7)
    rank = int((spectrum > rtol * spectrum[0]).sum()) if spectrum[0] > 0 else 0
    if rank == 0:
        raise ValueError("the layer's weight gradient is constant across rows: nothing to unmix")
    k = min(count, rank)
    if k < count:
        log.warning("weight gradient has rank %d < batch size %d; %d sources", rank, count, k)
        xw, whitening = xw[:k], whitening[:k]
    if init == "fastica" and k > 1:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        w_init = torch.randn(k, k, generator=gen, dtype=torch.float64).to(xw)
        v0 = ica_rotation(xw, w_init, 200, 1e-4)  # (k, k) rotation of the whitened signals
    else:
        v0 = torch.eye(k, dtype=torch.float64, device=g.device)
    xw32 = xw.float()
    v = v0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    weights = (negentropy, mi, temperature, tv)
    history: list[float] = []
    for _ in trange(steps, disable=not progress, desc="cocktail party", leave=False):
        opt.zero_grad(set_to_none=True)
        loss = _objective(v, xw32, tv_of if shape is not None else None, *weights)
        loss.backward()
        opt.step()
        history.append(loss.item())
    vn = v.detach().double()
    unmixing = (vn / vn.norm(dim=1, keepdim=True)) @ whitening  # (k, m)
    sources = unmixing @ g  # (k, n), row means restored
    inputs = _rescale(sources, g, bias_grad, scale)
    if k < count:
        inputs = torch.cat([inputs, inputs[-1:].expand(count - k, -1)])
        unmixing = torch.cat([unmixing, unmixing[-1:].expand(count - k, -1)])
    return UnmixResult(inputs, unmixing, history, rank, time.perf_counter() - start)


def _rescale(
    sources: torch.Tensor, g: torch.Tensor, bias_grad: torch.Tensor | None, scale: str
) -> torch.Tensor:
    """Sources (k, n) = D·X to inputs: D from the bias gradient, or min-max to [0, 1]."""
    sign = torch.ones(len(sources), dtype=sources.dtype, device=sources.device)
    d = None
    if bias_grad is not None:
        mixing = torch.linalg.lstsq(sources.T, g.T).solution.T  # (m, k): G = Â S
        d = torch.linalg.lstsq(mixing, bias_grad.detach().double()[:, None]).solution[:, 0]
        sign = torch.where(d < 0, -1.0, 1.0).to(sources)
    if scale == "bias" and d is not None:
        ok = d.abs() > 1e-12 * d.abs().max().clamp_min(1e-300)
        if bool(ok.all()):
            return sources / d[:, None]
        log.warning("bias gradient leaves %d sources unscaled; min-max", int((~ok).sum()))
        out = _minmax(sources * sign[:, None])
        out[ok] = sources[ok] / d[ok, None]
        return out
    return _minmax(sources * sign[:, None])


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-300)
