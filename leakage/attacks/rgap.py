"""R-GAP: closed-form recursive inversion of a conv/linear chain at batch size 1.

Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021
(arXiv:2010.07733). For one sample every weighted layer ``z = W·x (+ b)`` gives
two sets of *linear* equations in its input ``x``, once the gradient ``k =
∂L/∂z`` at its output and the output ``z`` itself are known:

* **gradient constraints**: the weight gradient is ``∂L/∂W = k·xᵀ`` (for a
  convolution, ``G[o, j] = Σ_p k[o, p]·X[j, p]`` with ``X`` the im2col patches
  of ``x``, zero padding included);
* **forward constraints**: ``W·x = z − b`` (the convolution as a matrix).

The recursion starts at the last linear layer, whose bias gradient is ``k``
itself, so its input is read off as in the analytic attack (``x = Gᵀk/‖k‖²``,
no forward constraint: the logits are unknown). Then, layer by layer
downwards, the recovered input of the layer above is the *output* of an
invertible elementwise activation: inverting it gives the pre-activation
``z`` of the layer below, and ``k_below = σ'(z) ⊙ (Wᵀ·k_above)`` its output
gradient; the stacked system is solved by least squares for that layer's
input, and so on down to the image. An input normalisation first layer is
undone with its published mean and std, so images come back in pixel space.

Solving. The stacked system is solved through its normal equations in
float64, assembled from the convolution's structure instead of from the
dense Toeplitz matrix: the gradient block is ``I_C ⊗ B`` with ``B`` an
(H·W)² matrix built from ``kᵀk``, the forward block is scattered from
``Wᵀ W`` per pair of kernel taps, so a CNN6 layer costs a Cholesky
factorisation of at most 3,468² entries (about a second on one core). Each
block is weighted by the inverse squared norm of its right-hand side
(``balance=True``) so both are fitted to the same relative precision; with
exact data any weighting gives the same, exact, solution. Where the
combined matrix is numerically singular the solver falls back to the
minimum-norm least-squares solution (and reports it per layer).

Scope, checked before any work (a one-line ``ValueError`` names the module
otherwise):

* batch size 1 (the FedSGD batch, or ``num_samples`` of a FedAvg update);
* the victim is a plain chain of modules (each module's input is the previous
  module's output, reshapes between them allowed): no skip connections, no
  functional operations in ``forward``;
* weighted layers: ``nn.Conv2d`` (any kernel, stride, zero padding, dilation;
  with or without bias; ``groups=1``) and ``nn.Linear``; the last module is an
  ``nn.Linear`` with bias (the logits);
* between them only invertible elementwise activations: ``nn.LeakyReLU`` with a
  positive slope, ``nn.Sigmoid``, ``nn.Tanh``, ``nn.Identity``, plus
  ``nn.Flatten`` / ``nn.Unflatten`` and the victim's input normalisation.
  ``nn.ReLU`` is refused (it zeroes negative pre-activations, which no
  equation recovers), as are BatchNorm, pooling and dropout.

Rank analysis (:func:`rank_analysis`, the paper's sec. 4): a layer's input is
determined when its stacked system has full column rank. The counts bound it
from above: ``unknowns = C·H·W``; forward constraints ``≤ min(O·P, unknowns)``
(O output channels, P output positions); gradient constraints ``≤ min(O, P)·
C·kh·kw`` (``k`` has rank ``min(O, P)``, and each of its independent rows
gives one equation per weight of a filter). A layer whose counts fall short is
underdetermined whatever the data; counts that suffice do not prove full rank
(pixels no kernel tap reaches, coinciding equations), so the analysis also
computes the numerical rank of the stacked system with the layer's actual
weights and a random ``k`` (drawn from an explicit generator), i.e. for
generic data, before any client data exists.

Measured against breaching's R-GAP on the same CNN6 weights, images and
labels: ``benchmarks/results/rgap/summary.md`` (``benchmarks/rgap.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fl_core.types import Observation

from ..labels import update_as_gradient
from .base import ATTACKS, Reconstruction
from .matching import attack_labels
from .rgap_chain import conv_system, invert_chain, rgap_chain

__all__ = ["LayerRank", "RGAP", "rank_analysis", "rgap_chain"]


# ---------------------------------------------------------------- rank analysis


@dataclass(frozen=True)
class LayerRank:
    """The rank analysis of one weighted layer (see the module docstring).

    Attributes:
        name: the module's name in the victim.
        kind: ``"Conv2d"`` or ``"Linear"``.
        unknowns: entries of the layer's input, C·H·W (or D).
        forward_constraints: upper bound on the forward equations' rank,
            ``min(outputs, unknowns)``; 0 for the last layer (logits unknown).
        gradient_constraints: upper bound on the gradient equations' rank,
            ``min(O, P)·C·kh·kw`` (convolution) or ``unknowns`` (linear).
        rank: numerical rank of the stacked system for generic data (the
            layer's weights, a random ``k``); ``None`` when not computed.
        condition: its condition number (largest over smallest singular value
            of the stacked, balanced system); ``None`` when not computed.
        status: ``"determined"`` (full column rank) or ``"underdetermined"``;
            by the counts alone when ``rank`` is ``None``.
    """

    name: str
    kind: str
    unknowns: int
    forward_constraints: int
    gradient_constraints: int
    rank: int | None
    condition: float | None
    status: str

    @property
    def deficiency(self) -> int:
        """Unknowns no constraint pins down (0 when determined)."""
        bound = min(self.unknowns, self.forward_constraints + self.gradient_constraints)
        return self.unknowns - (bound if self.rank is None else self.rank)


def rank_analysis(
    model: nn.Module,
    in_shape: tuple[int, ...],
    *,
    numeric: bool = True,
    generator: torch.Generator | None = None,
    rcond: float = 1e-7,
) -> list[LayerRank]:
    """Whether R-GAP can determine each weighted layer's input, before any data.

    Args:
        model: the victim (its weights are used for the numerical rank).
        in_shape: one sample's shape (C, H, W).
        numeric: also compute the stacked system's numerical rank and condition
            number (an eigendecomposition of up to C·H·W squared entries per
            layer: ~2 s for CNN6's largest on one core); ``False``: counts only.
        generator: source of the random output gradients ``k`` (default seed 0).
        rcond: singular values under ``rcond·max`` count as zero.

    Returns:
        One :class:`LayerRank` per Conv2d / Linear layer, input side first.

    Raises:
        ValueError: the same one-line errors as the attack for victims out of scope.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    steps = rgap_chain(model, tuple(in_shape))
    weighted = [s for s in steps if isinstance(s.module, (nn.Conv2d, nn.Linear))]
    out = []
    for step in weighted:
        m, d = step.module, math.prod(step.in_shape)
        is_last = step is steps[-1]
        fwd = 0 if is_last else min(math.prod(step.out_shape), d)
        rank = cond = None
        if isinstance(m, nn.Conv2d):
            o, p = m.out_channels, math.prod(step.out_shape[1:])
            grad = min(min(o, p) * m.weight[0].numel(), d)
            if numeric:
                k = torch.randn(step.out_shape, generator=generator, dtype=torch.float64)
                n_grad, n_fwd, _ = conv_system(m, step.name, step.in_shape, k)
                normal = n_grad / n_grad.trace() + n_fwd / n_fwd.trace()
                vals = torch.linalg.eigvalsh(normal).clamp_min(0)
                keep = vals > (rcond**2) * vals.max()
                rank = int(keep.sum())
                cond = math.sqrt(float(vals.max() / vals[keep].min()))
        else:
            grad = d  # k·xᵀ with k ≠ 0 fixes every entry of x
            if numeric:
                rank, cond = d, 1.0 if is_last else None
                if not is_last:
                    w = m.weight.detach().double()
                    normal = torch.eye(d, dtype=w.dtype) / d + w.T @ w / (w.square().sum())
                    vals = torch.linalg.eigvalsh(normal)
                    cond = math.sqrt(float(vals.max() / vals.min()))
        full = (rank == d) if rank is not None else (fwd + grad >= d)
        status = "determined" if full else "underdetermined"
        out.append(LayerRank(step.name, type(m).__name__, d, fwd, grad, rank, cond, status))
    return out


# ---------------------------------------------------------------- the attack


@dataclass(frozen=True)
class RGAP:
    """R-GAP (Zhu & Blaschko, ICLR 2021): closed-form recursive inversion at batch 1.

    Args:
        label_strategy: label-recovery strategy of :mod:`leakage.labels`
            (default ``"auto"``); the inversion itself needs no label (the
            last layer's bias gradient is its output gradient).
        balance: weight the gradient and forward constraints of each layer by
            the inverse squared norm of their right-hand sides (``False``: the
            paper's plain stacking).
        rcond: a layer whose stacked system has a condition number above
            ``1/rcond`` is solved by a pseudo-inverse (minimum norm).
    """

    label_strategy: str = "auto"
    balance: bool = True
    rcond: float = 1e-7

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The image (1, C, H, W) in pixel space; labels from the strategy.

        ``loss`` is the relative squared distance between the observed
        gradient and the victim's gradient at the (unclipped) reconstruction
        with the recovered label; ``options["layers"]`` holds, per weighted
        layer, the solver used and the relative residuals of its gradient and
        forward equations.
        """
        if self.label_strategy == "joint":
            raise ValueError("rgap reads labels with a strategy, not 'joint'")
        n = obs.protocol.num_samples
        if n != 1:
            raise ValueError(f"rgap inverts one sample (batch size 1); this update holds {n}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        spec = obs.model_spec
        model = obs.model()
        steps = rgap_chain(model, spec.in_shape)
        index = {id(p): i for i, p in enumerate(model.parameters())}

        def grad_of(param: torch.Tensor) -> torch.Tensor:
            return update_as_gradient(obs, index[id(param)])

        x, layers = invert_chain(
            steps, grad_of, balance=self.balance, rcond=self.rcond, progress=progress
        )
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        loss = _gradient_distance(model, x, labels, [grad_of(p) for p in model.parameters()])
        return Reconstruction(
            images=x[None].float().clamp(0, 1),
            labels=labels,
            loss=loss,
            restart_losses=[loss],
            stopped="closed-form",
            options={
                "balance": self.balance,
                "rcond": self.rcond,
                "layers": layers,
            },
        )


def _gradient_distance(model, x, labels, observed) -> float:
    """‖∇θ L(x, y) − g‖² / ‖g‖² in float64 at the reconstruction (the cross-entropy loss)."""
    net = copy.deepcopy(model).double()
    loss = F.cross_entropy(net(x[None]), labels.long())
    grads = torch.autograd.grad(loss, list(net.parameters()))
    num = sum(float((a - b.double()).square().sum()) for a, b in zip(grads, observed))
    den = sum(float(b.double().square().sum()) for b in observed)
    return num / max(den, 1e-300)


ATTACKS.register("rgap")(RGAP)
