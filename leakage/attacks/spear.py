"""SPEAR: exact recovery of a whole batch from a ReLU linear layer's gradient.

Dimitrov, Müller, Fowl, Balunović, Vechev, "SPEAR: Exact Gradient Inversion of
Batches in Federated Learning", NeurIPS 2024 (arXiv:2403.03945).

For a linear layer z_j = W·x_j + b followed by ReLU, the gradient of the mean
loss over a batch of B samples is

    ∂L/∂W = Σ_j δ_j x_jᵀ = Δᵀ X,      ∂L/∂b = Σ_j δ_j = Δᵀ 1,

with δ_j = ∂L/∂z_j / B (m entries) and X the batch's inputs (B × n). Two
facts make it invertible:

* **Low rank.** ∂L/∂W has rank B. Its SVD gives ∂L/∂W = L·R with L (m × B)
  and R (B × n), and there is an unknown invertible Q (B × B) with
  Δᵀ = L·Q and X = Q⁻¹·R. Recovering the batch is recovering Q.
* **Sparsity.** ReLU zeroes δ_j wherever neuron i is inactive for sample j,
  about half of the m entries. A column q of Q is the direction whose image
  L·q has those zeros. Pick B − 1 rows of L at random: if they all lie in the
  zero set of one sample, the null space of those rows is that sample's q, and
  L·q is sparse. Otherwise L·q is dense (only the B − 1 chosen rows are zero).
  The chance per draw is about B·2^-(B-1), so the work grows as 2^B (the paper
  reaches B ≈ 25 on a GPU).

The attack samples row subsets in batches, keeps directions whose image has
many more zeros than B − 1, merges directions with the same zero pattern and
refines each on its whole zero set (the null vector of all rows it zeroes),
then picks B independent ones greedily, sparsest first. The bias gradient
fixes each column's scale and sign (Δᵀ·1 = ∂L/∂b gives Q's column scales by
least squares), so X = Q⁻¹·R with nothing left to guess.

Exactness is checked, not assumed: a recovered x_j is *consistent* when the
activation pattern it produces, W·x_j + b > 0, is the support of its δ_j (the
server knows W and b). The reconstruction reports how many samples passed
(``options["exact"]``), the draws it took and the seconds.

Labels: with the input and δ_j known, the label is the class whose per-sample
loss gradient at z_j equals δ_j (``label_strategy="match"``, the default);
any strategy of :mod:`leakage.labels` may be used instead.

Scope: the victim's first parameterised layer is an ``nn.Linear`` with bias on
the flattened input, followed by ``nn.ReLU`` (the ``mlp`` victim with its
default activation). A FedAvg delta is turned into the gradient it implies
(:func:`leakage.labels.update_as_gradient`), exact after one local step. The
same algebra applies to any ReLU linear layer whose input is a feature
vector: :func:`spear_linear` takes the layer's gradients and weights.
Duplicate samples, or samples with the same activation pattern, lower the
rank and are not separated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fl_core.types import Observation

from ..labels import update_as_gradient
from .analytic import first_linear_layer
from .base import ATTACKS, Reconstruction
from .matching import attack_labels
from .spear_layer import SpearResult, spear_linear

__all__ = ["Spear", "SpearResult", "spear_linear"]


def _relu_after(model: nn.Module, layer: nn.Linear) -> bool:
    leaves = [m for m in model.modules() if not list(m.children())]
    i = next(i for i, m in enumerate(leaves) if m is layer)
    return i + 1 < len(leaves) and type(leaves[i + 1]) is nn.ReLU


def _matched_labels(
    model: nn.Module,
    layer: nn.Linear,
    in_shape: tuple[int, ...],
    inputs: torch.Tensor,
    deltas: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """Per sample, the class whose loss gradient at the layer's output is its δ.

    ``inputs`` (B, n) are what the layer reads; the rest of the network is run
    from the layer's output z onwards by hooking the layer.
    """
    model = model.double()
    labels = []
    for x, d in zip(inputs, deltas):
        z = (layer(x[None])).detach().requires_grad_(True)
        hook = layer.register_forward_hook(lambda _m, _i, _o, z=z: z)
        try:
            logits = model(torch.zeros(1, *in_shape, dtype=torch.float64))
        finally:
            hook.remove()
        errs = []
        for y in range(logits.shape[1]):
            (gz,) = torch.autograd.grad(
                F.cross_entropy(logits, torch.tensor([y])) / batch, z, retain_graph=True
            )
            errs.append(float((gz[0] - d).norm() / d.norm().clamp_min(1e-300)))
        labels.append(int(torch.tensor(errs).argmin()))
    return torch.tensor(labels, dtype=torch.long)


@dataclass(frozen=True)
class Spear:
    """SPEAR: exact batch recovery from a first ReLU linear layer (``mlp`` victims).

    Args:
        label_strategy: ``"match"`` (default: the class whose loss gradient
            reproduces each recovered sample's δ) or any strategy of
            :mod:`leakage.labels` except ``"joint"``.
        max_draws: give up sampling after this many row subsets (the expected
            need grows as B·2^B; 2·10⁶ covers B = 16 many times over).
        sparsity: least fraction of zeros, beyond the B − 1 drawn rows, of a
            direction that counts as a sample's.
        eps: relative threshold under which an entry of L·q is zero.
    """

    label_strategy: str = "match"
    max_draws: int = 2_000_000
    sparsity: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.label_strategy == "joint":
            raise ValueError("SPEAR reads labels with a strategy or 'match', not 'joint'")
        if not (isinstance(self.max_draws, int) and self.max_draws >= 1):
            raise ValueError(f"max_draws must be a positive integer; got {self.max_draws!r}")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1); got {self.sparsity!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1); got {self.eps!r}")

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The batch (N, C, H, W) solved from the first layer's gradient; labels matched."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        spec = obs.model_spec
        model = obs.model()
        try:
            w_idx, b_idx = first_linear_layer(model, spec.in_shape)
        except ValueError:  # its message names the analytic attack
            raise ValueError(
                "SPEAR needs a victim whose first layer is fully connected with a bias on the "
                f"flattened input, followed by ReLU ({spec.name}'s is not); use --model mlp "
                "with activation relu"
            ) from None
        params = list(model.parameters())
        layer = next(
            m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is params[w_idx]
        )
        if not _relu_after(model, layer):
            raise ValueError(
                "SPEAR needs the first linear layer to be followed by ReLU (its sparsity "
                "is what the attack solves for); use --model mlp with activation relu"
            )
        n = obs.protocol.num_samples
        weight, bias = (update_as_gradient(obs, i) for i in (w_idx, b_idx))
        res = spear_linear(
            weight,
            bias,
            obs.parameters[w_idx],
            obs.parameters[b_idx],
            n,
            generator=generator,
            max_draws=self.max_draws,
            sparsity=self.sparsity,
            eps=self.eps,
        )
        if self.label_strategy == "match":
            labels = _matched_labels(model, layer, spec.in_shape, res.inputs, res.deltas, n)
        else:
            labels = attack_labels(obs, self.label_strategy, generator=generator)
        mean, std = spec.mean_std  # the layer read (x - mean) / std
        images = (res.inputs.view(n, *spec.in_shape) * std + mean).float()
        loss = float(res.mismatch.mean())
        exact = int(res.consistent.sum())
        return Reconstruction(
            images=images.clamp(0, 1),
            labels=labels,
            loss=loss,
            restart_losses=[loss],
            steps=res.draws,
            total_steps=res.draws,
            stopped="closed-form" if exact == n else "incomplete",
            options={
                "exact": exact,
                "found": res.found,
                "rank": res.rank,
                "draws": res.draws,
                "seconds": round(res.seconds, 4),
            },
        )


ATTACKS.register("spear")(Spear)
