"""``CompiledObjective``'s lean calls skip dynamo's guards only where they would pass.

Expected values are the closures' arithmetic (x·c + 1), written out here.
"""

from __future__ import annotations

import pytest
import torch

from fl_core.compiled import CompiledObjective


def _affine(c: float):
    def f(x):
        return x * c + 1

    return f


def test_lean_call_with_new_metadata_evaluates_the_guards():
    """A call whose tensor differs from the first call's (dtype, shape) recompiles
    instead of running the first graph without its guards."""
    f = _affine(2.0)
    fast = CompiledObjective(f, f, "the test function", lean=True)
    x = torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(fast(x), torch.full((3,), 3.0, dtype=torch.float64))
    half = fast(torch.ones(3, dtype=torch.float32))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.full((3,), 3.0))
    torch.testing.assert_close(fast(torch.ones(4, dtype=torch.float64)),
                               torch.full((4,), 3.0, dtype=torch.float64))  # fmt: skip


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no fallback to eager either
def test_lean_objectives_sharing_a_function_keep_their_own_graphs():
    """Two closures of one function (one code object, two compiled graphs): each
    lean objective keeps returning its own closure's values, first call included."""
    f, g = _affine(2.0), _affine(3.0)
    a = CompiledObjective(f, f, "a", lean=True)
    b = CompiledObjective(g, g, "b", lean=True)
    x = torch.ones(2, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(a(x), torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(a(x), torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(b(x), torch.full((2,), 4.0, dtype=torch.float64))
        torch.testing.assert_close(b(x), torch.full((2,), 4.0, dtype=torch.float64))
