"""Misbehaving (poisoning) clients: wrappers around an honest :class:`~fl_core.client.Client`.

Each adversary holds an honest client and exposes the same interface
(``client_id``, ``len()``, ``protocol()``, ``compute_update``), so the server
uses it like any other client (composition, never subclassing). Outside its
:class:`Schedule` of rounds it *is* the honest client, bit for bit. Inside, its
update keeps the honest metadata (``kind``, ``num_samples``, ``client_id``,
``round``) and the wrapped client's protocol, so nothing but the tensors gives
it away.

Update conventions (see :mod:`fl_core.server`): a FedSGD update is a gradient
``g`` (the server moves θ ← θ − η·g), a FedAvg update is a delta
``Δ = w_l − w_g`` (the server moves θ ← θ + η·Δ). ``w_g`` below is the global
model the client received, ``w_l`` its honestly trained local model.

* :class:`Byzantine` (modes as in FedMLSecurity, Han et al. 2023,
  arXiv:2306.04959; Blanchard et al. 2017 for the Byzantine threat model):
  ``zero`` sends all zeros; ``random`` sends a model drawn U[−1, 1) (delta
  ``w_rand − w_g``; for FedSGD a gradient drawn U[−1, 1)); ``flip`` sends
  ``w_g + (w_g − w_l)``, i.e. ``−Δ`` (for FedSGD ``−g``).
* :class:`LabelFlipping` (Tolpegin et al. 2020, "Data Poisoning Attacks Against
  Federated Learning Systems"): honest training on relabelled data.
* :class:`ModelReplacement` (Bagdasaryan et al. 2020, "How To Backdoor
  Federated Learning"): the delta scaled by γ, optionally trained on
  backdoor-poisoned data.
* :class:`LazyWorker`: resends a stale update, or the global model back.
  FedMLSecurity's lazy worker never fires (a known bug of FedML's
  ``python/fedml/core/security/attack/lazy_worker.py``, FedML-AI/FedML); this
  one does, whenever the schedule says so.

Every adversary is an :class:`Adversary` (the public marker a defense checks
to tell poisoning clients from honest ones). In its malicious rounds it
computes its attack from the plain client it wraps; outside them it computes
through :attr:`Adversary.honest`, which is that same client unless a training
defense replaced it (:meth:`Adversary.with_honest`: under DP-SGD the honest
rounds run DP-SGD like every honest client, while the attack is sent as the
attacker computes it, not through DP-SGD).

The base class and the pure update math are in :mod:`fl_core.adversary_base`;
this module holds the four kinds, their registry and :func:`poison_clients`.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from .adversary_base import (
    Adversary,
    _plain,
    flip_update,
    random_update,
    zero_update,
)
from .backdoor import PixelTrigger, apply_trigger, backdoor_success
from .client import Client
from .registry import Registry
from .schedule import Schedule, select_malicious
from .types import GroundTruth, Update

__all__ = [
    "ADVERSARIES",
    "Adversary",
    "BYZANTINE_MODES",
    "Byzantine",
    "LAZY_MODES",
    "LabelFlipping",
    "LazyWorker",
    "ModelReplacement",
    "PixelTrigger",
    "Schedule",
    "apply_trigger",
    "backdoor_success",
    "flip_update",
    "make_adversary",
    "poison_clients",
    "random_update",
    "select_malicious",
    "zero_update",
]

log = logging.getLogger(__name__)

BYZANTINE_MODES = ("flip", "random", "zero")
LAZY_MODES = ("global", "stale")

_Wrapper = Adversary  # the earlier private name


# --------------------------------------------------------------------------- Byzantine


class Byzantine(Adversary):
    """A Byzantine client (FedMLSecurity's modes, Han et al. 2023, arXiv:2306.04959).

    In its rounds, with ``w_g`` the global model received:

    * ``zero``: all-zero tensors (FedAvg: the global model back; FedSGD: no
      step). No local computation, no draws.
    * ``random``: FedAvg sends the delta ``w_rand − w_g`` with ``w_rand ~ U[−1, 1)``
      per coordinate, so the *model* it sends is uniform random (FedML's random
      mode replaces the weights). FedSGD sends a gradient drawn U[−1, 1)
      (there is no model to send). No local computation; the draws come from
      the round's ``generator``, in parameter order.
    * ``flip``: computes its honest update ``u`` and sends ``−u``: for FedAvg the
      model ``w_g + (w_g − w_l)`` (delta ``−Δ``), for FedSGD ``−g``.

    ``zero`` and ``random`` report ``protocol().num_samples`` samples, the global
    buffers and an empty ground truth; ``flip`` keeps the honest update's
    metadata, buffers and ground truth.

    Args:
        client: the honest client wrapped.
        mode: ``"zero"``, ``"random"`` or ``"flip"``.
        rounds: ``(start, stop)`` of the malicious rounds (stop exclusive,
            ``None`` forever) or a :class:`Schedule`.
    """

    def __init__(
        self,
        client: Any,
        *,
        mode: Literal["zero", "random", "flip"],
        rounds: Schedule | tuple[int, int | None] | None = None,
    ) -> None:
        if mode not in BYZANTINE_MODES:
            raise ValueError(
                f"unknown Byzantine mode {mode!r}; valid modes: {', '.join(BYZANTINE_MODES)}"
            )
        super().__init__(client, rounds)
        self.mode = mode

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """This round's update (same contract as ``Client.compute_update``)."""
        if not self.active(round):
            return self.honest.compute_update(model, round=round, generator=generator)
        params = [p.detach() for p in model.parameters()]  # (w_g), as received
        if self.mode == "zero":
            return self._no_work(model, round, zero_update(params))
        if self.mode == "random":
            return self._no_work(model, round, random_update(params, self._kind(), generator))
        update, truth = self.client.compute_update(model, round=round, generator=generator)
        return update.with_tensors(flip_update(update.tensors)), truth


# --------------------------------------------------------------------------- label flipping


def _label_map(
    num_classes: int,
    mapping: dict[int, int] | None,
    source: Sequence[int] | None,
    target: Sequence[int] | None,
) -> torch.Tensor:
    """A lookup table (K,) sending each class to its flipped class."""
    if num_classes < 2:
        raise ValueError(f"num_classes {num_classes}: use at least 2")
    if mapping is not None and (source is not None or target is not None):
        raise ValueError("give mapping= or source=/target=, not both")
    if (source is None) != (target is None):
        raise ValueError("source= and target= go together (source[i] -> target[i])")
    if source is not None:
        if len(source) != len(target):
            raise ValueError(f"source has {len(source)} classes and target {len(target)}")
        mapping = dict(zip(source, target))
        if len(mapping) != len(source):
            raise ValueError(f"source classes {list(source)} contain duplicates")
    table = torch.arange(num_classes - 1, -1, -1)  # default y -> K - 1 - y
    if mapping is not None:
        classes = [int(c) for kv in mapping.items() for c in kv]
        bad = sorted({c for c in classes if not 0 <= c < num_classes})
        if bad:
            raise ValueError(f"classes {bad} are outside 0..{num_classes - 1}")
        table = torch.arange(num_classes)
        for s, t in mapping.items():
            table[int(s)] = int(t)
    return table


class LabelFlipping(Adversary):
    """Label flipping (Tolpegin et al. 2020, ESORICS; FedMLSecurity's 3 → 9, 2 → 1).

    In its rounds the client trains honestly on a relabelled copy of its data
    (the same images, new labels; the wrapped client's labels are never
    touched). Default mapping ``y → K − 1 − y`` (the "one-round robust
    aggregation" study's ``y → 9 − y`` for K = 10); or explicit
    ``source[i] → target[i]``, other classes unchanged.

    Args:
        client: the honest :class:`~fl_core.client.Client` wrapped.
        mapping: ``{source: target}`` (exclusive with ``source``/``target``).
        source: classes to relabel.
        target: their new labels, one per source class.
        num_classes: K.
        rounds: the malicious rounds, see :class:`Schedule`.
    """

    def __init__(
        self,
        client: Client,
        *,
        mapping: dict[int, int] | None = None,
        source: Sequence[int] | None = None,
        target: Sequence[int] | None = None,
        num_classes: int = 10,
        rounds: Schedule | tuple[int, int | None] | None = None,
    ) -> None:
        super().__init__(_plain(client, "LabelFlipping"), rounds)
        self.table = _label_map(num_classes, mapping, source, target)  # (K,)
        labels = client.labels
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"client labels fall outside 0..{num_classes - 1}: set num_classes")
        self.poisoned = copy.copy(client)  # shares the images, owns its labels
        self.poisoned.labels = self.table.to(labels.device)[labels]

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """Honest update on the relabelled copy in its rounds, on the real data otherwise."""
        who = self.poisoned if self.active(round) else self.honest
        return who.compute_update(model, round=round, generator=generator)


