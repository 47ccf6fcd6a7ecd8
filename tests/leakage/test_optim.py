"""The lab's L-BFGS against the textbook.

The expected direction is the two-loop recursion (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Alg. 7.4, with H0 = sᵀy / yᵀy of the newest pair),
written out here independently of the compact form the optimiser uses; the
history's Gram matrices are checked against the products of the stored rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from leakage.optim import LBFGS


def _two_loop(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        q -= alpha * y
        alphas.append(alpha)
    s, y = pairs[-1]
    q *= (s @ y) / (y @ y)
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        q += (alpha - (y @ q) / (y @ s)) * s
    return -q


def _problem(seed: int, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)

    def fun(z):  # a convex quartic: curvature changes along the path
        return 0.5 * z @ a @ z - b @ z + 0.1 * (z**4).sum(), a @ z - b + 0.4 * z**3

    return fun, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("history", "steps"), [(5, 1), (5, 3), (100, 3)])
def test_direction_is_the_two_loop_recursion(history, steps):
    """After a few steps (with the ring of 5 pairs wrapped around), the direction
    from the compact form equals the two-loop recursion on the stored pairs, and
    the matrices it is built from (R, YᵀY), updated one row and column per pair,
    equal those of the stored rows."""
    fun, z = _problem(0)
    opt = LBFGS(fun, z, history=history)
    for _ in range(steps):
        opt.step(4)
    assert len(opt.slots) >= 2
    pairs = [(opt.S[k].clone(), opt.Y[k].clone()) for k in opt.slots]
    d = opt._direction(opt.g)
    want = _two_loop(opt.g, pairs)
    torch.testing.assert_close(d, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    s_rows = torch.stack([s for s, _ in pairs])  # chronological
    y_rows = torch.stack([y for _, y in pairs])
    torch.testing.assert_close(opt.R, (s_rows @ y_rows.T).triu(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(opt.YY, y_rows @ y_rows.T, rtol=1e-10, atol=1e-14)


def test_lbfgs_minimises_the_quartic():
    fun, z = _problem(1)
    opt = LBFGS(fun, z, history=10)
    for _ in range(20):
        opt.step(20)
    _, grad = fun(opt.z)
    # from ~1 at the start; the loss-change tolerance (1e-15) stops it near 1e-8,
    # where the round-off of the passes decides on which side
    assert float(grad.abs().max()) < 1e-7


@pytest.mark.parametrize("history", [5, 100])
@pytest.mark.parametrize("floor", [0.0, math.inf])
def test_float32_pairs_give_the_two_loop_direction_of_the_stored_pairs(history, floor):
    """Pairs kept in float32 under a float64 variable: the direction is the
    two-loop recursion on the pairs as stored (rounded), to float32 accuracy, and
    R and YᵀY are those of the stored rows, whether the changes'
    products come from the gradients' projections (floor 0) or a pass of their
    own (floor inf)."""
    fun, z = _problem(0)
    opt = LBFGS(fun, z, history=history, history_dtype=torch.float32)
    opt.CHANGE_FLOOR = floor
    for _ in range(3):
        opt.step(4)
    assert opt.S.dtype == torch.float32 and len(opt.slots) >= 2
    pairs = [(opt.S[k].double(), opt.Y[k].double()) for k in opt.slots]
    d = opt._direction(opt.g)
    assert d.dtype == torch.float64
    want = _two_loop(opt.g, pairs)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    s_rows = torch.stack([s for s, _ in pairs])
    y_rows = torch.stack([y for _, y in pairs])
    for got, expected in [(opt.R, (s_rows @ y_rows.T).triu()), (opt.YY, y_rows @ y_rows.T)]:
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got.diagonal(), expected.diagonal(), rtol=1e-12, atol=0)


def test_float32_pairs_still_reach_the_optimum():
    """The quartic minimised with float32 pairs gets as close to its optimum as
    with float64 ones (the test above: below 1e-7 from ~1)."""
    fun, z = _problem(1)
    opt = LBFGS(fun, z, history=10, history_dtype=torch.float32)
    for _ in range(20):
        opt.step(20)
    _, grad = fun(opt.z)
    assert float(grad.abs().max()) < 1e-7


def test_history_must_hold_a_pair():
    with pytest.raises(ValueError, match="history must be at least 1"):
        LBFGS(None, torch.zeros(3), history=0)


def test_dlg_rejects_an_empty_history_before_any_work(monkeypatch):
    from leakage.attacks import dlg

    def no_setup(*args, **kwargs):
        raise AssertionError("the history should be checked before the simulator is built")

    monkeypatch.setattr(dlg, "setup", no_setup)
    with pytest.raises(ValueError, match="history must be a positive number of pairs"):
        dlg.match_gradients(None, labels=None, steps=1, restarts=1, history=0)
    with pytest.raises(ValueError, match="history_dtype must be 'float64' or 'float32'"):
        dlg.match_gradients(None, labels=None, steps=1, restarts=1, history_dtype="half")
