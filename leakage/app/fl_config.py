"""What one ``leakage fl`` run depends on: :class:`FLConfig`, its value checks and the YAML reader.

Every value from a file, a ``--set`` or a flag is checked here, before any
work is done, and a bad one raises ``ValueError`` with the fix in one line.
The run itself is :func:`leakage.app.fl_cmd.run_fl`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ENGINES", "EXECUTION_KEYS", "FLConfig", "load_fl_config", "make_fl_config"]

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
            (the client loop), ``compiled`` (vectorised, through
            ``torch.compile``: the first round compiles, later ones run faster)
            or ``auto`` (vectorised on CUDA, the loop on the CPU, where it is
            faster for lenet but slower for cnn on CIFAR-10).
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
        from leakage.app.checks import (
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
        if not (isinstance(self.batched, bool) or self.batched in ("auto", "compiled")):
            raise ValueError(f"batched must be auto, true, false or compiled; got {self.batched!r}")
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
        from leakage.app.checks import MAX_SEED, check_number, check_text, check_whole

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
    from leakage.app.checks import check_whole

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
    from leakage.app.checks import check_number, check_whole

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
    return make_fl_config(path, {k: v for k, v in overrides.items() if v is not None})


def make_fl_config(path: str | Path | None, overrides: dict[str, Any]) -> FLConfig:
    """The file at ``path`` (``None``: the defaults) with ``overrides`` laid over it."""
    from leakage.app.checks import build_checked
    from leakage.app.config import read_config_file

    data = read_config_file(path) if path is not None else {}
    data.update(overrides)
    return build_checked(FLConfig, data)