# --------------------------------------------------------------------------- backdoors


class ModelReplacement(Adversary):
    """Model replacement (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning").

    In its rounds the client sends its update scaled by ``gamma``: for FedAvg
    the delta ``γΔ``, i.e. the model ``w_g + γ(w_l − w_g)`` (γ = M/η, the
    number of clients over the server learning rate, replaces the global model
    by ``w_l`` under plain FedAvg); for FedSGD the gradient ``γg``.

    With ``target`` set, ``w_l`` is trained on a backdoor-poisoned copy of the
    client's data: a fixed subset of ``round(poison_fraction · n)`` samples
    (at least one), chosen once by ``torch.Generator().manual_seed(seed)``, gets
    the trigger stamped on its images and its labels set to ``target``; the
    other samples stay clean (the paper mixes backdoor and clean samples to
    keep main-task accuracy). The wrapped client's data are not touched.

    Args:
        client: the honest client (a plain :class:`~fl_core.client.Client` when
            ``target`` is set).
        gamma: the scale γ > 0.
        target: the backdoor label (``None``: scaling only, no backdoor data).
        trigger: a callable ``images -> images``; default :class:`PixelTrigger`
            (a white 3x3 square in the bottom-right corner).
        poison_fraction: share of the client's samples poisoned, in (0, 1].
        seed: seed of the choice of poisoned samples.
        rounds: the malicious rounds, see :class:`Schedule`.
    """

    def __init__(
        self,
        client: Any,
        *,
        gamma: float,
        target: int | None = None,
        trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
        poison_fraction: float = 0.5,
        seed: int = 0,
        rounds: Schedule | tuple[int, int | None] | None = None,
    ) -> None:
        if not gamma > 0 or math.isinf(gamma):
            raise ValueError(f"gamma {gamma}: use a finite scale > 0")
        if not 0 < poison_fraction <= 1:
            raise ValueError(f"poison_fraction {poison_fraction}: use a share in (0, 1]")
        if trigger is not None and target is None:
            raise ValueError("a trigger needs target= (the backdoor label)")
        super().__init__(client, rounds)
        self.gamma = float(gamma)
        self.target = target
        self.trigger = trigger if trigger is not None or target is None else PixelTrigger()
        self.poisoned: Client | None = None
        if target is not None:
            plain = _plain(client, "ModelReplacement with a backdoor")
            if target < 0:
                raise ValueError(f"target {target}: use a class index >= 0")
            n = len(plain)
            k = max(1, round(poison_fraction * n))
            g = torch.Generator().manual_seed(seed)
            self.poison_index = torch.randperm(n, generator=g)[:k].sort().values  # (k,)
            images, labels = plain.images.clone(), plain.labels.clone()
            idx = self.poison_index.to(images.device)
            images[idx] = self.trigger(images[idx])
            labels[idx] = target
            self.poisoned = copy.copy(plain)
            self.poisoned.images, self.poisoned.labels = images, labels

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """``γ ×`` the (backdoor-trained) update in its rounds; honest otherwise."""
        if not self.active(round):
            return self.honest.compute_update(model, round=round, generator=generator)
        who = self.poisoned if self.poisoned is not None else self.client
        update, truth = who.compute_update(model, round=round, generator=generator)
        return update.with_tensors([self.gamma * t for t in update.tensors]), truth


