"""Parameter and input checks shared by the robust aggregation rules.

Each check raises ``ValueError`` naming the rule and the condition that failed,
so a bad configuration is one clear line; :func:`_prepare` turns the inputs
into a float64 (n, d) stack and normalised weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_f(rule: str, f: object) -> None:
    if not (_is_int(f) and f >= 0):  # type: ignore[operator]
        raise ValueError(f"{rule} needs f (the number of Byzantine clients) >= 0; got {f!r}")


def _check_m(rule: str, m: object) -> None:
    if m is not None and not (_is_int(m) and m >= 1):  # type: ignore[operator]
        raise ValueError(f"{rule} needs m >= 1 (or None for n - f); got {m!r}")


def _check_beta(rule: str, beta: object) -> None:
    if not (isinstance(beta, int | float) and 0 <= beta < 0.5):
        raise ValueError(
            f"{rule} needs 0 <= beta < 0.5 (the fraction cut from each end); got {beta!r}"
        )


def _check_positive(name: str) -> Callable[[str, object], None]:
    def check(rule: str, value: object) -> None:
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"{rule} needs {name} > 0; got {value!r}")

    return check


def _check_count(name: str) -> Callable[[str, object], None]:
    def check(rule: str, value: object) -> None:
        if not (_is_int(value) and value >= 1):  # type: ignore[operator]
            raise ValueError(f"{rule} needs {name} to be an integer >= 1; got {value!r}")

    return check


def _check_tol(rule: str, tol: object) -> None:
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"{rule} needs tol >= 0; got {tol!r}")


_PARAM_CHECKS: dict[str, Callable[[str, object], None]] = {
    "f": _check_f,
    "m": _check_m,
    "beta": _check_beta,
    "nu": _check_positive("nu"),
    "max_iter": _check_count("max_iter"),
    "tol": _check_tol,
    "tau": _check_positive("tau"),
    "iterations": _check_count("iterations"),
    "confidence": _check_positive("confidence"),
}


def _check_params(rule: str, params: dict[str, Any]) -> None:
    """Checks of parameter values that do not depend on the number of clients."""
    for name, value in params.items():
        if name in _PARAM_CHECKS:
            _PARAM_CHECKS[name](rule, value)


def _prepare(rule: str, updates: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``updates`` as float64 (n, d) and ``weights`` normalised to sum 1 (or ``None``)."""
    if not isinstance(updates, torch.Tensor) or updates.ndim != 2 or updates.shape[0] == 0:
        shape = tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates)
        raise ValueError(f"{rule} needs updates of shape (n, d) with n >= 1; got {shape}")
    if not updates.is_floating_point():
        raise ValueError(f"{rule} needs floating-point updates; got {updates.dtype}")
    x = updates.to(torch.float64)
    if weights is None:
        return x, None
    w = torch.as_tensor(weights, dtype=torch.float64, device=updates.device)
    if w.shape != (updates.shape[0],):
        raise ValueError(
            f"{rule} needs one weight per update: shape ({updates.shape[0]},); got {tuple(w.shape)}"
        )
    if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"{rule} needs finite non-negative weights with a positive sum")
    return x, w / w.sum()


def _uniform(x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
