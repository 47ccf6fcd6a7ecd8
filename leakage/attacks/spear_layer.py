"""SPEAR's algorithm on one ReLU linear layer: the batch from its weight and bias gradients.

The weight gradient's SVD gives L·R; sampled rows of L whose null space makes
L·q sparse give the directions q, which are merged, refined on their zero sets
and filtered greedily, sparsest first; the bias gradient fixes their scales
(Dimitrov et al., NeurIPS 2024). :mod:`leakage.attacks.spear` explains the
method and runs it as an attack.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

__all__ = ["SpearResult", "spear_linear"]

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
