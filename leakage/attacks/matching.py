"""What optimisation-based attacks share: precision, random starts, labels.

An optimisation attack solves R independent problems (restarts) at once: the
dummy images of all restarts form one tensor (R, N, C, H, W) and the
:class:`~leakage.simulate.UpdateSimulator` turns them into R simulated updates
in one batched call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fl_core.types import Observation

from ..simulate import UpdateSimulator
from .base import Reconstruction

__all__ = [
    "SMALL_MODEL",
    "OptimisationAttack",
    "Setup",
    "attack_labels",
    "random_starts",
    "resolve_init",
    "setup",
]

SMALL_MODEL = 1_000_000
"""Parameter count below which ``dtype="auto"`` means float64 for L-BFGS attacks."""

NATIVE_CONV_MODEL = 100_000
"""Parameter count below which one or two problems run on the native CPU convolutions."""

INITS = ("auto", "uniform", "randn")


def resolve_init(init: str, spec) -> str:
    """``"auto"``: ``"randn"`` (N(0, 1) in normalised coordinates, i.e. the data's own
    mean and spread) for a victim that normalises its input, ``"uniform"`` (U[0, 1]
    pixels) for one that does not, where N(0, 1) pixels would start mostly outside
    the image range."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "auto":
        return "randn" if spec.normalize is not None else "uniform"
    return init


@dataclass
class Setup:
    """An attack's working state for one observation.

    Attributes:
        sim: the differentiable update simulator (holds the victim and target).
        dtype: precision of the attack.
        device: where it runs.
        small: whether the victim has fewer than :data:`SMALL_MODEL` parameters.
    """

    sim: UpdateSimulator
    dtype: torch.dtype
    device: torch.device
    small: bool

    @contextlib.contextmanager
    def backend(self, problems: int):
        """The fastest CPU convolution path for ``problems`` images evaluated together.

        Measured on 2 cores with the LeNet victim (double backward, ms per
        evaluation; ``benchmarks/attack_suite.py --restart-cost``): for one
        image the native path beats oneDNN (1.6 vs 3.8 ms in float32), for eight
        oneDNN wins (5.4 vs 6.5 ms); float64 always takes the native path. Larger
        victims keep oneDNN: ResNet-20 (0.27M parameters), one image, eval mode, 25 ms per
        evaluation with oneDNN against 34 ms without.
        """
        tiny = sum(t.numel() for t in self.sim.params.values()) < NATIVE_CONV_MODEL
        native = (
            self.device.type == "cpu"
            and self.small
            and (self.dtype == torch.float64 or (problems <= 2 and tiny))
        )
        if not native:
            yield
            return
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before


SUPPORTS = ("all", "nonzero")


def setup(
    obs: Observation,
    *,
    dtype: str,
    device: str | torch.device | None,
    lbfgs: bool,
    support: str = "all",
) -> Setup:
    """Resolve precision and device and build the simulator.

    Args:
        dtype: ``"float32"``, ``"float64"`` or ``"auto"``: float64 for L-BFGS
            attacks on victims below :data:`SMALL_MODEL` parameters (L-BFGS keeps
            converging past the float32 floor there), float32 otherwise.
        lbfgs: whether the attack uses L-BFGS.
        support: ``"all"`` (match every entry of the update) or ``"nonzero"``
            (match only the entries the observed update kept, the adaptive
            attack on pruning; see :meth:`UpdateSimulator.restrict_to_support`).
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {', '.join(SUPPORTS)}; got {support!r}")
    if dtype not in ("auto", "float32", "float64"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'float64'; got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no GPU is available; use device cpu")
    small = sum(p.numel() for p in obs.parameters) < SMALL_MODEL
    if dtype == "auto":
        dt = torch.float64 if (small and lbfgs) else torch.float32
    else:
        dt = getattr(torch, dtype)
    sim = UpdateSimulator(obs, dtype=dt, device=device)
    if support == "nonzero":
        sim.restrict_to_support()
    return Setup(sim, dt, device, small)


def random_starts(
    obs: Observation,
    restarts: int,
    *,
    init: str,
    learn_labels: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial dummy images (R, N, C, H, W) and label logits (R, N, K) or ``None``.

    Drawn restart by restart (images, then label logits), so restart r starts
    from the same point whether it runs alone or batched with others.

    Args:
        init: ``"uniform"`` (U[0, 1], the valid pixel range), ``"randn"`` (N(0, 1),
            DLG's code; meant for the attack's normalised coordinates) or
            ``"auto"`` (see :func:`resolve_init`).
    """
    init = resolve_init(init, obs.model_spec)
    n = obs.protocol.num_samples
    spec = obs.model_spec
    draw = torch.rand if init == "uniform" else torch.randn
    xs, ys = [], []
    for _ in range(restarts):
        xs.append(draw((n, *spec.in_shape), generator=generator))
        ys.append(torch.randn(n, spec.num_classes, generator=generator))
    return torch.stack(xs), (torch.stack(ys) if learn_labels else None)


def attack_labels(
    obs: Observation, strategy: str, *, generator: torch.Generator
) -> torch.Tensor | None:
    """Labels (N,) from a label strategy, or ``None`` for ``"joint"`` (optimised with the images).

    Fixed labels are given to the dummy samples in sorted order; the order is
    free for a FedSGD batch, but for a FedAvg client with several local batches
    or an aggregate of clients the true assignment of labels to batches is
    unknown, and ``"joint"`` (soft labels optimised per sample) may fit better.
    """
    if strategy == "joint":
        return None
    from ..labels import recover_labels

    return recover_labels(obs, strategy, generator=generator)


class OptimisationAttack:
    """Base of the optimisation attacks' frozen dataclasses.

    :meth:`reconstruct` takes the labels from ``self.label_strategy`` and calls
    the class's ``solver`` with every other field as a keyword argument, so an
    attack class is its options plus one solver function.
    """

    solver: ClassVar[Callable[..., Reconstruction]]
    label_strategy: str

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """Invert ``obs``'s update; returns images (N, C, H, W) and labels (N,)."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        options = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name != "label_strategy"
        }
        return type(self).solver(
            obs, labels=labels, generator=generator, progress=progress, **options
        )
