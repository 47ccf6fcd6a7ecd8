"""DP-SGD clients through Opacus, with record-level privacy accounting.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
each local step draws a Poisson batch (every record joins independently with
probability ``q``), clips every per-sample gradient to L2 norm ``C``
(``max_grad_norm``), sums them, adds Gaussian noise N(0, (σC)²) per
coordinate (σ = ``noise_multiplier``) and divides by the expected batch size
``q·n``. In federated learning this is *local* DP (DP-FedSGD / DP-FedAvg run on
the client): the update leaving the client is already private, so it protects
the client's records against the server too, unlike central DP, which adds
noise after aggregation (the user-level DP of McMahan, Ramage, Talwar and Zhang,
ICLR 2018, "Learning Differentially Private Recurrent Language Models", whose
server noises the sum of clipped updates, and Flower's server-side wrappers,
``src/py/flwr/server/strategy/dp_fixed_clipping.py`` in adap/flower): there the
server still sees every client's update without noise.

Everything DP is Opacus 1.6's own machinery, not a re-implementation:

* per-sample gradients: :class:`opacus.GradSampleModule`;
* clipping, noise and averaging: :class:`opacus.optimizers.DPOptimizer`, its
  noise drawn from the round's generator;
* Poisson batches: :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`,
  drawn from the round's generator (the sampling the accountant assumes);
* accounting: :class:`opacus.accountants.RDPAccountant` or
  :class:`~opacus.accountants.PRVAccountant`, stepped by Opacus's optimizer hook
  (``get_optimizer_hook_fn``) once per noisy step taken;
* architecture: :class:`opacus.validators.ModuleValidator` (BatchNorm mixes the
  samples of a batch, so it cannot be per-sample clipped; ``fix`` replaces it by
  GroupNorm). The fix is registered as the model converter ``"opacus"``, so it
  travels in the :class:`~fl_core.models.ModelSpec` and the attacker rebuilds
  the same architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from fl_core.client import Client, float_buffers
from fl_core.models import MODEL_CONVERTERS, ModelSpec
from fl_core.types import GroundTruth, Update

from .wrapping import WrappedClient

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_DELTA",
    "DPSGDClient",
    "dp_compatible",
    "privacy_report",
]

log = logging.getLogger(__name__)

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}
"""Accountants by name: Rényi DP (Mironov 2017; Opacus's default) and the PRV
accountant (Gopi, Lee, Wutschitz, NeurIPS 2021; tighter, an upper bound with
``eps_error`` 0.01). Opacus's ``gdp`` is left out: it is a CLT approximation,
not an upper bound."""

DEFAULT_DELTA = 1e-5
"""Default δ (Abadi et al. 2016). δ must stay well below 1 / (records per client):
:func:`privacy_report` warns otherwise."""

CONVERTER = "opacus"


def _opacus_fix(model: nn.Module) -> nn.Module:
    """Opacus's ``ModuleValidator.fix``: BatchNorm -> GroupNorm(gcd(32, C), C) and the like.

    The fix works on a clone and replaces submodules in place of the old ones, so
    the result keeps the victim's class, its ``forward`` and the order of
    ``parameters()`` (GroupNorm has the same weight and bias as the BatchNorm it
    replaces, initialised to 1 and 0 without drawing randomness); the running
    statistics buffers disappear.
    """
    return ModuleValidator.fix(model)


if CONVERTER not in MODEL_CONVERTERS:
    MODEL_CONVERTERS.register(CONVERTER)(_opacus_fix)


def _errors(model: nn.Module) -> list[str]:
    """Opacus's objections to ``model`` (empty when DP-SGD can train it)."""
    found = ModuleValidator.validate(model, strict=False)
    return sorted({str(e).split(".")[0] for e in found})  # "BatchNorm cannot support ..."


def dp_compatible(spec: ModelSpec) -> tuple[ModelSpec, bool]:
    """The spec of an architecture Opacus can train with per-sample gradients.

    Args:
        spec: the victim's architecture.

    Returns:
        ``(spec, False)`` when ``ModuleValidator.validate`` finds nothing to fix,
        else ``(spec with convert="opacus", True)``: BatchNorm converted to
        GroupNorm by Opacus's ModuleValidator.

    Raises:
        ValueError: the spec already names another converter, or the converted
            model still has modules Opacus cannot handle.
    """
    errors = _errors(spec.build())
    if not errors:
        return spec, False
    if spec.convert is not None:
        raise ValueError(
            f"spec uses converter {spec.convert!r} and Opacus still objects ({errors}); "
            f"use convert=None or {CONVERTER!r}"
        )
    fixed = dataclasses.replace(spec, convert=CONVERTER)
    remaining = _errors(fixed.build())
    if remaining:
        raise ValueError(f"Opacus's ModuleValidator cannot fix {spec.name!r}: {remaining}")
    return fixed, True


def _check(noise_multiplier: float, max_grad_norm: float, accountant: str) -> None:
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier}")
    if not max_grad_norm > 0 or math.isinf(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a finite number > 0; got {max_grad_norm}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}; valid names: {', '.join(sorted(ACCOUNTANTS))}"
        )


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")


