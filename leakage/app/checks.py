"""Value checks for configurations read from YAML files and command-line flags.

Each raises a one-line ``ValueError`` that names the key and what it takes, before
any work is done (any YAML type may arrive: text, lists, dates, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..metrics import (
    DEFAULT_METRICS,
    score_images,
)

NORMALIZE_CHOICES = ("auto", "dataset", "none")
BN_MODES = ("train", "eval")
MAX_SEED = 2**63 - 1
"""Seeds are whole numbers in [0, MAX_SEED] (torch's and numpy's generators both take them)."""


# ----------------------------------------------------------------- value checks
#
# One-line ValueErrors naming the key and what it takes, for values read from YAML
# files and --set flags (any YAML type may arrive: text, lists, dates, ...).


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_whole(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    optional: bool = False,
) -> int | None:
    """``value`` as an int: a whole number (``2.0`` is 2) within ``[low, high]``.

    Booleans, text and fractional numbers are refused; ``None`` only when ``optional``.
    """
    if value is None and optional:
        return None
    bounds = (
        f" in [{low}, {high}]"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    what = f"{name} must be a whole number{bounds}{' or null' if optional else ''}"
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{what}; got {_got(value)}")
    return number


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    above: bool = False,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float, at least ``low`` (more than ``low`` with ``above``).

    Text that reads as a number is taken (YAML reads ``1e-4`` as text); booleans,
    NaN and infinities are refused; ``None`` only when ``optional``.
    """
    if value is None and optional:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if above else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    what = f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}"
    what += " or null" if optional else ""
    number = None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
    except (ValueError, OverflowError):
        number = None
    if (
        number is None
        or not math.isfinite(number)
        or (low is not None and (number <= low if above else number < low))
        or (high is not None and number > high)
    ):
        raise ValueError(f"{what}; got {_got(value)}")
    return number


def check_text(
    name: str, value: Any, *, choices: Sequence[str] | None = None, optional: bool = False
) -> str | None:
    """``value`` as non-empty text (one of ``choices`` when given); ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"unknown {name} {_got(value)}; valid: {', '.join(choices)}")
        return value
    if not isinstance(value, str) or not value.strip():
        what = "non-empty text" + (" or null" if optional else "")
        raise ValueError(f"{name} must be {what}; got {_got(value)}")
    return value


def build_checked(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` for a config dataclass, refusing unknown keys with the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    return cls(**values)


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool: YAML's true or false only."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {_got(value)}")
    return value


def check_device(name: str, value: Any) -> str:
    """A torch device name that this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    check_text(name, value)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {value!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {value!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: no CUDA device here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 .. cuda:N-1"
        )
    return value


def check_scorable(
    shape: Sequence[int],
    what: str = "shape",
    *,
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    lpips_net: str = "alex",
) -> None:
    """Raise a one-line error unless images of ``shape`` (C, H, W) can be scored.

    Runs :func:`~leakage.metrics.score_images` with ``metrics`` on one blank pair of
    that shape (cheap; capped at 64 x 64, as they need a minimum size only), so what
    the metrics need (SSIM's window and LPIPS's backbone fitting in the image) is
    checked before any attack is run, not after it. With ``lpips`` among the metrics
    this also loads the LPIPS network (kept for the scoring), so a missing ``lpips``
    package (ImportError) or backbone weights that cannot be downloaded (OSError)
    are found here too.

    Raises:
        ValueError: If the metrics cannot score images of ``shape``.
        ImportError, OSError: If LPIPS is asked for and its package or weights are
            missing (one-line messages from :func:`~leakage.metrics.lpips`).
    """
    c, h, w = (int(s) for s in shape)
    blank = torch.zeros(1, c, min(h, 64), min(w, 64))  # the metrics need a minimum size only
    try:
        score_images(blank, blank, data_range=1.0, metrics=metrics, lpips_net=lpips_net)
    except ValueError as e:
        text = " ".join(str(s) for s in shape)
        raise ValueError(f"{what} {text} cannot be scored: {str(e).splitlines()[0]}") from None
