"""Client updates per second of the three engines: the client loop, the batched path, Flower.

One FL run per (victim, client count, engine), built from the same
:class:`~leakage.app.fl_config.FLConfig` as ``leakage fl``: Fashion-MNIST (or any
dataset), ``--per-client`` images per client, every client in every round.

* ``loop``: the in-process server, one client after the other on a working
  copy of the global model (``batched: false``);
* ``batched``: the in-process server, all clients in one vectorised call
  (``torch.func`` ``vmap``, :mod:`fl_core.batched`);
* ``flower``: the same rounds as a Flower ServerApp and ClientApps on Flower's
  simulation runtime (local Ray instance, one actor per CPU,
  :mod:`fl_core.flower`).

Each measurement runs one warm-up round (Ray and actor start-up, first-call
costs) and times the next ``--rounds`` rounds, the server's aggregation
included; the figure is clients x rounds / seconds. The targets of the
engine work are printed against the measurement: batched >= 10x Flower and
>= 3x the loop for lenet FedSGD with 100 clients.

    python benchmarks/fl_throughput.py                            # lenet, cnn x 10, 100, 1000
    python benchmarks/fl_throughput.py --models lenet --clients 100 --engines loop batched
    python benchmarks/fl_throughput.py --algorithm fedavg --local-steps 5 --device cuda

Results are appended to ``<out>/throughput.jsonl`` (one line per
measurement, tagged with its setting, thread count and device; a measured
setting is not remeasured without ``--again``), and ``<out>/throughput.md``
holds one table per setting measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from leakage.app.fl_cmd import ConfigClients, FLConfig, build_run
from leakage.app.store import append_record, load_records

ENGINES = ("loop", "batched", "flower")
ENGINE_CHOICES = (*ENGINES, "compiled")
"""``compiled``: the batched path through ``torch.compile`` (``batched: compiled``),
measured on request; the warm-up round compiles (its seconds: ``warmup_s``)."""
TARGETS = {("batched", "flower"): 10.0, ("batched", "loop"): 3.0}
"""(faster, slower) -> the speed-up asked for, at lenet FedSGD with 100 clients."""


def config(args: argparse.Namespace, model: str, clients: int, engine: str) -> FLConfig:
    return FLConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        train_limit=clients * args.per_client,
        test_limit=100,
        model=model,
        num_clients=clients,
        rounds=args.rounds + 1,
        algorithm=args.algorithm,
        local_steps=args.local_steps,
        batch_size=args.per_client,
        lr=0.01,
        seed=args.seed,
        device=args.device,
        batched={"batched": True, "compiled": "compiled"}.get(engine, False),
        engine="flower" if engine == "flower" else "local",
    )


def measure(args: argparse.Namespace, model: str, clients: int, engine: str) -> dict:
    """Updates per second of ``args.rounds`` timed rounds after one warm-up round."""
    cfg = config(args, model, clients, engine)
    server, _, _ = build_run(cfg)
    start = time.perf_counter()
    stamps: list[float] = []
    if engine == "flower":
        from fl_core.flower import run_flower

        source = ConfigClients(json.dumps(cfg.to_dict()))
        run_flower(
            server,
            source,
            cfg.rounds,
            on_round=lambda _: stamps.append(time.perf_counter()),
            num_cpus=args.flower_cpus,
            gpus_per_client=0.0 if args.device == "cpu" else 1.0 / args.flower_cpus,
        )
    else:
        for _ in range(cfg.rounds):
            server.run_round()
            if args.device != "cpu":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    seconds = stamps[-1] - stamps[0]
    return {
        "model": model,
        "clients": clients,
        "engine": engine,
        "algorithm": args.algorithm,
        "local_steps": args.local_steps if args.algorithm == "fedavg" else 1,
        "per_client": args.per_client,
        "rounds": args.rounds,
        "seconds": seconds,
        "updates_per_s": clients * args.rounds / seconds,
        "warmup_s": stamps[0] - start,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.node(),
    }


def key(r: dict) -> tuple:
    return (r["model"], r["clients"], r["engine"], r["algorithm"], r["local_steps"],
            r["per_client"], r["device"], r["threads"])  # fmt: skip


def setting_of(r: dict) -> tuple:
    """What a measurement's figure depends on besides model, clients and engine."""
    return (r["algorithm"], r["local_steps"], r["per_client"], r["device"], r["threads"])


