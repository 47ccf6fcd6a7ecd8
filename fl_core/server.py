"""The round loop: sample clients, collect updates, show them to listeners, aggregate.

Hooks (plain callables, so defenses and attackers plug in without the core
knowing them):

* ``client_defenses``: ``f(update, *, generator) -> update``, applied in order
  to every update before it leaves the client;
* ``listeners``: ``f(observation) -> None``, called for every client update of
  every round with exactly what the server sees (attackers are listeners);
* ``aggregate_listeners``: ``f(observation) -> None``, called once per round
  with what a server under secure aggregation sees: the weighted mean of the
  round's updates (:func:`fedavg`), ``client_id`` −1, and a protocol whose
  ``num_samples`` is the total, ``client_samples`` the per-client sample
  counts and ``client_weights`` the per-client weights of the mean (all
  clients must share their local-training settings);
* ``truth_listeners``: ``f(ground_truth) -> None``, the separate channel that
  carries each client's data to the metrics;
* ``aggregator``: ``f(updates) -> tuple[Tensor, ...]``, default
  :func:`fedavg` (the mean weighted by each update's reported ``weight``).
  The clients' BatchNorm statistics (``Update.buffers``) are aggregated by the
  aggregator's ``aggregate_with_buffers(updates) -> (tensors, buffers)`` when
  it has one (the robust rules of ``defenses.robust`` do: each rule also
  governs the buffers, see :class:`~defenses.robust.RobustAggregator`), and
  by :func:`fedavg_buffers` (the same weighted mean) otherwise;
* ``post_aggregation``: ``f(parameters, *, round, generator) -> parameters``,
  applied in order to the new global parameters (e.g. CRFL);
* ``evaluate``: ``f(model) -> dict[str, float]`` after each round;
* ``modification``: a malicious server's ``f(model, *, round, generator) ->
  model``, the model it sends in place of the global one (see
  :mod:`fl_core.malicious`). The clients compute on it as they would on the
  true model, defenses included; every observation of the round says
  ``server="malicious"`` and carries the sent model's spec and weights. The
  round's updates are not applied to the global model (they are gradients of
  the sent model, which may not even share its architecture): the round
  served the attack, not training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .client import Client, float_buffers
from .types import GroundTruth, Observation, Protocol, RoundRecord, Update

__all__ = [
    "ClientResult",
    "ENGINES",
    "Server",
    "aggregate_with_buffers",
    "client_generator",
    "fedavg",
    "fedavg_buffers",
    "round_generator",
]

log = logging.getLogger(__name__)

SERVER_STREAM = 2**31 - 1
"""Generator stream of the server's own draws (post-aggregation noise); clients use 1 + id."""
MALICIOUS_STREAM = 2**31 - 2
"""Generator stream of a malicious server's modification of the model it sends."""

ClientDefense = Callable[..., Update]
Listener = Callable[[Observation], None]
TruthListener = Callable[[GroundTruth], None]
Aggregator = Callable[[Sequence[Update]], tuple[torch.Tensor, ...]]
PostAggregation = Callable[..., Sequence[torch.Tensor]]


ENGINES = ("auto", "batched", "compiled", "loop")
"""How the in-process server computes client updates (see :meth:`Server.local_updates`)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ClientResult:
    """What one client's local computation produces for the server's half of a round.

    Attributes:
        update: the update as it leaves the client (after client-side defenses).
        truth: the data behind it, for the metrics' channel only (``None`` when
            an engine does not carry it).
        protocol: what the protocol reveals about the computation.
    """

    update: Update
    truth: GroundTruth | None
    protocol: Protocol


def _weights(updates: Sequence[Update]) -> list[float]:
    """The updates' reported weights, normalised to sum 1."""
    w = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    return (w / w.sum()).tolist()


def fedavg(updates: Sequence[Update]) -> tuple[torch.Tensor, ...]:
    """Weighted mean of updates, FedAvg (McMahan et al. 2017, AISTATS, Algorithm 1).

    Σ_k w_k u_k / Σ_k w_k with w_k the weight each update reports
    (``Update.weight``): the client's dataset size n_k by default, as in the
    paper's n_k / n; the samples it processed under
    ``LocalTraining(weighting="processed")``.
    """
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    w = _weights(updates)
    return tuple(sum(wk * t for wk, t in zip(w, ts)) for ts in zip(*(u.tensors for u in updates)))


