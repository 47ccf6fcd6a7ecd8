"""A function through ``torch.compile``, with its eager twin as the fallback.

Used by the client engine's compiled form (:mod:`fl_core.batched`) and by the
attacks' compiled objectives (DLG and iDLG, inverting gradients).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["CompiledObjective"]


class CompiledObjective:
    """``functional`` through ``torch.compile``, ``eager`` where compilation fails.

    ``functional`` must compute what ``eager`` computes with :mod:`torch.func`
    only (``torch.func.grad`` for every derivative), so a whole double backward
    becomes one graph; it receives its tensor arguments detached. The first call
    compiles (one graph per architecture and shape, reused by later calls in the
    process); if it fails, a warning names ``what`` and every call from then on
    runs ``eager``.

    ``lean=True`` cuts the Python work around each call, for objectives called
    thousands of times at a few milliseconds each (DLG's on the LeNet, timed
    both ways in ``benchmarks/results/hot_paths/summary.md``): inductor's
    wrapper is generated as C++ (``cpp_wrapper``), and dynamo's guards (one or
    more per module attribute, parameter and global flag the closure reads) are
    skipped on a call whose tensors have the first call's shapes, dtypes,
    devices and ``requires_grad`` while the function holds one compiled graph
    only. The first call evaluated every guard and selected that
    graph, and a caller that keeps its closure fixed (one attack's victim,
    observation and labels) passes the same guards on every later call. With
    two graphs or more (another architecture compiled through the same
    function in this process) every guard is evaluated, as without ``lean``.
    """

    def __init__(
        self, functional: Callable, eager: Callable, what: str, *, lean: bool = False
    ) -> None:
        # a sweep over many architectures and threat models in one process must
        # not fall back to eager after dynamo's default of 8 graphs per function
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        options = {"cpp_wrapper": True} if lean else None
        self.fast = torch.compile(functional, dynamic=False, options=options)
        self.eager, self.what = eager, what
        self.fn: Callable | None = None
        self._code = getattr(functional, "__code__", None) if lean else None
        self._first: tuple | None = None  # the first call's tensor metadata, when lean

    def _fast(self, *args):
        return self.fast(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

    def __call__(self, *args):
        if self.fn is None:
            try:
                out = self._fast(*args)
            except Exception as e:  # an unsupported model or setting: run eager
                first = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {first}); {self.what} runs eager",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.fn = self.eager
            else:
                self.fn = self._fast
                if self._code is not None:
                    self._first = _metadata(args)
                return out
        if self._first is not None and self._lone() and _metadata(args) == self._first:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._fast(*args)
        return self.fn(*args)

    def _lone(self) -> bool:
        """Whether the compiled function holds exactly one graph."""
        try:
            entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(self._code)
        except (AttributeError, RuntimeError, TypeError):  # not this torch: evaluate the guards
            return False
        return len(entries) == 1


def _metadata(args: tuple) -> tuple | None:
    """Shapes, dtypes, devices and ``requires_grad`` of ``args``; ``None`` (never equal)
    if one is not a tensor."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args)
