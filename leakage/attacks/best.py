"""The strongest applicable attack: every candidate that applies, the best fit kept.

A leakage verdict ("this setting leaks", "this defense holds") is only as good
as the attack behind it. :class:`Best` runs, for one observation, every
candidate attack whose scope covers it — the closed-form ones first (SPEAR,
R-GAP, the analytic first-layer inversion, the Cocktail Party Attack where
registered), then the optimisation ones (inverting gradients, and DLG on small
victims) — and keeps the reconstruction that explains the observed update
best. A candidate out of its scope (R-GAP on a ReLU network, SPEAR on a
sigmoid one, ...) says so with a ``ValueError`` before any work and is skipped.

Which one is best is decided with what the attacker has, never with the
client's data: each reconstruction (with its labels) is pushed through the
attacker's model of the client's computation (:class:`~leakage.simulate.
UpdateSimulator`, the observation's threat model), and the cosine distance
between the update it produces and the observed one ranks the candidates
(Geiping et al. 2020's matching loss, comparable across attacks since every
reconstruction is scored the same way). With ``stop_at`` set, a closed-form
candidate whose update matches to within that distance is taken at once: an
exact recovery cannot be beaten, and the optimisation attacks are not run.

Adaptive forms (Kerckhoffs: the defense is public). Against pruning, the
optimisation candidates match only the entries the observed update kept
(``support``, see :meth:`~leakage.simulate.UpdateSimulator.restrict_to_support`);
against clipping nothing is needed, since R-GAP and the cosine of inverting
gradients are invariant to the update's scale. Not yet adapted: a model of the
quantiser inside the simulation, and averaging over restarts against noise.

The benchmarks report, beside this attacker-side choice, the oracle maximum
over attacks (the defender's worst case); see ``benchmarks/attack_suite.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fl_core.types import Observation

from ..objectives import cosine_distance
from ..simulate import UpdateSimulator
from .base import ATTACKS, Reconstruction

__all__ = ["CANDIDATES", "Best", "update_distance"]

log = logging.getLogger(__name__)

CANDIDATES = ("spear", "rgap", "analytic", "cpa", "ig", "dlg")
"""The candidates in the order they are tried (closed form first)."""
CLOSED_FORM = frozenset({"spear", "rgap", "analytic", "cpa"})
PRUNED = 0.05
"""Fraction of exactly-zero entries from which ``support="auto"`` treats an
update as pruned (an undefended float gradient has next to none; dead ReLU
units give some, and losing their constraints costs little)."""
DLG_MAX_PARAMETERS = 100_000
"""DLG (L-BFGS through the whole victim) runs only on victims smaller than this
(the LeNets and the small CNN); on larger ones it recovers nothing within any
budget the suite can afford."""


def update_distance(
    obs: Observation, images: torch.Tensor, labels: torch.Tensor, *, support: str = "all"
) -> float:
    """1 − cos between the observed update and the one ``images``/``labels`` produce.

    Args:
        obs: the observation (its threat model is simulated).
        images: (N, C, H, W) a reconstruction in pixel space [0, 1].
        labels: (N,) its labels.
        support: ``"all"`` entries, or ``"nonzero"``: only those the observed
            update kept (a pruned update's dropped entries say nothing).

    Returns:
        The cosine distance in [0, 2], computed in float64; ``inf`` when the
        reconstruction does not fit the observation's batch (wrong N).
    """
    sim = UpdateSimulator(obs, dtype=torch.float64)
    if support == "nonzero":
        sim.restrict_to_support()
    if images.shape[0] != sim.num_samples:
        return math.inf
    k = obs.model_spec.num_classes
    y = F.one_hot(labels.long().cpu(), k).to(torch.float64)
    with torch.enable_grad():
        dummy = sim(images.detach().cpu().to(torch.float64)[None], y[None]).detach()  # (1, d)
    return float(cosine_distance(dummy, sim.target)[0])


@dataclass(frozen=True)
class Best:
    """Run every applicable candidate; keep the one whose update fits best.

    Args:
        attacks: candidate names, tried in this order (default
            :data:`CANDIDATES`, those registered). Unknown names are a
            ``ValueError`` listing the registered attacks.
        steps: budget of the optimisation candidates (IG iterations, DLG's
            L-BFGS steps: ``dlg_steps``); ``None`` keeps each attack's default.
        dlg_steps: L-BFGS steps of DLG (``None``: DLG's default).
        restarts: restarts of the optimisation candidates (``None``: theirs).
        label_strategy: passed to the candidates that take one (``None``:
            each attack's default).
        stop_at: take a closed-form candidate at once when its update
            distance is below this (``0`` never stops early).
        support: what the optimisation candidates match: ``"all"`` entries,
            ``"nonzero"`` (the kept ones), or ``"auto"``: ``"nonzero"`` when at
            least :data:`PRUNED` of the observed update's entries are exactly
            zero (a pruned update), ``"all"`` otherwise.
        device: where the optimisation candidates run.

    The result's ``options`` holds ``chosen`` (the kept candidate) and
    ``candidates``: per candidate its update distance and seconds, or why it
    did not apply.
    """

    attacks: tuple[str, ...] | None = None
    steps: int | None = None
    dlg_steps: int | None = None
    restarts: int | None = None
    label_strategy: str | None = None
    stop_at: float = 1e-6
    support: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        names = self.candidates()
        if not names:
            raise ValueError("best needs at least one candidate attack")
        for name in names:
            if name == "best":
                raise ValueError("best cannot be its own candidate")
            ATTACKS.get(name)
        if not (isinstance(self.stop_at, (int, float)) and self.stop_at >= 0):
            raise ValueError(f"stop_at must be a number >= 0; got {self.stop_at!r}")
        if self.support not in ("auto", "all", "nonzero"):
            raise ValueError(f"support must be auto, all or nonzero; got {self.support!r}")

    def candidates(self) -> tuple[str, ...]:
        if self.attacks is not None:
            return tuple(self.attacks)
        return tuple(a for a in CANDIDATES if a in ATTACKS.names())

    def resolve_support(self, obs: Observation) -> str:
        """``"all"`` or ``"nonzero"``: :attr:`support` with ``"auto"`` decided on ``obs``."""
        if self.support != "auto":
            return self.support
        zeros = float((obs.update.flat == 0).double().mean())
        return "nonzero" if zeros >= PRUNED else "all"

    def _build(self, name: str, obs: Observation, support: str):
        """The candidate with this attack's budget, or ``None`` (with why) when out of scope."""
        if name == "dlg" and sum(p.numel() for p in obs.parameters) >= DLG_MAX_PARAMETERS:
            return None, f"victim has >= {DLG_MAX_PARAMETERS} parameters"
        accepted = {f.name for f in dataclasses.fields(ATTACKS.get(name))}
        steps = self.dlg_steps if name == "dlg" else self.steps
        wanted = {
            "steps": steps,
            "restarts": self.restarts,
            "label_strategy": self.label_strategy,
            "device": self.device if self.device != "cpu" else None,
            "support": None if support == "all" else support,
        }
        options = {k: v for k, v in wanted.items() if v is not None and k in accepted}
        return ATTACKS.build(name, **options), None

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """The best candidate's reconstruction of ``obs`` (see the class docstring)."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        report: dict[str, dict] = {}
        best: tuple[float, str, Reconstruction] | None = None
        support = self.resolve_support(obs)
        for name in self.candidates():
            attack, why = self._build(name, obs, support)
            if attack is None:
                report[name] = {"applies": False, "reason": why}
                continue
            start = time.perf_counter()
            try:
                rec = attack.reconstruct(
                    obs, generator=torch.Generator().manual_seed(seed), progress=progress
                )
            except ValueError as e:  # out of the candidate's scope: checked before its work
                report[name] = {"applies": False, "reason": str(e).splitlines()[0]}
                log.info("best: %s does not apply: %s", name, report[name]["reason"])
                continue
            seconds = time.perf_counter() - start
            distance = update_distance(obs, rec.images, rec.labels, support=support)
            report[name] = {"applies": True, "distance": distance, "seconds": round(seconds, 3)}
            log.info("best: %s fits with distance %.3g in %.1f s", name, distance, seconds)
            if best is None or distance < best[0]:
                best = (distance, name, rec)
            if name in CLOSED_FORM and distance < self.stop_at:
                break
        if best is None:
            reasons = "; ".join(f"{k}: {v['reason']}" for k, v in report.items())
            raise ValueError(f"no candidate attack applies to this observation ({reasons})")
        distance, name, rec = best
        return dataclasses.replace(
            rec,
            options={
                **rec.options,
                "chosen": name,
                "distance": distance,
                "support": support,
                "candidates": report,
            },
        )


ATTACKS.register("best")(Best)