def fedavg_buffers(updates: Sequence[Update]) -> tuple[torch.Tensor, ...]:
    """The clients' buffers (BatchNorm statistics) averaged with :func:`fedavg`'s weights.

    Returns ``()`` when the updates carry no buffers.
    """
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    if not updates[0].buffers:
        return ()
    if any(len(u.buffers) != len(updates[0].buffers) for u in updates):
        raise ValueError("every update must carry the same buffers (BatchNorm statistics)")
    w = _weights(updates)
    return tuple(sum(wk * b for wk, b in zip(w, bs)) for bs in zip(*(u.buffers for u in updates)))


def aggregate_with_buffers(
    aggregator: Aggregator, updates: Sequence[Update]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """The aggregate of the updates' tensors and of their buffers under ``aggregator``.

    An aggregator with an ``aggregate_with_buffers`` method decides both (a
    robust rule then also protects the BatchNorm statistics); any other
    callable aggregates the tensors, and the buffers get :func:`fedavg_buffers`.
    The buffers are ``()`` without any, or ``None`` where the rule keeps the
    global model's buffers this round.
    """
    combined = getattr(aggregator, "aggregate_with_buffers", None)
    if combined is not None:
        return combined(updates)
    if aggregator is not fedavg and updates and updates[0].buffers:
        log.debug("aggregator %r has no aggregate_with_buffers: buffers by FedAvg", aggregator)
    return aggregator(updates), fedavg_buffers(updates)


def _aggregate_observation(round, spec, params, buffers, updates, protocols) -> Observation:
    """The secure-aggregation view of one round: only the weighted mean of all updates."""
    settings = {
        dataclasses.replace(
            p,
            num_samples=0,
            client_samples=(),
            weight=0,
            client_weights=(),
            batch_size=p.batch_size * (p.algorithm != "fedsgd"),
        )
        for p in protocols
    }  # FedSGD clients may differ in batch size: each sends one full-batch gradient
    if len(settings) != 1:
        raise ValueError(
            "aggregate listeners need clients with the same local-training settings "
            "(algorithm, local steps, lr, momentum, weight decay, and for FedAvg the batch size)"
        )
    counts = tuple(u.num_samples for u in updates)
    weights = tuple(u.weight for u in updates)
    update = Update(
        fedavg(updates),
        updates[0].kind,
        sum(counts),
        client_id=-1,
        round=round,
        weight=sum(weights),
    )
    protocol = dataclasses.replace(
        protocols[0],
        num_samples=sum(counts),
        client_samples=counts,
        weight=sum(weights),
        client_weights=weights,
    )
    return Observation(round, -1, spec, params, buffers, update, protocol)


def round_generator(seed: int, round: int, stream: int) -> torch.Generator:
    """A generator for one (round, stream) pair, independent of call order."""
    state = np.random.SeedSequence([seed, round, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def client_generator(seed: int, round: int, client_id: int) -> torch.Generator:
    """The generator of one client's round (batch choice, then its defenses), on any engine."""
    return round_generator(seed, round, 1 + client_id)


class Server:
    """Runs FedSGD / FedAvg rounds over a set of clients.

    Args:
        model: the global model (changed in place by each round).
        clients: all clients; each round samples ``clients_per_round`` of them.
        clients_per_round: clients per round (``None``: all of them).
        server_lr: global step size; FedSGD moves θ ← θ − lr·g, FedAvg moves
            θ ← θ + lr·Δ.
        listeners: hook (see the module docstring): each client's observation.
        aggregate_listeners: hook: the round's aggregate observation.
        truth_listeners: hook: each client's ground truth.
        client_defenses: hook: transforms of each update before it leaves.
        aggregator: hook: the aggregation rule (FedAvg by default).
        post_aggregation: hook: changes of the new global parameters.
        evaluate: hook: metrics of the global model after each round.
        seed: the root of every random draw in the run (client sampling, batch
            choice, defense noise).
        engine: how the sampled clients compute: ``"loop"`` one after the other
            on a working copy (the general path), ``"batched"`` the plain
            clients of a BatchNorm-free victim in one vectorised call
            (:mod:`fl_core.batched`), ``"compiled"`` the batched path with its
            vmapped gradient through ``torch.compile`` (the first round
            compiles, so it pays over many rounds; the same values up to float
            rounding), ``"auto"`` batched on CUDA when two or more clients
            allow it, the loop on the CPU (where vmap's per-client convolution
            gradients are slower for larger victims; see
            ``benchmarks/fl_throughput.py``). The choice never depends on
            timing, so a config gives the same numbers on every run.
        modification: a malicious server's model modification (see the module
            docstring); ``None``: an honest-but-curious server.
    """

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Client],
        *,
        clients_per_round: int | None = None,
        server_lr: float = 1.0,
        listeners: Sequence[Listener] = (),
        aggregate_listeners: Sequence[Listener] = (),
        truth_listeners: Sequence[TruthListener] = (),
        client_defenses: Sequence[ClientDefense] = (),
        aggregator: Aggregator = fedavg,
        post_aggregation: Sequence[PostAggregation] = (),
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        seed: int = 0,
        engine: str = "auto",
        modification: Callable[..., nn.Module] | None = None,
    ) -> None:
        if not clients:
            raise ValueError("a server needs at least one client")
        k = len(clients) if clients_per_round is None else clients_per_round
        if not 1 <= k <= len(clients):
            raise ValueError(f"clients_per_round must be in [1, {len(clients)}]; got {k}")
        if not hasattr(model, "spec"):
            raise ValueError("the global model must come from fl_core.build_model (it has no spec)")
        self.model = model
        self.clients = list(clients)
        self.clients_per_round = k
        self.server_lr = server_lr
        self.listeners = list(listeners)
        self.aggregate_listeners = list(aggregate_listeners)
        self.truth_listeners = list(truth_listeners)
        self.client_defenses = list(client_defenses)
        self.aggregator = aggregator
        self.post_aggregation = list(post_aggregation)
        self.evaluate = evaluate
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
        self.engine = engine
        self._compiled: dict = {}  # the compiled engine's functions, kept across rounds
        self.modification = modification
        self.seed = seed
        self.round = 0
        self._work = model.spec.build().to(next(model.parameters()).device)

    def sample_clients(self, round: int) -> list[Client]:
        """The clients of ``round``, drawn without replacement from the round's generator."""
        if self.clients_per_round == len(self.clients):
            return self.clients
        g = round_generator(self.seed, round, 0)
        pick = torch.randperm(len(self.clients), generator=g)[: self.clients_per_round]
        return [self.clients[i] for i in sorted(pick.tolist())]

    def run(self, rounds: int, *, progress: bool = False) -> list[RoundRecord]:
        """Run ``rounds`` rounds; returns one record per round."""
        from tqdm.auto import trange

        return [self.run_round() for _ in trange(rounds, disable=not progress, desc="rounds")]

    def run_round(self) -> RoundRecord:
        """One round: broadcast, local computation, observation, aggregation."""
        t = self.round
        sent = self.sent_model(t)
        snapshot = self.snapshot(sent)
        results = self.local_updates(self.sample_clients(t), t, sent)
        return self.finish_round(results, snapshot, sent)

    def sent_model(self, round: int) -> nn.Module:
        """The model broadcast in ``round``: the global one, or a malicious server's
        modification of it (drawn from the round's own generator stream)."""
        if self.modification is None:
            return self.model
        g = round_generator(self.seed, round, MALICIOUS_STREAM)
        sent = self.modification(self.model, round=round, generator=g)
        if not hasattr(sent, "spec"):
            raise ValueError("a modification must return a model with a spec (fl_core.malicious)")
        return sent

    def snapshot(
        self, model: nn.Module | None = None
    ) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[str, torch.Tensor], ...]]:
        """Detached copies of the parameters and buffers broadcast this round (of
        ``model``, the sent one; default the global model)."""
        model = self.model if model is None else model
        params = tuple(p.detach().clone() for p in model.parameters())
        buffers = tuple((n, b.detach().clone()) for n, b in model.named_buffers())
        return params, buffers

    def local_updates(
        self, clients: Sequence[Client], round: int, model: nn.Module | None = None
    ) -> list[ClientResult]:
        """Every sampled client's update (after its defenses), ground truth and protocol.

        The in-process engine: each client computes on a working copy of the
        global model, one after the other (``engine="loop"``), or, with
        ``engine="batched"``/``"auto"``, the plain clients of one architecture
        together in one vectorised call (:mod:`fl_core.batched`); wrapped
        clients (adversaries, DP-SGD) always take the loop, and so do all
        clients of a model other than the global one (``model``, a
        malicious server's).
        """
        results: dict[int, ClientResult] = {}
        generators = {c.client_id: client_generator(self.seed, round, c.client_id) for c in clients}
        sent = self.model if model is None else model
        together = self._batchable(clients) if sent is self.model else []
        if together:
            from .batched import compute_updates

            computed = compute_updates(
                self.model,
                together,
                round=round,
                generators=[generators[c.client_id] for c in together],
                compile=self.engine == "compiled",
                compiled=self._compiled,
            )
            for client, (update, truth) in zip(together, computed):
                g = generators[client.client_id]
                results[client.client_id] = self._defend(client, update, truth, g)
        state = sent.state_dict() if len(results) < len(clients) else None
        work = self._work
        if sent is not self.model and state is not None:
            work = sent.spec.build().to(next(sent.parameters()).device)
        for client in clients:
            if client.client_id in results:
                continue
            work.load_state_dict(state)
            g = generators[client.client_id]
            update, truth = client.compute_update(work, round=round, generator=g)
            results[client.client_id] = self._defend(client, update, truth, g)
        return [results[c.client_id] for c in clients]

    def _batchable(self, clients: Sequence[Client]) -> list[Client]:
        if self.engine == "loop":
            return []
        from .batched import batchable_clients

        if self.engine == "auto" and next(self.model.parameters()).device.type != "cuda":
            return []  # measured on CPU: faster for lenet, up to 2x slower for cnn on CIFAR
        together = batchable_clients(self.model, clients)
        if self.engine == "auto" and len(together) < 2:
            return []
        return together

    def _defend(self, client, update, truth, g: torch.Generator) -> ClientResult:
        """The update as it leaves the client: its defenses draw from the client's generator."""
        for defense in self.client_defenses:
            update = defense(update, generator=g)
        return ClientResult(update, truth, client.protocol())

    def finish_round(
        self,
        results: Sequence[ClientResult],
        snapshot: tuple[tuple[torch.Tensor, ...], tuple[tuple[str, torch.Tensor], ...]],
        model: nn.Module | None = None,
    ) -> RoundRecord:
        """The server's half of a round, whatever engine computed the clients' results.

        Shows each update to the listeners (and each ground truth to the truth
        listeners) in client order, then the aggregate to the aggregate
        listeners, aggregates, applies the post-aggregation defenses, evaluates
        and advances the round counter.

        Args:
            results: one :class:`ClientResult` per sampled client, in client order.
            snapshot: the global parameters and buffers the clients received
                (:meth:`snapshot`, taken before any of them computed).
            model: the model the clients received when it was not the global one
                (a malicious server's, :meth:`sent_model`): the observations carry
                its spec and say ``server="malicious"``, and the updates are not
                applied to the global model.
        """
        t = self.round
        global_params, global_buffers = snapshot
        if not results:
            raise ValueError(f"round {t}: no client results to aggregate")
        malicious = model is not None and model is not self.model
        spec = model.spec if malicious else self.model.spec
        if malicious:
            results = [
                dataclasses.replace(r, protocol=dataclasses.replace(r.protocol, server="malicious"))
                for r in results
            ]
        for result in results:
            obs = Observation(
                round=t,
                client_id=result.update.client_id,
                model_spec=spec,
                parameters=global_params,
                buffers=global_buffers,
                update=result.update,
                protocol=result.protocol,
            )
            for listener in self.listeners:
                listener(obs)
            if result.truth is not None:
                for sink in self.truth_listeners:
                    sink(result.truth)
        updates = [r.update for r in results]
        if self.aggregate_listeners:
            obs = _aggregate_observation(
                t,
                spec,
                global_params,
                global_buffers,
                updates,
                [r.protocol for r in results],
            )
            for listener in self.aggregate_listeners:
                listener(obs)
        if not malicious:
            self._apply(updates, t)
        record = RoundRecord(
            round=t,
            client_ids=[u.client_id for u in updates],
            num_samples=[u.num_samples for u in updates],
            update_norms=[u.norm() for u in updates],
        )
        if self.evaluate is not None:
            record.metrics = dict(self.evaluate(self.model))
        self.round += 1
        log.debug("round %d: %d clients", t, len(updates))
        return record

    def _apply(self, updates: Sequence[Update], round: int) -> None:
        kinds = {u.kind for u in updates}
        if len(kinds) != 1:
            raise ValueError(f"cannot aggregate a mix of update kinds: {sorted(kinds)}")
        sign = -1.0 if kinds == {"gradient"} else 1.0
        aggregate, buffers = aggregate_with_buffers(self.aggregator, updates)
        params = list(self.model.parameters())
        with torch.no_grad():
            new = [p + sign * self.server_lr * a.to(p) for p, a in zip(params, aggregate)]
            g = round_generator(self.seed, round, SERVER_STREAM)
            for post in self.post_aggregation:
                new = list(post(new, round=round, generator=g))
            for p, v in zip(params, new):
                p.copy_(v)
            if buffers:
                for b, v in zip(float_buffers(self.model), buffers, strict=True):
                    b.copy_(v)
