"""Client partitions: item indices split among clients, IID or label-skewed.

The non-IID split draws per-class client shares from a Dirichlet distribution
(Hsu, Qi & Brown, 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv:1909.06335).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .images import IntArrayLike, _check_int, _int_array

__all__ = ["label_skew", "partition_dirichlet", "partition_iid"]

logger = logging.getLogger(__name__)


def partition_iid(num_items: int, num_clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Split ``range(num_items)`` at random into ``num_clients`` near-equal parts.

    Returns:
        ``num_clients`` sorted int64 index tensors whose sizes differ by at most 1.
    """
    n = _check_int(num_items, "num_items", 1)
    k = _check_int(num_clients, "num_clients", 1)
    if k > n:
        raise ValueError(f"num_clients ({k}) exceeds num_items ({n}); use at most {n} clients")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.tensor_split(perm, k)]


def partition_dirichlet(
    labels: IntArrayLike,
    num_clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[torch.Tensor]:
    """Label-skewed split: per class, client shares ~ Dirichlet(alpha) (Hsu et al., 2019).

    Each class's shuffled indices are cut by proportions drawn from
    ``Dirichlet(alpha * ones(num_clients))``; all classes are redrawn until every
    client holds ``min_size`` items. Small ``alpha`` gives each client few classes;
    large ``alpha`` approaches an IID split.

    Args:
        labels: ``(N,)`` int class labels.
        num_clients: number of parts.
        alpha: Dirichlet concentration, > 0.
        seed: seed of ``np.random.default_rng``.
        min_size: minimum items per client.
        max_tries: draws before giving up.

    Returns:
        ``num_clients`` disjoint sorted int64 index tensors covering ``range(N)``.
    """
    y = _int_array(labels, "labels")
    k = _check_int(num_clients, "num_clients", 1)
    min_size = _check_int(min_size, "min_size", 0)
    max_tries = _check_int(max_tries, "max_tries", 1)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not len(y) or min_size * k > len(y):
        raise ValueError(f"{len(y)} items cannot give {k} clients {min_size} each")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for attempt in range(1, max_tries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64).clip(0, len(idx))
            for client, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(m) for m in merged) >= min_size:
            logger.debug("dirichlet partition found on draw %d", attempt)
            return [torch.from_numpy(m) for m in merged]
    raise ValueError(
        f"no draw gave each of {k} clients >= {min_size} items in {max_tries} tries "
        f"(alpha={alpha}); use a larger alpha, fewer clients, or a smaller min_size"
    )


def label_skew(labels: IntArrayLike, parts: Sequence[IntArrayLike], num_classes: int) -> float:
    """Mean total-variation distance between client and global label distributions.

    ``skew = mean_k 0.5 * sum_c |P_k(c) - P(c)|`` over non-empty clients ``k``, with
    ``P`` the label distribution of all ``labels`` and ``P_k`` that of client ``k``.
    0 means every client mirrors the global mix (IID); with balanced classes, one
    class per client gives ``1 - 1/num_classes``.

    Args:
        labels: ``(N,)`` int labels in ``[0, num_classes)``.
        parts: index sequences into ``labels``, one per client.
        num_classes: number of classes.

    Returns:
        The skew, in ``[0, 1]``.
    """
    c = _check_int(num_classes, "num_classes", 1)
    y = _int_array(labels, "labels", high=c)
    if not len(y):
        raise ValueError("labels is empty; pass the label of every item")
    overall = np.bincount(y, minlength=c) / len(y)
    dists = []
    for part in parts:
        idx = _int_array(part, "part indices", high=len(y))
        if idx.size:
            local = np.bincount(y[idx], minlength=c) / idx.size
            dists.append(0.5 * np.abs(local - overall).sum())
    if not dists:
        raise ValueError("parts are all empty; pass at least one non-empty index set")
    return float(np.mean(dists))