# --------------------------------------------------------------------------- lazy worker


class LazyWorker(Adversary):
    """A lazy (free-riding) client that does not train in its rounds.

    * ``stale``: resends its last honest update (tensors, ``num_samples`` and
      buffers as computed then; ``round`` set to now). Every honest update it
      computes, inside or outside its rounds, is remembered; the first time it
      is sampled in its rounds without one, it computes one honestly and sends
      it. The ground truth is that of the stale update, with ``round`` set to now.
    * ``global``: sends zeros, i.e. the global model back (FedAvg delta 0;
      FedSGD gradient 0), with ``protocol().num_samples`` samples, the global
      buffers and an empty ground truth. As an update this equals Byzantine
      ``zero``; the two differ in intent (free-riding vs. sabotage).

    FedMLSecurity's lazy worker never fires (FedML-AI/FedML,
    ``python/fedml/core/security/attack/lazy_worker.py``); this one fires in
    every round of its schedule in which it is sampled.

    Args:
        client: the honest client wrapped.
        mode: ``"stale"`` or ``"global"``.
        rounds: the lazy rounds, see :class:`Schedule`.
    """

    def __init__(
        self,
        client: Any,
        *,
        mode: Literal["stale", "global"] = "stale",
        rounds: Schedule | tuple[int, int | None] | None = None,
    ) -> None:
        if mode not in LAZY_MODES:
            raise ValueError(f"unknown lazy mode {mode!r}; valid modes: {', '.join(LAZY_MODES)}")
        super().__init__(client, rounds)
        self.mode = mode
        self.last: tuple[Update, GroundTruth] | None = None

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """The stale update or zeros in its rounds; honest (and remembered) otherwise."""
        if self.active(round) and self.mode == "global":
            return self._no_work(
                model, round, zero_update([p.detach() for p in model.parameters()])
            )
        if self.active(round) and self.last is not None:
            update, truth = self.last
            return replace(update, round=round), replace(truth, round=round)
        update, truth = self.honest.compute_update(model, round=round, generator=generator)
        self.last = (update, truth)
        return update, truth

    def client_state(self) -> tuple[Update, GroundTruth] | None:
        """What it carries between rounds (its remembered update), for engines that move it."""
        return self.last

    def load_client_state(self, state: tuple[Update, GroundTruth] | None) -> None:
        """Restore :meth:`client_state` (an engine running the client in another process)."""
        self.last = state


