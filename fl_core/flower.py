"""The FL core on Flower's runtime: a ServerApp whose strategy is the lab's server.

The in-process :class:`~fl_core.server.Server` computes its clients' updates
itself. This module runs the same rounds as a Flower ``ServerApp`` and
``ClientApp`` (flwr >= 1.41, Message API), so the clients run wherever Flower
puts them: Ray actors on one machine or a Ray cluster (the simulation
runtime), or SuperNodes on real devices (the deployment runtime).

The division of work is the in-process engine's, cut at the network:

* **server side** (:class:`LabStrategy`, a Flower ``Strategy``): samples the
  round's clients with the lab server's seeded draw, sends each one the global
  model, and hands the replies to :meth:`Server.finish_round
  <fl_core.server.Server.finish_round>`, i.e. to the same listeners
  (attackers), aggregate listeners, aggregator, post-aggregation defenses and
  evaluation as in process. An attacker sits at a Flower server exactly as it
  sits at the lab's server.
* **client side** (:func:`make_client_app`): each SuperNode is one lab client,
  its Flower ``partition-id`` the client id. It rebuilds its clients from a
  small picklable *source* (``source() -> ClientSide``), computes its update
  with the generator the in-process server would give it, applies the
  client-side defenses and replies with the update, its buffers, the protocol
  and (only when the server has truth listeners) the ground truth on a
  separate record: the lab's measurement channel, not something a real client
  would send.

Because the generators and the data are the same, a run on Flower gives the
in-process engine's updates and global models up to float tolerance (the
Ray actors run with one thread).

Client state across rounds (a lazy worker's remembered update) lives in the
client object. On Flower it is kept in the node's ``context.state`` through
``client_state()`` / ``load_client_state()``, so it follows the node whichever
Ray actor runs it.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .server import ClientResult, Server, client_generator
from .types import GroundTruth, Protocol, RoundRecord, Update

__all__ = [
    "ClientSide",
    "FLOWER_HINT",
    "discover_nodes",
    "lab_strategy",
    "make_client_app",
    "require_flower",
    "run_flower",
    "server_main",
]

log = logging.getLogger(__name__)

FLOWER_HINT = 'the Flower engine needs Flower: pip install -e ".[flower]"'
STATE_KEY = "lab-client-state"


def require_flower() -> None:
    """Raise a one-line ImportError naming the extra when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ImportError(FLOWER_HINT) from None


@dataclass
class ClientSide:
    """What a client process needs: the clients (indexed by id), their defenses, the victim.

    Attributes:
        clients: every client, ``clients[i].client_id == i`` (a node's Flower
            ``partition-id`` picks its client).
        client_defenses: update transforms applied before an update leaves.
        model: a model of the victim's architecture, used as the working copy.
        seed: the run's root seed (the client generators derive from it).
    """

    clients: Sequence[Any]
    client_defenses: Sequence[Callable[..., Update]]
    model: torch.nn.Module
    seed: int


_SIDES: dict[Any, ClientSide] = {}


def _side(source: Callable[[], ClientSide]) -> ClientSide:
    """The source's clients, built once per process (a source must be hashable)."""
    if source not in _SIDES:
        _SIDES[source] = source()
    return _SIDES[source]


# ------------------------------------------------------------------ records <-> lab values


def _record(tensors: Sequence[torch.Tensor]):
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict((str(i), t.detach().cpu()) for i, t in enumerate(tensors)))


