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

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fl_core.types import Observation

from ..labels import update_as_gradient
from .analytic import first_linear_layer
from .base import ATTACKS, Reconstruction
from .matching import attack_labels

__all__ = ["Spear", "SpearResult", "spear_linear"]

_INDEPENDENT = 1e-5
"""Relative singular-value threshold of the greedy independence test (see ``_solve``)."""


@dataclass(frozen=True, eq=False)
class SpearResult:
    """What :func:`spear_linear` recovered.

    Attributes:
        inputs: (B, n) the layer's inputs, in the order of ``deltas``.
        deltas: (B, m) each sample's ∂L/∂z (mean-loss scaling, Σ_j δ_j = ∂L/∂b).
        consistent: (B,) bool, the sample's activation pattern W·x + b > 0
            matches the support of its δ (exact recovery).
        mismatch: (B,) fraction of neurons where the pattern and the support differ.
        found: directions found by sampling (≤ B).
        rank: numerical rank of the weight gradient.
        draws: row subsets sampled.
        seconds: wall time.
    """

    inputs: torch.Tensor
    deltas: torch.Tensor
    consistent: torch.Tensor
    mismatch: torch.Tensor
    found: int
    rank: int
    draws: int
    seconds: float


def _zero_sets(v: torch.Tensor, rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Boolean (k, m): entries of each column of ``v`` (m, k) that are numerically zero."""
    scale = v.abs().amax(0, keepdim=True).clamp_min(1e-300)
    return ((v.abs() <= eps * scale) & rows[:, None]).T


def _distinct_rows(lmat: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """``pool`` without rows parallel to an earlier one (same direction, any scale).

    Rows where one sample alone is active are all parallel; drawing two of
    them wastes a constraint, so each direction is kept once.
    """
    unit = lmat[pool] / lmat[pool].norm(dim=1, keepdim=True)
    same = (unit @ unit.T).abs() > 1 - 1e-8
    first = same.int().argmax(1)  # index of the first row parallel to each row
    return pool[first == torch.arange(len(pool))]


def _refine(lmat: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """Unit direction q (B,) minimising ‖L_Z q‖ over the rows Z it should zero.

    ``None`` when Z is not one sample's zero set. A direction mixing samples
    S zeroes their common zero set, whose rows span only B − |S| dimensions,
    plus the |S| − 1 drawn rows where the mixture happens to cancel; those few
    rows alone lift L_Z to rank B − 1, so each has leverage ≈ 1 in L_Z (a
    sample's own zero set spreads its B − 1 dimensions over many rows:
    leverage ≈ 0.4 at most on CIFAR-10 inputs, B = 16). Rank below B − 1 also
    rejects.
    """
    k = lmat.shape[1]
    if k == 1:
        return torch.ones(1, dtype=lmat.dtype)
    u, sv, vh = torch.linalg.svd(lmat[zero], full_matrices=False)
    if len(sv) < k - 1 or sv[k - 2] <= 1e-4 * sv[0]:
        return None
    if float(u[:, : k - 1].pow(2).sum(1).max()) > 0.9:
        return None
    return vh[-1]


def spear_linear(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator,
    max_draws: int = 2_000_000,
    chunk: int = 8192,
    sparsity: float = 0.1,
    eps: float = 1e-5,
) -> SpearResult:
    """Recover a ReLU linear layer's batch of inputs from its gradients.

    Args:
        weight_grad: (m, n) ∂L/∂W of the mean loss over the batch.
        bias_grad: (m,) ∂L/∂b.
        weight: (m, n) the layer's weight W (the global model's).
        bias: (m,) the layer's bias b.
        batch_size: B, the number of inputs behind the gradient.
        generator: draws the row subsets.
        max_draws: give up sampling after this many row subsets.
        chunk: row subsets per batched draw.
        sparsity: a direction counts when its image zeroes at least this
            fraction of the non-zero rows beyond the B − 1 it was built from.
        eps: an entry is zero when below ``eps`` times its column's largest.

    Returns:
        A :class:`SpearResult`; inputs (B, n) in float64.
    """
    start = time.perf_counter()
    g = weight_grad.detach().double()
    gb = bias_grad.detach().double()
    w, b = weight.detach().double(), bias.detach().double()
    if g.dim() != 2 or gb.shape != (g.shape[0],) or w.shape != g.shape or b.shape != gb.shape:
        raise ValueError(
            "spear_linear needs weight_grad and weight shaped (m, n) and bias_grad and "
            f"bias shaped (m,); got {tuple(g.shape)}, {tuple(w.shape)}, {tuple(gb.shape)}, "
            f"{tuple(b.shape)}"
        )
    m, n = g.shape
    if not 1 <= batch_size <= min(m, n):
        raise ValueError(
            f"batch size {batch_size} must be between 1 and min(m, n) = {min(m, n)} for "
            "the weight gradient to have rank B"
        )
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    rank = int((s > 1e-6 * s[0]).sum()) if s[0] > 0 else 0
    if rank == 0:
        raise ValueError("the layer's weight gradient is zero: nothing to invert")
    k = min(rank, batch_size)
    lmat = u[:, :k]  # (m, k), orthonormal columns: well conditioned for the search
    rmat = s[:k, None] * vh[:k]  # (k, n)
    rows = lmat.norm(dim=1) > 1e-9 * lmat.norm(dim=1).max()  # neurons active for someone
    pool = rows.nonzero().squeeze(1)
    need = k - 1 + max(2, math.ceil(sparsity * len(pool)))
    # Row-sampling laws: uniform, and weighted towards rows of small norm, which
    # tend to have few active samples and so lie in more samples' zero sets
    # (any law is valid: the consistency check decides). Draws cycle through them.
    pool = _distinct_rows(lmat, pool)
    lmat_f32 = lmat.float()
    norms = lmat[pool].norm(dim=1)
    base = torch.stack([torch.ones_like(norms), 1 / norms])  # (2, |pool|)
    weights = base

    patterns: list[torch.Tensor] = []  # zero sets (m,) of the directions found
    directions: list[torch.Tensor] = []
    draws = 0
    if k == 1:
        directions.append(torch.ones(1, dtype=torch.float64))
        patterns.append(_zero_sets(lmat, rows, eps)[0])
    tried: set[bytes] = set()  # zero sets already examined

    def solve(ban: frozenset[int]):
        return _solve(lmat, rmat, gb, w, b, directions, patterns, k, eps, ban)

    solved = _settle(solve, patterns)
    while not bool(solved[3].all()) and draws < max_draws:
        t = min(chunk, max_draws - draws)
        draws += t
        law = weights[torch.arange(t) % len(weights)]  # (t, |pool|)
        # k - 1 distinct rows per draw with probability proportional to the law
        # (Efraimidis & Spirakis 2006: the largest log(u) / w).
        keys = torch.rand(law.shape, generator=generator, dtype=torch.float64).log_() / law
        sub = lmat[pool[keys.topk(k - 1, dim=1).indices]]  # (t, k-1, k)
        # The null vector of each k-1 x k block: q = (A⁻¹ a, -1) for sub = [A | a].
        x, info = torch.linalg.solve_ex(sub[:, :, :-1], sub[:, :, -1:])
        q = torch.cat([x.squeeze(-1), -torch.ones(t, 1, dtype=torch.float64)], 1)
        q = q[(info == 0) & q.isfinite().all(1)]
        q = q / q.norm(dim=1, keepdim=True)  # (t', k)
        # Screening in float32 (the zeros sit near 1e-8 of a column's largest
        # entry, far below eps); what passes is refined in float64.
        zeros = _zero_sets(lmat_f32 @ q.float().T, rows, eps)  # (t', m)
        new = 0
        hits = (zeros.sum(1) >= need).nonzero().squeeze(1)
        if len(hits):  # a 1-D null space only: rank-deficient draws zero mixtures
            hsv = torch.linalg.svdvals(sub[hits])
            hits = hits[hsv[:, -1] > 1e-6 * hsv[:, 0]]
        for i in hits.tolist():
            key = zeros[i].numpy().tobytes()
            if key in tried:
                continue
            tried.add(key)
            if any(float((zeros[i] ^ p).float().mean()) < 0.02 for p in patterns):
                continue
            qi = _refine(lmat, zeros[i])
            if qi is None:
                continue
            z = _zero_sets(lmat @ qi[:, None], rows, eps)[0]
            if z.sum() < need or any(float((z ^ p).float().mean()) < 0.02 for p in patterns):
                continue
            patterns.append(z)
            directions.append(qi)
            new += 1
        if new:
            solved = _settle(solve, patterns)
            # Rows where few of the samples found so far are active are likely
            # inactive for the others too: favour them (bootstrapped laws).
            # A row no found sample is active in is in the pool only because an
            # unfound one is active there, the wrong rows to draw: the masked
            # laws skip them, which matters once most samples are found.
            a = torch.stack([~p[pool] for p in patterns]).double().sum(0)
            boot = [rho**a for rho in (0.2, 0.05)]
            masked = [w * (a >= 1) for w in boot if bool((a >= 1).sum() >= k)]
            weights = torch.cat([base, torch.stack(boot + masked)])
    inputs, deltas, mismatch, consistent, kept = solved
    n_kept = len(kept)
    if k < batch_size:  # rank-deficient gradient: repeat the last recovered sample
        pad = batch_size - k
        inputs = torch.cat([inputs, inputs[-1:].expand(pad, -1)])
        deltas = torch.cat([deltas, torch.zeros(pad, m, dtype=torch.float64)])
        consistent = torch.cat([consistent, torch.zeros(pad, dtype=torch.bool)])
        mismatch = torch.cat([mismatch, torch.ones(pad, dtype=torch.float64)])
    return SpearResult(
        inputs=inputs,
        deltas=deltas,
        consistent=consistent,
        mismatch=mismatch,
        found=n_kept,
        rank=rank,
        draws=draws,
        seconds=time.perf_counter() - start,
    )


def _solve(
    lmat: torch.Tensor,
    rmat: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    directions: list[torch.Tensor],
    patterns: list[torch.Tensor],
    k: int,
    eps: float,
    banned: frozenset[int] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Greedy filtering of the directions found, then the batch they imply.

    Sparsest first, a direction is kept when it is independent of those kept,
    numerically: the unit columns kept must have a smallest singular value
    above ``_INDEPENDENT`` times their largest. A mixture of two directions
    already kept is only independent of them through the float32 gradient's
    rounding (smallest singular value ~1e-7; the samples' own directions:
    ~0.6 at B = 20 on CIFAR-10), and keeping it makes Q numerically singular
    and every recovered input wrong.

    Missing directions are completed orthogonally. Each input is a row of
    Q⁻¹·R and each row of Q⁻¹ depends on every column, so then in general
    every found sample comes out wrong as well, and inconsistent (the missing
    sample's own row, orthogonal to all the found columns, can be right).

    Returns ``(inputs (k, n), deltas (k, m), mismatch (k,), consistent (k,),
    kept)`` with ``kept`` the indices of the directions used, in sample order.
    """
    order = sorted(
        (i for i in range(len(directions)) if i not in banned),
        key=lambda i: -int(patterns[i].sum()),
    )
    kept: list[int] = []
    for i in order:
        trial = torch.stack([directions[j] for j in [*kept, i]], 1)
        if int(torch.linalg.matrix_rank(trial, rtol=_INDEPENDENT)) == len(kept) + 1:
            kept.append(i)
        if len(kept) == k:
            break
    cols = [directions[i] for i in kept]
    if len(kept) < k:  # complete Q with directions orthogonal to those found
        eye = torch.eye(k, dtype=torch.float64)
        basis = torch.linalg.qr(torch.cat([torch.stack(cols, 1), eye], 1) if cols else eye).Q
        cols += [basis[:, j] for j in range(len(kept), k)]
    qmat = torch.stack(cols, 1)  # (k, k)
    lq = lmat @ qmat  # (m, k): the samples' δ up to scale
    scale = torch.linalg.lstsq(lq, bias_grad[:, None]).solution.squeeze(1)  # Δᵀ·1 = ∂L/∂b
    scale = torch.where(scale.abs() > 1e-300, scale, torch.ones_like(scale))
    deltas = (lq * scale).T  # (k, m)
    inputs = torch.linalg.solve(qmat * scale, rmat)  # (k, n): X = (Q·diag(c))⁻¹ R
    zeros = _zero_sets(deltas.T, torch.ones(lmat.shape[0], dtype=torch.bool), eps)
    active = (inputs @ weight.T + bias) > 0  # (k, m)
    mismatch = (active == zeros).double().mean(1)  # active must be exactly the non-zeros
    consistent = mismatch <= 5e-3
    consistent[len(kept) :] = False
    return inputs, deltas, mismatch, consistent, kept


