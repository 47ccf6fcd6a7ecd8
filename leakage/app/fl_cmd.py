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
import math
import os
import time
from dataclasses import dataclass
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

from .fl_config import (  # noqa: F401  (the run's names import from here too)
    ENGINES,
    EXECUTION_KEYS,
    FLConfig,
    load_fl_config,
    make_fl_config,
)


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
        engine={True: "batched", False: "loop", "compiled": "compiled"}.get(cfg.batched, "auto"),
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
    from leakage.app.outputs import prepare_out

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
        help="YAML file (keys: see leakage.app.fl_config.FLConfig); optional when flags say it all",
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
    return make_fl_config(args.config, overrides)


def run_fl_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    records = run_fl(cfg, progress=not args.quiet)
    last = records[-1] if records else {}
    extra = f"  backdoor {last['backdoor_success']:.3f}" if "backdoor_success" in last else ""
    print(f"round {last.get('round')}: accuracy {last.get('accuracy', float('nan')):.4f}{extra}")
    return 0