def _state_record(model: torch.nn.Module):
    """The model's state dict as a Flower ``ArrayRecord`` (on the CPU, in state-dict order)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items()))


def _tensors(record, device) -> tuple[torch.Tensor, ...]:
    state = record.to_torch_state_dict()
    return tuple(state[str(i)].to(device) for i in range(len(state)))


def _reply_content(update: Update, truth: GroundTruth | None, protocol: Protocol):
    from flwr.app import ConfigRecord, RecordDict

    meta = {
        "kind": update.kind,
        "num-samples": update.num_samples,
        "weight": update.weight,
        "client-id": update.client_id,
        "round": update.round,
        **{
            f"protocol.{k}": v
            for k, v in asdict(protocol).items()
            if k not in ("client_samples", "client_weights")  # an aggregate's, never a client's
        },
    }
    content = {"update": _record(update.tensors), "meta": ConfigRecord(meta)}
    if update.buffers:
        content["buffers"] = _record(update.buffers)
    if truth is not None:
        content["truth"] = _record([truth.images, truth.labels])
    return RecordDict(content)


def _result_of(content, device) -> ClientResult:
    meta = content["meta"]
    update = Update(
        _tensors(content["update"], device),
        meta["kind"],
        int(meta["num-samples"]),
        client_id=int(meta["client-id"]),
        round=int(meta["round"]),
        buffers=_tensors(content["buffers"], device) if "buffers" in content else (),
        weight=int(meta["weight"]),
    )
    fields = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("protocol.")}
    truth = None
    if "truth" in content:
        images, labels = _tensors(content["truth"], "cpu")
        truth = GroundTruth(images, labels, update.client_id, update.round)
    return ClientResult(update, truth, Protocol(**fields))


def _chain(client: Any):
    """The client and every client it wraps (``.client``), outermost first."""
    while client is not None:
        yield client
        client = getattr(client, "client", None)


# ------------------------------------------------------------------ client side


def make_client_app(
    source: Callable[[], ClientSide] | None = None,
    *,
    source_from_context: Callable[[Any], Callable[[], ClientSide]] | None = None,
):
    """A Flower ``ClientApp`` computing the lab client named by the node's ``partition-id``.

    Args:
        source: a small, picklable, hashable callable returning the
            :class:`ClientSide` (it travels with every message and is called
            once per process).
        source_from_context: instead of ``source``, a function of the node's
            Flower ``Context`` returning it (a deployed app reads its run
            config there).
    """
    if (source is None) == (source_from_context is None):
        raise ValueError("give make_client_app exactly one of source or source_from_context")
    require_flower()
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict(
                {"node": ConfigRecord({"partition-id": int(context.node_config["partition-id"])})}
            ),
            reply_to=msg,
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        side = _side(source if source is not None else source_from_context(context))
        client = side.clients[int(context.node_config["partition-id"])]
        config = msg.content["config"]
        t = int(config["round"])
        if int(config["client-id"]) != client.client_id:
            raise ValueError(f"node of client {client.client_id} asked for {config['client-id']}")
        device = next(side.model.parameters()).device
        state = msg.content["arrays"].to_torch_state_dict()
        side.model.load_state_dict({k: v.to(device) for k, v in state.items()})
        _load_state(client, context)
        g = client_generator(side.seed, t, client.client_id)
        update, truth = client.compute_update(side.model, round=t, generator=g)
        for defense in side.client_defenses:
            update = defense(update, generator=g)
        _save_state(client, context)
        keep = bool(config["truth"])
        return Message(
            _reply_content(update, truth if keep else None, client.protocol()), reply_to=msg
        )

    return app


def _load_state(client: Any, context) -> None:
    if STATE_KEY not in context.state:
        return
    states = pickle.loads(context.state[STATE_KEY]["blob"])
    for layer, state in zip(_chain(client), states):
        if state is not None:
            layer.load_client_state(state)


def _save_state(client: Any, context) -> None:
    from flwr.app import ConfigRecord

    states = [c.client_state() if hasattr(c, "client_state") else None for c in _chain(client)]
    if any(s is not None for s in states):
        context.state[STATE_KEY] = ConfigRecord({"blob": pickle.dumps(states)})


# ------------------------------------------------------------------ server side


def _make_strategy_class():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import Strategy

    class LabStrategy(Strategy):
        """A Flower strategy that is the lab's server: its sampling, listeners and aggregation.

        Args:
            server: the lab server; its model is the global model, its
                ``clients`` (or stand-ins with the same ids) define the sampling.
            nodes: Flower node id of each client id.
            on_round: called with each finished round's :class:`RoundRecord`
                (the run's bookkeeping: evaluation records, saved state).
        """

        def __init__(
            self,
            server: Server,
            nodes: dict[int, int],
            on_round: Callable[[RoundRecord], None] | None = None,
        ) -> None:
            if server.modification is not None:
                raise ValueError(
                    "the Flower engine sends the global model only; run a malicious server's "
                    "modification on the in-process engine (Server.run_round)"
                )
            missing = sorted({c.client_id for c in server.clients} - set(nodes))
            if missing:
                raise ValueError(
                    f"no Flower node holds client(s) {missing[:5]}: start one per client"
                )
            self.server = server
            self.nodes = nodes
            self.on_round = on_round
            self._sampled: list[int] = []
            self._snapshot = None

        def _arrays(self) -> ArrayRecord:
            return _state_record(self.server.model)

        def configure_train(self, server_round, arrays, config, grid):
            t = self.server.round
            self._snapshot = self.server.snapshot()
            self._sampled = [c.client_id for c in self.server.sample_clients(t)]
            arrays = self._arrays()
            truth = bool(self.server.truth_listeners)
            return [
                Message(
                    RecordDict({
                        "arrays": arrays,
                        "config": ConfigRecord({"round": t, "client-id": cid, "truth": truth}),
                    }),
                    dst_node_id=self.nodes[cid],
                    message_type=MessageType.TRAIN,
                )
                for cid in self._sampled
            ]  # fmt: skip

        def aggregate_train(self, server_round, replies):
            t = self.server.round
            results: dict[int, ClientResult] = {}
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"round {t}: a client failed: {reply.error.reason}")
                result = _result_of(reply.content, next(self.server.model.parameters()).device)
                results[result.update.client_id] = result
            missing = [cid for cid in self._sampled if cid not in results]
            if missing:
                raise RuntimeError(f"round {t}: no reply from client(s) {missing[:5]} (timeout?)")
            record = self.server.finish_round([results[c] for c in self._sampled], self._snapshot)
            if self.on_round is not None:
                self.on_round(record)
            metrics = {k: float(v) for k, v in record.metrics.items()}
            return self._arrays(), MetricRecord(metrics) if metrics else None

        def configure_evaluate(self, server_round, arrays, config, grid):
            return []  # evaluation is central, in finish_round

        def aggregate_evaluate(self, server_round, replies):
            return None

        def summary(self) -> None:
            log.info("LabStrategy: %d clients, %s per round", len(self.server.clients),
                     self.server.clients_per_round)  # fmt: skip

    return LabStrategy


_STRATEGY: list[type] = []


def __getattr__(name: str):
    if name == "LabStrategy":  # built on first use, so importing this module needs no Flower
        require_flower()
        if not _STRATEGY:
            _STRATEGY.append(_make_strategy_class())
        return _STRATEGY[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lab_strategy(server: Server, nodes: dict[int, int], on_round=None):
    """A ``LabStrategy`` (a Flower ``Strategy``) around ``server``."""
    return __getattr__("LabStrategy")(server, nodes, on_round)


def discover_nodes(grid, num_clients: int, *, timeout: float = 120.0) -> dict[int, int]:
    """``{client id: node id}``: asks every connected node for its ``partition-id``."""
    from flwr.app import Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(list(grid.get_node_ids()))} of {num_clients} nodes connected")
        time.sleep(0.2)
    asks = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
        for n in grid.get_node_ids()
    ]
    nodes = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node discovery failed: {reply.error.reason}")
        nodes[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
    return nodes


def server_main(server: Server, rounds: int, on_round=None):
    """The body of a ``ServerApp``'s main: discover the nodes, then run ``rounds`` rounds."""

    def main(grid, context) -> None:
        nodes = discover_nodes(grid, len(server.clients))
        strategy = lab_strategy(server, nodes, on_round)
        initial = _state_record(server.model)
        strategy.start(grid, initial_arrays=initial, num_rounds=rounds)

    return main


def run_flower(
    server: Server,
    source: Callable[[], ClientSide],
    rounds: int,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
) -> None:
    """Run ``rounds`` rounds of ``server`` on Flower's simulation runtime (Ray backend).

    Args:
        server: the lab server (global model, sampling, listeners, aggregation);
            it advances exactly as :meth:`Server.run_round` would advance it.
        source: where each client process gets its clients (see
            :func:`make_client_app`); the clients it builds must be the
            server's (same ids, data, wrappers, defenses, seed).
        rounds: rounds to run from ``server.round`` on.
        on_round: called after each round with its record.
        ray_address: an existing Ray cluster (``ray start --head``) instead of
            a local Ray instance.
        num_cpus: CPUs of the local Ray instance (default: all).
        cpus_per_client, gpus_per_client: each ClientApp actor's resources.
    """
    require_flower()
    if rounds < 1:
        return
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    server_app = ServerApp()
    server_app.main()(server_main(server, rounds, on_round))
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR"}
    if ray_address:
        init["address"] = ray_address
    else:
        init["num_cpus"] = int(num_cpus or os.cpu_count() or 1)
    backend = {
        "init_args": init,
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
    }
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's per-round INFO lines and its deprecation notice
    try:
        run_simulation(
            server_app, make_client_app(source), len(server.clients), backend_config=backend
        )
    finally:
        flwr_log.setLevel(level)