def args_setting(args: argparse.Namespace) -> tuple:
    steps = args.local_steps if args.algorithm == "fedavg" else 1
    return (args.algorithm, steps, args.per_client, args.device, torch.get_num_threads())


def same_setting(r: dict, args: argparse.Namespace) -> bool:
    """Whether a stored measurement was taken with this invocation's settings."""
    return setting_of(r) == args_setting(args)


def table(records: list[dict], setting: tuple) -> str:
    """One Markdown table: the measurements of one setting, engines side by side."""
    algorithm, steps, per_client, device, threads = setting
    rows = {}
    for r in records:
        if setting_of(r) == setting:
            rows[(r["model"], r["clients"], r["engine"])] = r["updates_per_s"]
    lines = [
        f"Client updates per second, {algorithm}"
        + (f" ({steps} local steps)" if algorithm == "fedavg" else "")
        + f", {per_client} image(s) per client, {device}, {threads} threads:",
        "",
        "| model | clients | " + " | ".join(ENGINES) + " | batched / loop | batched / flower |",
        "|---|---:|" + "---:|" * (len(ENGINES) + 2),
    ]
    for model, clients in sorted({(m, c) for m, c, _ in rows}):
        got = [rows.get((model, clients, e)) for e in ENGINES]
        loop, batched, flower = got
        ratio = lambda x, y: f"{x / y:.1f}x" if x and y else "-"  # noqa: E731
        cells = [f"{v:,.0f}" if v else "-" for v in got]
        lines.append(f"| {model} | {clients} | " + " | ".join(cells)
                     + f" | {ratio(batched, loop)} | {ratio(batched, flower)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def check_targets(records: list[dict], args: argparse.Namespace) -> list[str]:
    """The engine work's targets against this machine's lenet FedSGD, 100-client figures."""
    got = {
        r["engine"]: r["updates_per_s"]
        for r in records
        if (r["model"], r["clients"], r["algorithm"]) == ("lenet", 100, "fedsgd")
        and same_setting(r, args)
    }
    out = []
    for (fast, slow), target in TARGETS.items():
        if fast in got and slow in got:
            x = got[fast] / got[slow]
            verdict = "met" if x >= target else "NOT met"
            out.append(f"target {fast} >= {target:g}x {slow} (lenet fedsgd, 100 clients): "
                       f"{x:.1f}x, {verdict}")  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["lenet", "cnn"])
    p.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINE_CHOICES)
    p.add_argument("--algorithm", default="fedsgd", choices=["fedsgd", "fedavg"])
    p.add_argument("--local-steps", type=int, default=5, help="FedAvg local steps")
    p.add_argument("--per-client", type=int, default=1, help="images per client (= batch)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--flower-cpus",
        type=int,
        default=os.cpu_count() or 1,
        help="CPUs of Flower's local Ray instance (one ClientApp actor each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fl_throughput"))
    p.add_argument("--again", action="store_true", help="remeasure settings already measured")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "throughput.jsonl"
    records = load_records(path)
    done = {key(r) for r in records}
    for model in args.models:
        for clients in args.clients:
            for engine in args.engines:
                probe = {"model": model, "clients": clients, "engine": engine,
                         "algorithm": args.algorithm, "per_client": args.per_client,
                         "local_steps": args.local_steps if args.algorithm == "fedavg" else 1,
                         "device": args.device, "threads": torch.get_num_threads()}  # fmt: skip
                if key(probe) in done and not args.again:
                    continue
                try:
                    r = measure(args, model, clients, engine)
                except (ValueError, ImportError) as e:
                    print(f"skip {model}/{clients}/{engine}: {str(e).splitlines()[0]}",
                          file=sys.stderr)  # fmt: skip
                    continue
                append_record(path, r)
                records = [x for x in records if key(x) != key(r)] + [r]
                print(f"{model:6s} {clients:5d} clients {engine:8s} "
                      f"{r['updates_per_s']:10,.0f} updates/s", flush=True)  # fmt: skip
    text = table(records, args_setting(args)) + "\n" + "\n".join(check_targets(records, args))
    print("\n" + text)
    sections = []
    for setting in sorted({setting_of(r) for r in records}):
        sections.append(table(records, setting))
        view = argparse.Namespace(algorithm=setting[0], local_steps=setting[1],
                                  per_client=setting[2], device=setting[3])  # fmt: skip
        if setting[4] == torch.get_num_threads():
            sections[-1] += "".join(f"\n{line}\n" for line in check_targets(records, view))
    (args.out / "throughput.md").write_text("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
