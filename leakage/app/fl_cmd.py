"""The ``leakage fl CONFIG`` command: one federated run with poisoning clients and defenses.

A YAML file in the style of the FedMLSecurity paper (``attack_args`` /
``defense_args`` blocks) describes the run::

    dataset: fashion-mnist
    data_root: ../shared/datasets
    model: cnn
    num_clients: 20
    partition: iid            # or dirichlet, with alpha
    rounds: 20
    algorithm: fedavg
    local_steps: 500
    batch_size: 20
    lr: 0.01
    momentum: 0.9
    attack_args:
      enable: true
      type: label_flip        # byzantine | label_flip | model_replacement | lazy
      fraction: 0.2           # or ids: [0, 3]
      rounds: [0, null]       # malicious rounds [start, stop)
    defense_args:
      enable: true
      defenses: [{median: null}]   # any defense list (see defenses.config)
    engine: local             # or flower: Flower's simulation runtime (fl_core.flower)

Flags lay over the file (or over the defaults, without one)::

    leakage fl run.yaml --attack byzantine:mode=random,fraction=0.1 --defense multi_krum:f=1,m=5
    leakage fl run.yaml --set num_clients=20 --set partition=dirichlet --defense none

``--attack TYPE:k=v,...`` replaces ``attack_args``, each ``--defense`` adds to
a list that replaces ``defense_args``, ``none`` disables either, and ``--set``
overrides any other key.

Every evaluated round appends one record (test accuracy, and backdoor success
for a model-replacement attack with a target) to ``<out>/rounds.jsonl`` and
saves the server's state to ``<out>/state.pt``; a rerun with the same config
and ``--out`` resumes after the last saved round, and a run asked for more
rounds continues. ``rounds.csv`` and ``accuracy.png`` are rebuilt at the end.
Bad configurations raise ``ValueError`` with the fix, which the CLI prints as
one line.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leakage.app.store import (
    append_record,
    atomic_path,
    load_records,
    rewrite_records,
    write_atomic,
)

from .fl_state import (  # noqa: F401  (_read_state: the tests read a saved state)
    STATE_FORMAT,
    _apply_state,
    _client_states,
    _Mirror,
    _read_state,
    _restore_clients,
    _run_state,
    _stateful_layers,
    _valid_records,
)

__all__ = [
    "ConfigClients",
    "FLConfig",
    "add_fl_parser",
    "config_from_args",
    "load_fl_config",
    "run_fl",
]

ATTACK_KEYS = {"enable", "type", "fraction", "ids", "rounds", "seed"}
ENGINES = ("local", "flower")
EXECUTION_KEYS = ("engine", "batched", "ray_address")
"""Keys that choose how rounds are computed; a run may resume with other values."""


@dataclass(frozen=True)
class FLConfig:
    """Everything one ``leakage fl`` run depends on (YAML keys = field names).

    Attributes:
        dataset: a dataset name (``samples`` uses the same photographs to train
            and test) and ``data_root`` where it lives.
        train_limit, test_limit: seeded random subsets of the splits (``None``: all).
        model, activation: the victim (``None``: its default activation).
        num_clients: M, the clients holding the training data.
        clients_per_round: clients sampled per round (``None``: all).
        partition: ``iid`` or ``dirichlet`` (label skew with ``alpha``).
        rounds: FL rounds to run.
        algorithm: ``fedavg`` (local SGD, delta) or ``fedsgd`` (one gradient).
        local_steps, batch_size, lr, momentum, weight_decay: local training (FedAvg).
        weighting: each client's FedAvg weight: ``dataset`` (its dataset size
            n_k, McMahan et al. 2017) or ``processed`` (the samples its round
            used, ``min(n_k, batch_size x local_steps)``); see
            :class:`fl_core.client.LocalTraining`.
        server_lr: the server's step on the aggregate.
        eval_every: evaluate (and save state) every this many rounds, and after the last.
        attack_args: ``enable``, ``type`` (``byzantine``, ``label_flip``,
            ``model_replacement``, ``lazy``), ``fraction`` or ``ids`` of the
            malicious clients, ``rounds`` ([start, stop) when they misbehave),
            ``seed`` of their selection, and the type's own parameters (``mode``,
            ``gamma``, ``target``, ``mapping``/``source``/``target`` ...; see
            :mod:`fl_core.adversaries`).
        defense_args: ``enable`` and ``defenses`` (a list, see
            :mod:`defenses.config`), or ``type`` plus that defense's
            parameters (``{type: krum, f: 1}``).
        seed: root of every random draw (weights, partition, sampling, batches).
        device: where the model and the clients' data live (``cpu``, ``cuda``,
            ``cuda:1``); the draws stay on the CPU generators either way.
        engine: ``local`` (the in-process server) or ``flower`` (the same
            rounds as a Flower ServerApp and ClientApps on Flower's simulation
            runtime, :mod:`fl_core.flower`; needs the ``flower`` extra).
        batched: the local engine's client computation: ``true`` (plain
            clients of a BatchNorm-free victim in one vectorised call), ``false``
            (the client loop) or ``auto`` (vectorised on CUDA, the loop on the
            CPU, where it is faster for lenet but slower for cnn on CIFAR-10).
        ray_address: with ``engine: flower``, an existing Ray cluster
            (``HEAD:6379``) instead of a local Ray instance.
        out: output folder (``None``: a new folder under ``results/``).

    ``engine``, ``batched`` and ``ray_address`` choose how the rounds are
    computed, not what they compute: a run may resume under another engine.
    """

    dataset: str = "fashion-mnist"
    data_root: str = "data"
    train_limit: int | None = None
    test_limit: int | None = None
    model: str = "cnn"
    activation: str | None = None
    num_clients: int = 10
    clients_per_round: int | None = None
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int = 10
    algorithm: str = "fedavg"
    local_steps: int = 10
    batch_size: int = 20
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    weighting: str = "dataset"
    server_lr: float = 1.0
    eval_every: int = 1
    attack_args: dict[str, Any] = field(default_factory=dict)
    defense_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    engine: str = "local"
    batched: bool | str = "auto"
    ray_address: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        from defenses.config import build_plan
        from fl_core.client import WEIGHTINGS
        from fl_core.models import ACTIVATIONS, MODELS
        from leakage.app.experiment import (
            MAX_SEED,
            check_device,
            check_flag,
            check_number,
            check_text,
            check_whole,
        )

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        # types and ranges first: values from YAML and --set may be anything
        for name in ("dataset", "data_root", "model"):
            put(name, check_text(name, getattr(self, name)))
        for name in ("activation", "ray_address", "out"):
            put(name, check_text(name, getattr(self, name), optional=True))
        put("partition", check_text("partition", self.partition, choices=("iid", "dirichlet")))
        put("algorithm", check_text("algorithm", self.algorithm, choices=("fedavg", "fedsgd")))
        put("engine", check_text("engine", self.engine, choices=ENGINES))
        for name in ("train_limit", "test_limit"):
            put(name, check_whole(name, getattr(self, name), low=1, optional=True))
        for name in ("num_clients", "rounds", "local_steps", "eval_every"):
            put(name, check_whole(name, getattr(self, name), low=1))
        put("batch_size", check_whole("batch_size", self.batch_size, low=1, optional=True))
        k = check_whole("clients_per_round", self.clients_per_round, optional=True)
        if k is not None and not 1 <= k <= self.num_clients:
            raise ValueError(f"clients_per_round must be in [1, {self.num_clients}]; got {k}")
        put("clients_per_round", k)
        put("alpha", check_number("alpha", self.alpha, low=0, above=True))
        put("lr", check_number("lr", self.lr, low=0, above=True))
        put("server_lr", check_number("server_lr", self.server_lr, low=0, above=True))
        put("momentum", check_number("momentum", self.momentum, low=0))
        put("weight_decay", check_number("weight_decay", self.weight_decay, low=0))
        put("weighting", check_text("weighting", self.weighting, choices=WEIGHTINGS))
        put("seed", check_whole("seed", self.seed, low=0, high=MAX_SEED))
        put("device", check_device("device", self.device))
        if not (isinstance(self.batched, bool) or self.batched == "auto"):
            raise ValueError(f"batched must be auto, true or false; got {self.batched!r}")
        for block in ("attack_args", "defense_args"):
            value = getattr(self, block)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{block} must be a mapping, e.g. {{enable: true, type: ...}}")
            if not all(isinstance(key, str) for key in value):
                raise ValueError(f"{block}: keys must be text; got {sorted(map(repr, value))}")
            if "enable" in value:
                check_flag(f"{block}: enable", value["enable"])
            put(block, dict(value))

        MODELS.get(self.model)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid names: "
                f"{', '.join(sorted(ACTIVATIONS))}"
            )
        self.local_training()
        if self.engine == "flower":
            from fl_core.flower import require_flower

            require_flower()
        self.attack()  # checks the attack block's keys and values
        defenses = self.defense_list()
        aggregator = build_plan(defenses).aggregator  # checks the defenses
        if hasattr(aggregator, "check_clients"):  # and the rule against the round's size
            aggregator.check_clients(self.clients_per_round or self.num_clients)
        if any(name == "dpsgd" for d in defenses for name in d):
            self._check_dp_model()
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError):
            bad = []
            for key, value in self.to_dict().items():
                try:
                    json.dumps(value, allow_nan=False)
                except (TypeError, ValueError):
                    bad.append(key)
            raise ValueError(
                f"{', '.join(bad)}: holds a value a JSON config cannot store "
                "(use numbers, text, lists and mappings)"
            ) from None

    def _check_dp_model(self) -> None:
        """DP-SGD needs per-sample gradients: refuse a victim Opacus cannot train (BatchNorm)."""
        from defenses.dpsgd import dp_compatible
        from fl_core.models import build_model

        try:
            spec = build_model(self.model, activation=self.activation).spec
        except (ValueError, TypeError, RuntimeError):
            return  # the data's shape may be needed: build_run says what is wrong
        _, needs_conversion = dp_compatible(spec)
        if needs_conversion:
            raise ValueError(
                f"dpsgd cannot train model {self.model}: its BatchNorm layers do not support "
                "the per-sample gradients of differential privacy; choose a model without "
                "BatchNorm (e.g. cnn, lenet, mlp) or another defense"
            )

    def local_training(self):
        from fl_core.client import LocalTraining

        return LocalTraining(
            self.algorithm,
            self.batch_size,
            self.local_steps,
            self.lr,
            self.momentum,
            self.weight_decay,
            weighting=self.weighting,
        )

    def defense_list(self) -> list[Any]:
        """The defense list of ``defense_args`` (empty when disabled)."""
        from defenses.config import normalize_defenses

        args = dict(self.defense_args or {})
        if not args.pop("enable", True):
            return []
        if "defenses" in args:
            extra = sorted(set(args) - {"defenses"})
            if extra:
                raise ValueError(
                    f"defense_args: give either defenses: [...] or type plus parameters; "
                    f"not both ({', '.join(extra)})"
                )
            items = args["defenses"] or []
        elif "type" in args:
            kind = args.pop("type")
            items = [{kind: args or None}]
        else:
            if args:
                raise ValueError(
                    f"defense_args has {', '.join(sorted(args))} but no type or defenses: "
                    "write {enable: true, type: krum, f: 1} or {defenses: [{median: null}]}"
                )
            items = []
        return [{n: p} for n, p in normalize_defenses(items)]

    def attack(self) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """``(type, selection, parameters)`` of ``attack_args``, or ``None`` when disabled.

        Every value is checked here (types, ranges, whole numbers), so a bad one stops
        the run before anything is built: ``fraction`` a share in [0, 1], ``ids``
        distinct client ids, ``seed`` a whole number >= 0, ``rounds`` ``[start,
        stop]`` (stop ``null`` for forever), and each of the type's own parameters
        as its signature in :mod:`fl_core.adversaries` says.
        """
        from fl_core.adversaries import ADVERSARIES
        from leakage.app.experiment import MAX_SEED, check_number, check_text, check_whole

        args = dict(self.attack_args or {})
        if not args.pop("enable", True) or not args:
            return None
        if "type" not in args:
            raise ValueError(f"attack_args needs a type: {', '.join(ADVERSARIES.names())}")
        kind = check_text("attack_args: type", args.pop("type"))
        factory = ADVERSARIES.get(kind)
        select: dict[str, Any] = {}
        if "fraction" in args:
            select["fraction"] = check_number(
                "attack_args: fraction", args.pop("fraction"), low=0, high=1
            )
        if "ids" in args:
            ids = args.pop("ids")
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"attack_args: ids must be a list of client ids; got {ids!r}")
            what = "attack_args: ids"
            ids = [check_whole(what, i, low=0, high=self.num_clients - 1) for i in ids]
            if len(set(ids)) != len(ids):
                raise ValueError(f"attack_args: ids {ids} contain duplicates")
            select["ids"] = ids
        if "seed" in args:
            seed = args.pop("seed")
            select["seed"] = check_whole("attack_args: seed", seed, low=0, high=MAX_SEED)
        if ("fraction" in select) == ("ids" in select):
            raise ValueError("attack_args needs exactly one of fraction or ids")
        if "rounds" in args:
            args["rounds"] = _check_rounds(args["rounds"])
        args.update(_check_adversary_params(kind, factory, args))
        return kind, select, args

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_rounds(rounds: Any) -> tuple[int, int | None] | None:
    """``attack_args: rounds``: ``[start, stop)`` of the malicious rounds, stop null: forever."""
    from leakage.app.experiment import check_whole

    if rounds is None:
        return None
    what = "attack_args: rounds must be [start, stop] (stop null for forever)"
    if not isinstance(rounds, (list, tuple)) or len(rounds) != 2:
        raise ValueError(f"{what}; got {rounds!r}")
    start = check_whole("attack_args: rounds start", rounds[0], low=0)
    stop = check_whole("attack_args: rounds stop", rounds[1], low=start + 1, optional=True)
    return start, stop


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "text"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, Sequence):
        return f"a list of {_describe(args[0]).removeprefix('a ')}s" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping" + (
            f" of {_describe(args[0])} to {_describe(args[1])}" if len(args) == 2 else ""
        )
    return getattr(hint, "__name__", str(hint))


def _python_only(hint: Any) -> bool:
    """Whether values of ``hint`` cannot come from YAML (functions, other objects)."""
    origin = typing.get_origin(hint)
    if origin is Callable or hint is Callable:
        return True
    plain = (bool, int, float, str, list, tuple, dict, Sequence, Mapping, type(None))
    return origin is None and inspect.isclass(hint) and hint not in plain


def _check_typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked (and coerced) against the type ``hint``; one-line ValueError if not."""
    from leakage.app.experiment import check_number, check_whole

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = ValueError(f"{name} must be {_describe(hint)}; got {value!r}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if all(_python_only(a) for a in options):
            return _check_typed(name, value, options[0])  # says it cannot come from a config
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_typed(name, value, option)
            except ValueError:
                continue
        raise wrong
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise wrong
    if origin is Callable or hint is Callable:
        raise ValueError(f"{name} cannot be set from a config (it takes a Python function)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if hint is int:
        try:
            return check_whole(name, value)
        except ValueError:
            raise wrong from None
    if hint is float:
        try:
            return check_number(name, value)
        except ValueError:
            raise wrong from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise wrong
            return tuple(_check_typed(name, v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return [_check_typed(name, v, item) for v in value]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise wrong
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {_check_typed(name, k, kt): _check_typed(name, v, vt) for k, v in value.items()}
    if inspect.isclass(hint):
        if isinstance(value, hint):
            return value
        raise ValueError(f"{name} cannot be set from a config (it takes a {hint.__name__})")
    return value


def _check_adversary_params(kind: str, factory: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The adversary's own parameters, named and typed as its signature says."""
    sig = inspect.signature(factory)
    valid = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid) - {"rounds"})
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for adversary {kind!r}; "
            f"valid: {', '.join(valid)}"
        )
    missing = [
        n for n in valid if sig.parameters[n].default is inspect.Parameter.empty and n not in params
    ]
    if missing:
        raise ValueError(f"adversary {kind!r} needs parameter(s) {', '.join(missing)}")
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # annotations this Python cannot evaluate: the adversary checks itself
        hints = {}
    out = {}
    for name, value in params.items():
        if name == "rounds":
            continue
        hint = hints.get(name, Any)
        out[name] = _check_typed(f"attack_args: {name}", value, hint)
    return out


def load_fl_config(path: str | Path | None, **overrides: Any) -> FLConfig:
    """Read a YAML run description (``None``: the defaults) and lay ``overrides`` over it.

    An override of ``None`` leaves the file's value. Unknown keys are rejected
    with the valid ones, and every value is checked (:class:`FLConfig`).
    """
    return _make_config(path, {k: v for k, v in overrides.items() if v is not None})


def _make_config(path: str | Path | None, overrides: dict[str, Any]) -> FLConfig:
    from leakage.app.experiment import read_config_file

    data = read_config_file(path) if path is not None else {}
    data.update(overrides)
    valid = [f.name for f in dataclasses.fields(FLConfig)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    return FLConfig(**data)


def _data(cfg: FLConfig):
    from fl_core.data import load_dataset

    load = {"root": cfg.data_root, "seed": cfg.seed}
    train = load_dataset(cfg.dataset, train=True, limit=cfg.train_limit, **load)
    if cfg.dataset == "samples":
        return train, train
    return train, load_dataset(cfg.dataset, train=False, limit=cfg.test_limit, **load)


def build_run(cfg: FLConfig):
    """The server of ``cfg`` (clients partitioned, attack and defenses wired) and its test data."""
    from defenses.config import build_plan
    from fl_core.adversaries import poison_clients
    from fl_core.client import Client
    from fl_core.models import build_model
    from fl_core.partition import partition_dirichlet, partition_iid
    from fl_core.server import Server

    train, test = _data(cfg)
    if len(train) < cfg.num_clients:
        raise ValueError(f"{len(train)} training images cannot fill {cfg.num_clients} clients")
    if cfg.partition == "iid":
        parts = partition_iid(len(train), cfg.num_clients, seed=cfg.seed)
    else:
        parts = partition_dirichlet(train.labels, cfg.num_clients, alpha=cfg.alpha, seed=cfg.seed)
    training = cfg.local_training()
    images, labels = train.images.to(cfg.device), train.labels.to(cfg.device)
    clients = [Client(i, images[p], labels[p], training=training) for i, p in enumerate(parts)]
    attack = cfg.attack()
    if attack is not None:
        kind, select, params = attack
        clients = poison_clients(clients, kind, **select, **params)
    plan = build_plan(cfg.defense_list())
    clients = plan.wrap_clients(clients)
    model = build_model(
        cfg.model,
        num_classes=max(10, int(train.labels.max()) + 1),
        in_shape=train.shape,
        activation=cfg.activation,
        generator=torch.Generator().manual_seed(cfg.seed),
    ).to(cfg.device)
    server = Server(
        model,
        clients,
        clients_per_round=cfg.clients_per_round,
        server_lr=cfg.server_lr,
        seed=cfg.seed,
        engine={True: "batched", False: "loop"}.get(cfg.batched, "auto"),
        **plan.server_kwargs(),
    )
    return server, test, attack


@dataclass(frozen=True)
class ConfigClients:
    """The client side of a config's run, for Flower's client processes (:mod:`fl_core.flower`).

    Small and hashable (the config as JSON), so it travels with every message;
    each process builds the run's clients once, exactly as :func:`build_run`
    builds them for the in-process server.

    Attributes:
        config: the config as JSON.
        client_states: a file of the clients' carried state (a lazy worker's
            remembered update) to start from, written by a resumed run; ``""``:
            none. Each process loads it when it builds the clients, so a node's
            first round after a resume sees what the interrupted run left.
        run: names one :func:`run_fl` call, so a process that served an earlier
            run (a Ray worker kept alive) builds fresh clients rather than reuse
            ones whose state moved on.
    """

    config: str
    client_states: str = ""
    run: str = ""

    def __call__(self):
        from fl_core.flower import ClientSide

        cfg = FLConfig(**json.loads(self.config))
        server, _, _ = build_run(cfg)
        if self.client_states:
            saved = _read_state(Path(self.client_states), cfg.device)
            _restore_clients(server, saved["clients"])
        # this process's copy of the victim is the clients' working model
        return ClientSide(server.clients, server.client_defenses, server.model, cfg.seed)


def _evaluate(server, test, attack) -> dict[str, float]:
    from fl_core.adversaries import backdoor_success
    from fl_core.train import evaluate_accuracy

    out = {"accuracy": evaluate_accuracy(server.model, test.images, test.labels)}
    if attack is not None and attack[0] == "model_replacement" and "target" in attack[2]:
        trigger = next(
            (c.trigger for c in server.clients if getattr(c, "trigger", None) is not None), None
        )
        out["backdoor_success"] = backdoor_success(
            server.model, test.images, test.labels, target=attack[2]["target"], trigger=trigger
        )
    return out


def run_fl(cfg: FLConfig, *, progress: bool = False, grid: Any = None) -> list[dict[str, Any]]:
    """Run (or resume) the config's rounds; returns the per-round records.

    Nothing is written before the run is known to start: the settings are
    compared with those of a run already in ``cfg.out``, the data are loaded,
    the clients, attack and defenses built and a saved state loaded first. Every
    file is then written atomically; an interruption at any point loses at most
    the rounds since the last saved state, which a rerun redoes.

    ``grid``: a Flower ``Grid`` when called from a deployed ``ServerApp``
    (:mod:`leakage.app.flower_app`): the rounds then go to the SuperNodes behind it
    instead of a simulation runtime this call starts.
    """
    from leakage.app.experiment import prepare_out

    out = Path(cfg.out or Path("results") / f"fl-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("rounds", "out")}
    compared = {k: v for k, v in settings.items() if k not in EXECUTION_KEYS}
    stored = out / "config.json"
    if stored.exists():
        try:
            previous = json.loads(stored.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{stored} cannot be read ({e}): use another --out") from None
        if not isinstance(previous, dict):
            raise ValueError(f"{stored} is not a leakage fl config: use another --out")
        defaults = {f.name: f.default for f in dataclasses.fields(FLConfig)}
        now = json.loads(json.dumps(compared))
        # a key added to FLConfig after the run started counts as its default there
        diff = sorted(k for k in now if previous.get(k, defaults.get(k)) != now[k])
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}): "
                "use the same config or another --out"
            )
    records_path, state_path = out / "rounds.jsonl", out / "state.pt"
    raw = load_records(records_path)
    records = _valid_records(raw)
    finished = (out / "rounds.csv").exists() and state_path.exists()
    if finished and records and records[-1]["round"] == cfg.rounds:
        return records  # done before: nothing to build, load or rerun
    server, test, attack = build_run(cfg)
    _run_state(server)  # every hook's state can be saved: found now, not after round 1
    state = _read_state(state_path, cfg.device) if state_path.exists() else None
    if state is not None:
        _apply_state(server, state)
    remote = grid is not None or cfg.engine == "flower"
    carried = _client_states(server)
    if grid is not None and carried:
        raise ValueError(
            f"{out} holds a run whose clients carry state (a lazy worker's remembered "
            "update) that a deployed Flower run cannot hand back to its SuperNodes: resume it "
            "with engine local or flower (simulation), or use another --out"
        )
    out = prepare_out(out)  # the run starts: from here on its files are written
    if not stored.exists():
        write_atomic(stored, json.dumps(settings, indent=2) + "\n")
    kept = [r for r in records if r["round"] <= server.round]
    if len(kept) != len(raw):  # records past the saved state: that work is redone
        rewrite_records(records_path, kept)
    records = kept
    if state is not None and (not records or records[-1]["round"] != server.round):
        # cut after the state was saved: that round's record
        record = {"round": server.round, **_evaluate(server, test, attack), "seconds": None}
        append_record(records_path, record)
        records.append(record)
    mirror = _Mirror(server) if remote and any(map(_stateful_layers, server.clients)) else None
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.rounds, initial=server.round, disable=not progress, desc="rounds")
    clock = [time.perf_counter()]

    def after_round(round_record=None) -> None:
        if mirror is not None:
            mirror.after(round_record)
        bar.update(1)
        t = server.round  # rounds done
        seconds, clock[0] = time.perf_counter() - clock[0], time.perf_counter()
        if t % cfg.eval_every and t != cfg.rounds:
            return
        record = {"round": t, **_evaluate(server, test, attack), "seconds": seconds}
        with atomic_path(state_path) as tmp:  # the state and the record of round t land together
            torch.save(_run_state(server), tmp)
        append_record(records_path, record)
        records.append(record)
        clock[0] = time.perf_counter()  # the next round's time leaves evaluation out

    if grid is not None:
        from fl_core.flower import server_main

        server_main(server, cfg.rounds - server.round, after_round)(grid, None)
    elif cfg.engine == "flower":
        from fl_core.flower import run_flower

        states = ""
        if carried:  # the nodes start from the state the interrupted run left
            states = str((out / "client_states.pt").resolve())
            with atomic_path(states) as tmp:
                torch.save({**_run_state(server), "model": {}}, tmp)
        source = ConfigClients(
            json.dumps({**settings, "rounds": cfg.rounds}),
            client_states=states,
            run=f"{os.getpid()}-{time.time_ns()}",
        )
        run_flower(
            server,
            source,
            cfg.rounds - server.round,
            on_round=after_round,
            ray_address=cfg.ray_address,
            # the GPU shared by one actor per CPU
            gpus_per_client=0.0 if cfg.device == "cpu" else 1.0 / (os.cpu_count() or 1),
        )
    else:
        while server.round < cfg.rounds:
            server.run_round()
            after_round()
    bar.close()
    write_outputs(records, out, cfg)
    return records


def write_outputs(records: list[dict[str, Any]], out: Path, cfg: FLConfig) -> None:
    """``rounds.csv`` and ``accuracy.png`` from the records (each written atomically)."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    cols = sorted({k for r in records for k in r}, key=lambda k: (k != "round", k))
    with atomic_path(out / "rounds.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r.get("accuracy", math.nan) for r in records], "o-", label="test accuracy")
    if any("backdoor_success" in r for r in records):
        ax.plot(
            rounds, [r.get("backdoor_success") for r in records], "s--", label="backdoor success"
        )
    attack = cfg.attack()
    defenses = cfg.defense_list()
    ax.set_title(
        f"{cfg.model} on {cfg.dataset}: attack {attack[0] if attack else 'none'}, "
        f"defense {', '.join(next(iter(d)) for d in defenses) or 'none'}",
        fontsize=9,
    )
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "accuracy.png") as tmp:
        fig.savefig(tmp, dpi=120)


def add_fl_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fl`` sub-command to ``subparsers``."""
    from defenses.config import DEFENSES
    from fl_core.adversaries import ADVERSARIES

    f = subparsers.add_parser(
        "fl",
        help="run federated rounds with poisoning clients and defenses (YAML and/or flags)",
        description="One federated run described by a YAML file (attack_args / defense_args "
        "blocks) and/or flags; per-round accuracy to --out as rounds.jsonl, rounds.csv and "
        "accuracy.png. Rerunning with the same --out resumes. Flags override the file: "
        "leakage fl run.yaml --attack byzantine:mode=random,fraction=0.1 --defense krum:f=1",
    )
    f.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?",
        default=None,
        help="YAML file (keys: see leakage.app.fl_cmd.FLConfig); optional when flags say it all",
    )
    f.add_argument("--out", default=None, help="output folder (default: new folder under results/)")
    f.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    f.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override one config key, repeatable (e.g. --set num_clients=20 --set lr=0.05)",
    )
    f.add_argument(
        "--attack",
        default=None,
        metavar="TYPE[:K=V,...]",
        help="replace attack_args: a type and its selection and parameters, e.g. "
        "label_flip:fraction=0.25 or byzantine:mode=random,ids=[0,3]; 'none' disables; "
        f"types: {', '.join(ADVERSARIES.names())}",
    )
    f.add_argument(
        "--defense",
        dest="defenses",
        action="append",
        default=None,
        metavar="NAME[:K=V,...]",
        help="replace defense_args with these defenses, repeatable, applied in order "
        f"(e.g. --defense krum:f=1); 'none' disables; names: {', '.join(DEFENSES)}",
    )
    f.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="where the rounds run: local (in process) or flower (Flower's simulation "
        "runtime, needs the flower extra); overrides the config's engine",
    )
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    return f