def _noise_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` on the CPU; on an accelerator a generator of that device seeded from it
    (Opacus draws the noise on the parameters' device with the generator it is given)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


class DPSGDClient(WrappedClient):
    """A client that trains with DP-SGD (Opacus) and accounts for its privacy loss.

    A wrapper: it holds a :class:`~fl_core.client.Client` and replaces its local
    computation; the server uses it like a client (``client_id``,
    ``protocol()``, ``compute_update``).

    Semantics per round, with ``n = len(client)``, ``b`` the client's batch size
    (``None`` or more than ``n``: ``n``) and sample rate ``q = b / n``:

    * FedSGD: one DP-SGD step; the update is the noisy averaged clipped
      gradient ``(Σ_i clip_C(∇ℓ_i) + N(0, (σC)² I)) / b`` of one Poisson batch,
      not applied (kind ``"gradient"``). With σ = 0, ``C`` large and ``q = 1``
      it equals the plain client's mean gradient up to float rounding.
    * FedAvg: ``local_steps`` DP-SGD steps with the client's ``lr`` and
      ``momentum``, each on a fresh Poisson batch; the update is
      θ_local − θ_global (kind ``"delta"``).

    Poisson batches vary in size and may be empty (then the step is pure noise,
    as in Opacus's data loader). What crosses to the server besides the tensors
    is data-independent: ``Update.num_samples``, ``Update.weight`` and the
    protocol are the plain client's (``b`` for FedSGD, ``min(n, b·local_steps)``
    for FedAvg; the weight n or that count, see ``LocalTraining.weighting``),
    so the sampled batch size is never revealed; ``protocol().batch_size`` is the
    *expected* batch size. The dataset size ``n`` is treated as public protocol
    metadata, as for every client in the lab. The ground truth holds the
    samples actually used (possibly none).

    The model passed to :meth:`compute_update` is left untouched: DP-SGD runs on
    a private deep copy wrapped in a ``GradSampleModule`` whose hooks are removed
    afterwards.

    Guarantee: after the recorded steps, each client's update sequence is
    (ε, δ)-DP with respect to adding or removing one record of that client's
    local dataset, against anyone who sees its updates, the server included
    (:meth:`epsilon`). Client sampling by the server is not counted (it would
    only amplify privacy, so the figure is conservative).

    Args:
        client: the wrapped client (its data and ``LocalTraining``).
        noise_multiplier: σ, noise std relative to ``max_grad_norm`` (0: no noise,
            ε infinite).
        max_grad_norm: C, the per-sample gradient clipping norm.
        accountant: ``"rdp"`` or ``"prv"`` (see :data:`ACCOUNTANTS`).
        secure_mode: Opacus's noise robust to floating-point attacks (Jin et al.
            2022, arXiv:2112.05307; the fix of Holohan and Braghin 2021,
            arXiv:2107.10138); the noise is still drawn from the round's seeded
            generator, so runs stay reproducible, not cryptographically secure.
    """

    def __init__(
        self,
        client: Client,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        accountant: str = "rdp",
        secure_mode: bool = False,
    ) -> None:
        _check(noise_multiplier, max_grad_norm, accountant)
        self.client = client
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.accountant_name = accountant
        self.accountant: IAccountant = ACCOUNTANTS[accountant]()
        self.secure_mode = bool(secure_mode)

    # ------------------------------------------------------------ DP parameters

    @property
    def expected_batch_size(self) -> int:
        """``b = min(batch_size, n)``, or ``n`` for full-batch training."""
        b = self.client.training.batch_size
        return len(self) if b is None else min(b, len(self))

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate ``q = b / n``."""
        return self.expected_batch_size / len(self)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far (over all rounds this client was sampled)."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self, delta: float = DEFAULT_DELTA) -> float:
        """ε spent so far at ``delta`` (0 before any step, ``inf`` without noise)."""
        _check_delta(delta)
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # Opacus's RDP returns inf, its PRV fails: answer directly
        with np.errstate(divide="ignore"):  # PRV at q = 1 takes log(0) on its way to the answer
            return float(self.accountant.get_epsilon(delta))

    # ------------------------------------------------------------ local computation

    def compute_update(
        self, model: nn.Module, *, round: int = 0, generator: torch.Generator
    ) -> tuple[Update, GroundTruth]:
        """Compute this round's update with DP-SGD (same contract as ``Client.compute_update``).

        Args:
            model: a working copy holding the global weights (left unchanged).
            round: round index, recorded in the update.
            generator: the client's randomness for this round: Poisson batches,
                then each step's noise, in order.

        Returns:
            ``(update, ground_truth)``; the ground truth holds the samples of
            the round's Poisson batches, ``(k, C, H, W)`` with ``k >= 0``.

        Raises:
            ValueError: the model has modules Opacus cannot train (BatchNorm):
                build the global model from :func:`dp_compatible`'s spec.
        """
        errors = _errors(model)
        if errors:
            raise ValueError(
                f"model has modules DP-SGD cannot train ({'; '.join(errors)}); "
                "build the global model from dp_compatible(spec)"
            )
        t = self.client.training
        fedsgd = t.algorithm == "fedsgd"
        private = copy.deepcopy(model).train()
        params = list(private.parameters())  # model.parameters() order
        device = params[0].device
        start = [p.detach().clone() for p in params]
        sampler = UniformWithReplacementSampler(
            num_samples=len(self),
            sample_rate=self.sample_rate,
            generator=generator,
            steps=1 if fedsgd else t.local_steps,
        )
        # Per-sample gradients of the summed loss are the individual ∇ℓ_i; the
        # optimizer averages by the *expected* batch size (loss_reduction="mean").
        gsm = GradSampleModule(private, loss_reduction="sum")
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=_noise_generator(generator, device),
            secure_mode=self.secure_mode,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))
        batches: list[torch.Tensor] = []
        try:
            for indices in sampler:
                idx = torch.tensor(indices, dtype=torch.long)  # (k,), k ~ Binomial(n, q)
                batches.append(idx)
                x, y = self.images[idx].to(device), self.labels[idx].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(gsm(x), y, reduction="sum")  # k = 0: empty grad samples
                with warnings.catch_warnings():
                    # torch warns that the first layer's input needs no gradient;
                    # Opacus's hooks only read the output gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                if fedsgd:
                    optimizer.pre_step()  # clip, noise, average, account; no parameter step
                else:
                    optimizer.step()  # the same, then the SGD step
        finally:
            gsm.to_standard_module()  # hooks and grad_sample attributes gone
        if fedsgd:
            tensors = tuple(p.grad.detach().clone() for p in params)
            used = batches[0]
        else:
            tensors = tuple(p.detach() - s for p, s in zip(params, start))
            used = torch.unique(torch.cat(batches))
        update = Update(
            tensors,
            "gradient" if fedsgd else "delta",
            num_samples=self.protocol().num_samples,
            client_id=self.client_id,
            round=round,
            buffers=tuple(b.detach().clone() for b in float_buffers(private)),
            weight=self.protocol().weight,
        )
        truth = GroundTruth(self.images[used], self.labels[used], self.client_id, round)
        return update, truth


def privacy_report(clients: Sequence[DPSGDClient], delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """The run's record-level privacy guarantee, for the results.

    Args:
        clients: the DP clients of a run, sharing accountant, noise multiplier
            and clipping norm (sample rates and steps may differ).
        delta: target δ, below 1 / (records per client).

    Returns:
        A JSON-ready dict: ``accountant``, ``noise_multiplier``,
        ``max_grad_norm``, ``sample_rate`` and ``steps`` (the largest over
        clients), ``delta``, ``epsilon`` (the largest over clients), per-client
        ``clients`` entries (``client_id``, ``sample_rate``, ``steps``,
        ``epsilon``), ``guarantee`` and ``note``.
    """
    if not clients:
        raise ValueError("privacy_report needs at least one DPSGDClient")
    _check_delta(delta)
    settings = {(c.accountant_name, c.noise_multiplier, c.max_grad_norm) for c in clients}
    if len(settings) != 1:
        raise ValueError(
            "clients differ in accountant, noise_multiplier or max_grad_norm; report them apart"
        )
    [(name, sigma, clip)] = settings
    smallest = min(len(c) for c in clients)
    if delta >= 1 / smallest:
        log.warning("delta %g is not below 1/n = %g for the smallest client", delta, 1 / smallest)
    per_client = [
        {
            "client_id": c.client_id,
            "sample_rate": c.sample_rate,
            "steps": c.steps,
            "epsilon": c.epsilon(delta),
        }
        for c in clients
    ]
    return {
        "accountant": name,
        "noise_multiplier": sigma,
        "max_grad_norm": clip,
        "sample_rate": max(c["sample_rate"] for c in per_client),
        "steps": max(c["steps"] for c in per_client),
        "delta": delta,
        "epsilon": max(c["epsilon"] for c in per_client),
        "clients": per_client,
        "guarantee": (
            "record-level (epsilon, delta)-DP of each client's local dataset (add/remove one "
            "record) against anyone who sees its updates, including the server; epsilon is "
            "the maximum over clients"
        ),
        "note": (
            "DP-SGD with Poisson sampling through Opacus; amplification by the server's "
            "client sampling is not counted (conservative)"
        ),
    }
