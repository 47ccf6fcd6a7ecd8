"""Which clients misbehave and when: :class:`Schedule` and :func:`select_malicious`.

Used by the poisoning clients of :mod:`fl_core.adversaries`, which re-exports both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Schedule", "select_malicious"]


@dataclass(frozen=True)
class Schedule:
    """The rounds ``start <= t < stop`` in which an adversary misbehaves.

    Attributes:
        start: first malicious round (>= 0).
        stop: first honest round after the attack (exclusive); ``None``: forever.
    """

    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"rounds start {self.start}: use a round index >= 0")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(
                f"rounds ({self.start}, {self.stop}) is empty: stop must exceed start or be None"
            )

    @classmethod
    def of(cls, rounds: Schedule | tuple[int, int | None] | None) -> Schedule:
        """Coerce ``(start, stop)``, a Schedule or ``None`` (every round) to a Schedule."""
        if rounds is None:
            return cls()
        if isinstance(rounds, Schedule):
            return rounds
        if not isinstance(rounds, (tuple, list)) or len(rounds) != 2:
            raise ValueError(
                f"rounds must be (start, stop) with stop None for forever; got {rounds!r}"
            )
        return cls(int(rounds[0]), None if rounds[1] is None else int(rounds[1]))

    def __contains__(self, round: object) -> bool:
        if not hasattr(round, "__index__") or isinstance(round, bool):
            return False
        t = round.__index__()
        return t >= self.start and (self.stop is None or t < self.stop)


def select_malicious(
    num_clients: int,
    *,
    fraction: float | None = None,
    ids: Sequence[int] | None = None,
    seed: int = 0,
) -> list[int]:
    """Which clients are malicious: explicit ids, or ⌊fraction·M⌋ drawn without replacement.

    Args:
        num_clients: M, the number of clients (ids ``0 .. M−1``).
        fraction: share of malicious clients in [0, 1]; ``⌊fraction·M⌋`` of them
            are drawn by a permutation from ``torch.Generator().manual_seed(seed)``
            (FedMLSecurity's default is 10% of the clients).
        ids: explicit malicious ids (exclusive with ``fraction``).
        seed: seed of the draw (the same seed gives the same clients).

    Returns:
        The malicious ids, sorted.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients {num_clients}: use a positive integer")
    if (fraction is None) == (ids is None):
        raise ValueError("give exactly one of fraction= or ids=")
    if ids is not None:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < num_clients]
        if bad:
            raise ValueError(f"malicious ids {bad} are outside 0..{num_clients - 1}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"malicious ids {ids} contain duplicates")
        return sorted(ids)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: use a share in [0, 1]")
    k = math.floor(fraction * num_clients + 1e-9)  # 0.3 * 10 must give 3
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_clients, generator=g)[:k].tolist())
