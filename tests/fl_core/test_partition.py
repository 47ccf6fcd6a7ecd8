"""Tests for fl_core.partition: IID and Dirichlet client splits, the skew measure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_core.partition import label_skew, partition_dirichlet, partition_iid


def assert_disjoint_cover(parts: list[torch.Tensor], n: int) -> None:
    assert all(p.dtype == torch.int64 for p in parts)
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))


@pytest.mark.parametrize(("n", "k"), [(10, 3), (100, 7), (5, 5)])
def test_partition_iid_sizes_and_cover(n, k):
    parts = partition_iid(n, k, seed=1)
    assert len(parts) == k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, n)


def test_partition_iid_seeds_and_errors():
    a, b = partition_iid(50, 4, seed=3), partition_iid(50, 4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c = partition_iid(50, 4, seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    for bad in [(5, 0), (5, 6), (0, 1)]:
        with pytest.raises(ValueError):
            partition_iid(*bad)


LABELS = np.arange(1000) % 10  # 1000 labels over 10 classes


def test_partition_dirichlet_cover_min_size_and_seeds():
    parts = partition_dirichlet(LABELS, 10, alpha=0.1, seed=0, min_size=5)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 5
    assert_disjoint_cover(parts, 1000)
    again = partition_dirichlet(torch.from_numpy(LABELS), 10, alpha=0.1, seed=0, min_size=5)
    assert all(torch.equal(p, q) for p, q in zip(parts, again, strict=True))
    other = partition_dirichlet(LABELS, 10, alpha=0.1, seed=1, min_size=5)
    assert not all(torch.equal(p, q) for p, q in zip(parts, other, strict=True))


def test_label_skew_grows_as_alpha_shrinks():
    def mean_skew(alpha: float) -> float:
        return float(np.mean([
            label_skew(LABELS, partition_dirichlet(LABELS, 10, alpha=alpha, seed=s), 10)
            for s in range(3)
        ]))  # fmt: skip

    skews = [mean_skew(a) for a in (0.1, 1.0, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.1  # alpha=100 is close to IID


def test_label_skew_exact_values():
    by_client = [torch.arange(c * 100, (c + 1) * 100) for c in range(10)]
    assert label_skew(LABELS, by_client, 10) == pytest.approx(0.0)  # each mirrors 10 classes
    one_class = [torch.from_numpy(np.flatnonzero(LABELS == c)) for c in range(10)]
    # TV(one-hot, uniform over 10) = 0.5 * (0.9 + 9 * 0.1) = 0.9.
    assert label_skew(LABELS, one_class, 10) == pytest.approx(0.9)


@pytest.mark.parametrize("alpha", [0.0, -1.0, math.nan, math.inf])
def test_partition_dirichlet_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(LABELS, 10, alpha=alpha)


def test_partition_dirichlet_gives_up_with_advice():
    with pytest.raises(ValueError, match="larger alpha"):
        partition_dirichlet(LABELS[:100], 50, alpha=0.01, min_size=2, max_tries=3)
