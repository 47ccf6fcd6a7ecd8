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
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
        from fl_core.models import MODELS

        MODELS.get(self.model)
        for name in ("num_clients", "rounds", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        k = self.clients_per_round
        if k is not None and not 1 <= k <= self.num_clients:
            raise ValueError(f"clients_per_round must be in [1, {self.num_clients}]; got {k}")
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"unknown partition {self.partition!r}; valid: iid, dirichlet")
        if self.partition == "dirichlet" and not self.alpha > 0:
            raise ValueError(f"dirichlet alpha must be positive; got {self.alpha}")
        self.local_training()
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r}: use cpu, cuda or cuda:N ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device here; use cpu")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.batched not in (True, False, "auto"):
            raise ValueError(f"batched must be auto, true or false; got {self.batched!r}")
        if self.engine == "flower":
            from fl_core.flower import require_flower

            require_flower()
        self.attack()  # checks the attack block's keys
        from defenses.config import build_plan

        aggregator = build_plan(self.defense_list()).aggregator  # checks the defenses
        if hasattr(aggregator, "check_clients"):  # and the rule against the round's size
            aggregator.check_clients(self.clients_per_round or self.num_clients)

    def local_training(self):
        from fl_core.client import LocalTraining

        return LocalTraining(
            self.algorithm,
            self.batch_size,
            self.local_steps,
            self.lr,
            self.momentum,
            self.weight_decay,
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
        """``(type, selection, parameters)`` of ``attack_args``, or ``None`` when disabled."""
        from fl_core.adversaries import ADVERSARIES

        args = dict(self.attack_args or {})
        if not args.pop("enable", True) or not args:
            return None
        if "type" not in args:
            raise ValueError(f"attack_args needs a type: {', '.join(ADVERSARIES.names())}")
        kind = str(args.pop("type"))
        ADVERSARIES.get(kind)
        select = {k: args.pop(k) for k in ("fraction", "ids", "seed") if k in args}
        if ("fraction" in select) == ("ids" in select):
            raise ValueError("attack_args needs exactly one of fraction or ids")
        if "rounds" in args and args["rounds"] is not None:
            args["rounds"] = tuple(args["rounds"])
        return kind, select, args

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def load_fl_config(path: str | Path | None, **overrides: Any) -> FLConfig:
    """Read a YAML run description (``None``: the defaults) and lay ``overrides`` over it.

    Unknown keys are rejected with the valid ones.
    """
    from leakage.experiment import read_config_file

    data = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = [f.name for f in dataclasses.fields(FLConfig)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    for block in ("attack_args", "defense_args"):
        if data.get(block) is not None and not isinstance(data[block], dict):
            raise ValueError(f"{block} must be a mapping, e.g. {{enable: true, type: ...}}")
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
    """

    config: str

    def __call__(self):
        from fl_core.flower import ClientSide

        cfg = FLConfig(**json.loads(self.config))
        server, _, _ = build_run(cfg)
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


def _stateful(server) -> dict[str, Any]:
    """What a round leaves behind besides the weights: aggregator and lazy-worker state."""
    return {
        "aggregator": server.aggregator,
        "post_aggregation": server.post_aggregation,
        "lazy": {c.client_id: c.last for c in server.clients if hasattr(c, "last")},
    }


def run_fl(cfg: FLConfig, *, progress: bool = False, grid: Any = None) -> list[dict[str, Any]]:
    """Run (or resume) the config's rounds; returns the per-round records.

    ``grid``: a Flower ``Grid`` when called from a deployed ``ServerApp``
    (:mod:`leakage.flower_app`): the rounds then go to the SuperNodes behind it
    instead of a simulation runtime this call starts.
    """
    from leakage.experiment import prepare_out
    from leakage.store import append_record, load_records

    out = prepare_out(cfg.out or Path("results") / f"fl-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("rounds", "out")}
    compared = {k: v for k, v in settings.items() if k not in EXECUTION_KEYS}
    stored = out / "config.json"
    if stored.exists():
        previous = json.loads(stored.read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(FLConfig)}
        now = json.loads(json.dumps(compared))
        # a key added to FLConfig after the run started counts as its default there
        diff = sorted(k for k in now if previous.get(k, defaults.get(k)) != now[k])
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(diff)}): "
                "use the same config or another --out"
            )
    else:
        stored.write_text(json.dumps(settings, indent=2) + "\n")
    records = load_records(out / "rounds.jsonl")
    finished = (out / "rounds.csv").exists() and (out / "state.pt").exists()
    if finished and records and records[-1]["round"] == cfg.rounds:
        return records  # done before: nothing to build, load or rerun
    server, test, attack = build_run(cfg)
    state_path = out / "state.pt"
    if state_path.exists():  # our own file: it holds the aggregator objects, so not weights_only
        state = torch.load(state_path, weights_only=False, map_location=cfg.device)
        server.model.load_state_dict(state["model"])
        server.round = state["round"]
        server.aggregator = state["aggregator"]
        server.post_aggregation = state["post_aggregation"]
        for c in server.clients:
            if c.client_id in state["lazy"]:
                c.last = state["lazy"][c.client_id]
        kept = [r for r in records if r["round"] <= server.round]
        if len(kept) != len(records):  # records past the saved state: that work is redone
            (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        records = kept
        if not records or records[-1]["round"] != server.round:  # cut after the state was saved
            record = {"round": server.round, **_evaluate(server, test, attack), "seconds": None}
            append_record(out / "rounds.jsonl", record)
            records.append(record)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.rounds, initial=server.round, disable=not progress, desc="rounds")
    clock = [time.perf_counter()]

    def after_round(_record=None) -> None:
        bar.update(1)
        t = server.round  # rounds done
        seconds, clock[0] = time.perf_counter() - clock[0], time.perf_counter()
        if t % cfg.eval_every and t != cfg.rounds:
            return
        record = {"round": t, **_evaluate(server, test, attack), "seconds": seconds}
        tmp = out / "state.pt.tmp"
        torch.save({"model": server.model.state_dict(), "round": t, **_stateful(server)}, tmp)
        tmp.replace(state_path)  # the state and the record of round t land together
        append_record(out / "rounds.jsonl", record)
        records.append(record)
        clock[0] = time.perf_counter()  # the next round's time leaves evaluation out

    if grid is not None:
        from fl_core.flower import server_main

        server_main(server, cfg.rounds - server.round, after_round)(grid, None)
    elif cfg.engine == "flower":
        from fl_core.flower import run_flower

        source = ConfigClients(json.dumps({**settings, "rounds": cfg.rounds}))
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
    """``rounds.csv`` and ``accuracy.png`` from the records."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it is

    cols = sorted({k for r in records for k in r}, key=lambda k: (k != "round", k))
    with (out / "rounds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r["accuracy"] for r in records], "o-", label="test accuracy")
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
    fig.savefig(out / "accuracy.png", dpi=120)


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
        help="YAML file (keys: see leakage.fl_cmd.FLConfig); optional when flags say it all",
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


def config_from_args(args: argparse.Namespace) -> FLConfig:
    """The run of ``leakage fl``: the YAML file (if any) with the flags laid over it."""
    import yaml

    from defenses.config import parse_name_params

    overrides: dict[str, Any] = {"out": args.out, "rounds": args.rounds}
    overrides["engine"] = getattr(args, "engine", None)
    for item in args.overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: write KEY=VALUE (e.g. --set num_clients=20)")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    if args.attack is not None:
        if args.attack.strip().lower() == "none":
            overrides["attack_args"] = {"enable": False}
        else:
            kind, params = parse_name_params(args.attack, "--attack")
            overrides["attack_args"] = {"enable": True, "type": kind, **params}
    if args.defenses is not None:
        if [d.strip().lower() for d in args.defenses] == ["none"]:
            overrides["defense_args"] = {"enable": False}
        else:
            items = [parse_name_params(d, "--defense") for d in args.defenses]
            overrides["defense_args"] = {"defenses": [{n: p or None} for n, p in items]}
    return load_fl_config(args.config, **overrides)


def run_fl_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    records = run_fl(cfg, progress=not args.quiet)
    last = records[-1] if records else {}
    extra = f"  backdoor {last['backdoor_success']:.3f}" if "backdoor_success" in last else ""
    print(f"round {last.get('round')}: accuracy {last.get('accuracy', float('nan')):.4f}{extra}")
    return 0