# --------------------------------------------------------------------------- registry


ADVERSARIES: Registry[Adversary] = Registry("adversary")
ADVERSARIES.register("byzantine")(Byzantine)
ADVERSARIES.register("label_flip")(LabelFlipping)
ADVERSARIES.register("model_replacement")(ModelReplacement)
ADVERSARIES.register("lazy")(LazyWorker)


def make_adversary(kind: str, client: Any, **params: Any) -> Adversary:
    """Wrap ``client`` in the adversary registered as ``kind`` (see :data:`ADVERSARIES`).

    Args:
        kind: ``"byzantine"``, ``"label_flip"``, ``"model_replacement"`` or ``"lazy"``.
        client: the honest client.
        **params: the adversary's keyword arguments (``mode``, ``rounds``, ...).

    Raises:
        ValueError: unknown kind, unknown or missing parameter, or a bad value;
            the message names the valid choices.
    """
    factory = ADVERSARIES.get(kind)
    sig = inspect.signature(factory)
    valid = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for adversary {kind!r}; "
            f"valid: {', '.join(valid)}"
        )
    required = [n for n in valid if sig.parameters[n].default is inspect.Parameter.empty]
    missing = [n for n in required if n not in params]
    if missing:
        raise ValueError(f"adversary {kind!r} needs parameter(s) {', '.join(missing)}")
    return factory(client, **params)


def poison_clients(
    clients: Sequence[Any],
    kind: str,
    *,
    fraction: float | None = None,
    ids: Sequence[int] | None = None,
    seed: int = 0,
    **params: Any,
) -> list[Any]:
    """The client list with the malicious ones wrapped by :func:`make_adversary`.

    Args:
        clients: all clients.
        kind: the adversary kind.
        fraction: share of malicious clients, drawn by :func:`select_malicious`
            over list positions with ``seed``.
        ids: explicit malicious ``client_id`` values (exclusive with ``fraction``).
        seed: seed of the draw.
        **params: the adversary's parameters.

    Returns:
        A new list, same order; malicious clients wrapped, the others as given.
    """
    if (fraction is None) == (ids is None):
        raise ValueError("give exactly one of fraction= or ids=")
    if ids is not None:
        known = [c.client_id for c in clients]
        bad = sorted(set(ids) - set(known))
        if bad:
            raise ValueError(f"malicious ids {bad} are not client ids; valid: {sorted(known)}")
        positions = select_malicious(len(clients), ids=[known.index(i) for i in ids])
    else:
        positions = select_malicious(len(clients), fraction=fraction, seed=seed)
    chosen = set(positions)
    log.info("%s clients: %s", kind, [clients[i].client_id for i in sorted(chosen)])
    return [make_adversary(kind, c, **params) if i in chosen else c for i, c in enumerate(clients)]