def _yaml_value(flag: str, key: str, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        reason = (str(e).splitlines() or ["not YAML"])[0]
        raise ValueError(f"{flag} {key}={text!r}: not a valid YAML value ({reason})") from None


def _name_params(text: str, flag: str) -> tuple[str, dict[str, Any]]:
    import yaml

    from defenses.config import parse_name_params

    try:
        return parse_name_params(text, flag)
    except yaml.YAMLError as e:
        reason = (str(e).splitlines() or ["not YAML"])[0]
        raise ValueError(f"{flag} {text!r}: a value is not valid YAML ({reason})") from None


def config_from_args(args: argparse.Namespace) -> FLConfig:
    """The run of ``leakage fl``: the YAML file (if any) with the flags laid over it.

    ``--set KEY=VALUE`` reads VALUE as YAML and always applies (``--set
    activation=null`` clears the file's value); ``--out``, ``--rounds`` and
    ``--engine`` apply when given.
    """
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "out": args.out,
            "rounds": args.rounds,
            "engine": getattr(args, "engine", None),
        }.items()
        if v is not None
    }
    for item in args.overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: write KEY=VALUE (e.g. --set num_clients=20)")
        overrides[key.strip()] = _yaml_value("--set", key.strip(), value.strip())
    if args.attack is not None:
        if args.attack.strip().lower() == "none":
            overrides["attack_args"] = {"enable": False}
        else:
            kind, params = _name_params(args.attack, "--attack")
            overrides["attack_args"] = {"enable": True, "type": kind, **params}
    if args.defenses is not None:
        if [d.strip().lower() for d in args.defenses] == ["none"]:
            overrides["defense_args"] = {"enable": False}
        else:
            items = [_name_params(d, "--defense") for d in args.defenses]
            overrides["defense_args"] = {"defenses": [{n: p or None} for n, p in items]}
    return _make_config(args.config, overrides)


def run_fl_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    records = run_fl(cfg, progress=not args.quiet)
    last = records[-1] if records else {}
    extra = f"  backdoor {last['backdoor_success']:.3f}" if "backdoor_success" in last else ""
    print(f"round {last.get('round')}: accuracy {last.get('accuracy', float('nan')):.4f}{extra}")
    return 0