def _settle(solve, patterns: list[torch.Tensor]):
    """Solve, then ban mixtures while doing so makes more samples consistent.

    A direction that mixes samples a and b (it zeroes where both are
    inactive) can enter the greedy choice before b's own direction is found.
    With it in place of b's, every other sample is still recovered exactly
    (its dual row is unchanged) and only a and the mixture come out
    inconsistent; the mixture is the sparser-zeroed of the two, so it is
    banned first. A ban is kept only if it raises the consistent count.

    Bans hold for this call only: each new direction found re-settles from
    none banned. While a sample's direction is missing, the orthogonal
    completion makes the consistent count unreliable (it can rise when a
    *true* direction is dropped), and a ban carried over from then kept that
    sample out for good (B = 16 on CIFAR-10: 15 of 16 directions after 2·10⁶
    draws, with the last one found and banned).
    """
    banned: set[int] = set()
    best = solve(frozenset(banned))
    while True:
        bad = [i for i, ok in zip(best[4], best[3].tolist()) if not ok]
        if not bad:
            return best
        worst = min(bad, key=lambda i: int(patterns[i].sum()))
        trial = solve(frozenset(banned | {worst}))
        if int(trial[3].sum()) <= int(best[3].sum()):
            return best
        banned.add(worst)
        best = trial


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
