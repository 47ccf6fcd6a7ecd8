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
    """

    def __init__(self, functional: Callable, eager: Callable, what: str) -> None:
        # a sweep over many architectures and threat models in one process must
        # not fall back to eager after dynamo's default of 8 graphs per function
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fast = torch.compile(functional, dynamic=False)
        self.eager, self.what = eager, what
        self.fn: Callable | None = None

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
                return out
        return self.fn(*args)
