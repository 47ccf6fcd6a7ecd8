"""Run a sweep's cells serially or in parallel (Ray, or a process pool), resumably.

A sweep is a list of cells (hashable, e.g. a tuple of the cell's settings) and a
function ``fn(cell) -> record`` (a JSON-able dict). :func:`run_cells` skips the
cells whose record is already in the store (``key(record) == cell``) and runs
the rest; the driver appends each record to the store (:mod:`leakage.app.store`) as
soon as its cell finishes, so an interrupted sweep loses at most the cells in
flight, and on resume runs only those and the ones never started.

Parallel cells run as Ray tasks (one CPU each, on a local instance with
``workers`` CPUs or on the cluster at ``ray_address``) or, without Ray, in a
pool of ``spawn`` processes. Every cell runs on ``threads`` torch threads and
in the driver's working directory wherever it runs, so its record does not
depend on the number of workers. The benchmark scripts are run by path (a
``benchmarks`` package from Opacus shadows the folder), so a function defined
in a script reaches the workers as a :class:`ScriptFunction`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .store import append_record, load_records

__all__ = [
    "BACKENDS",
    "ScriptFunction",
    "add_parallel_args",
    "check_parallel",
    "load_script",
    "parallel_options",
    "run_cells",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ray", "process")
Record = dict[str, Any]

_SCRIPTS: dict[str, ModuleType] = {}  # resolved path -> module, per process


def load_script(path: str | Path) -> ModuleType:
    """The module of the Python file ``path``, executed at most once per process.

    A module already loaded from that file (the running script's ``__main__``,
    a test's own copy) is reused; otherwise the file runs as a module named
    after it (registered in ``sys.modules`` first: dataclasses look it up).
    """
    path = os.path.realpath(path)
    if path in _SCRIPTS:
        return _SCRIPTS[path]
    name = Path(path).stem
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).name == Path(path).name and os.path.realpath(file) == path:
            _SCRIPTS[path] = module
            return module
    if name in sys.modules:  # another file took the name: load under a unique one
        name = f"_script_{name}_{abs(hash(path)):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python file: give the path of a script")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _SCRIPTS[path] = module
    return module


@dataclass(frozen=True)
class ScriptFunction:
    """A picklable reference to the function ``name`` of the script at ``path``.

    Calling it loads the script (once per process, see :func:`load_script`) and
    calls the function, so cells defined in a benchmark script run in spawned
    processes and Ray workers. Bind extra arguments with ``functools.partial``.
    The path is made absolute; on a Ray cluster it must exist on every node.
    """

    path: str
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.path.realpath(self.path))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(load_script(self.path), self.name)(*args, **kwargs)


def _run_cell(
    fn: Callable[[Any], Record], cell: Any, threads: int | None, cwd: str | None
) -> tuple[str, Any]:
    """One cell, in whichever process runs it: ``("ok", record)``, or ``("skip", why)`` for a
    ValueError (a cell its settings cannot run)."""
    if cwd is not None and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths (data roots, outputs) mean what they mean to the driver
    previous = None
    if threads is not None:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        return "ok", fn(cell)
    except ValueError as e:
        return "skip", (str(e).splitlines() or [type(e).__name__])[0]
    finally:
        if previous is not None:
            torch.set_num_threads(previous)


def _ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_parallel(
    *,
    workers: int = 1,
    backend: str = "auto",
    ray_address: str | None = None,
    threads: int | None = 1,
    gpus: float = 0.0,
) -> bool:
    """Check :func:`run_cells`' parallel options; returns whether they run on Ray.

    Scripts call it before any expensive set-up (training victims, loading data)
    so that a bad option costs nothing.
    """
    del gpus  # any fraction is valid; Ray checks it against the cluster
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers {workers}: use a positive integer")
    if threads is not None and threads < 1:
        raise ValueError(f"threads {threads}: use a positive integer, or None for torch's own")
    if ray_address is not None and backend == "process":
        raise ValueError("a Ray address needs backend 'ray' or 'auto', not 'process'")
    parallel = workers > 1 or ray_address is not None
    use_ray = parallel and backend != "process" and (backend == "ray" or _ray_available())
    if use_ray and not _ray_available():
        raise ValueError("Ray is not installed: pip install ray, or use backend 'process'")
    return use_ray


def run_cells(
    cells: Iterable[Hashable],
    fn: Callable[[Any], Record],
    *,
    store: str | Path | None,
    key: Callable[[Record], Hashable] | None = None,
    workers: int = 1,
    backend: str = "auto",
    ray_address: str | None = None,
    threads: int | None = 1,
    gpus: float = 0.0,
    label: Callable[[Any], str] = str,
    on_record: Callable[[Any, Record], None] | None = None,
) -> list[Record]:
    """Run every cell not yet in ``store``; append each record there as its cell finishes.

    Args:
        cells: the sweep's cells, in the order a serial run takes them.
        fn: ``fn(cell) -> record``; picklable when ``workers > 1`` (a module-level
            function, or a :class:`ScriptFunction`, optionally in a ``functools.partial``).
            A ValueError skips the cell (one line on stderr, via logging); any other
            exception stops the sweep after the finished cells are stored.
        store: the JSONL store (:mod:`leakage.app.store`), or ``None`` when ``fn`` keeps
            its own results (then every cell runs, and should resume itself).
        key: ``key(record)`` gives back the cell a stored record came from.
        workers: cells at once; 1 runs them in this process, in order. On a Ray
            cluster (``ray_address``), 1 means as many as the cluster has CPUs.
        backend: ``auto`` (Ray if installed, else processes), ``ray`` or ``process``.
        ray_address: a running Ray cluster (``HOST:PORT``); ``None`` starts a local
            instance with ``workers`` CPUs (or joins one this process already started).
        threads: torch threads per cell (``None``: leave torch's setting alone).
        gpus: GPUs (or a fraction of one) each Ray task reserves; Ray hides the GPUs
            from tasks that reserve none.
        label: how a cell is named in the skip line.
        on_record: called in the driver as ``on_record(cell, record)`` after each store.

    Returns:
        The records of the cells run now, in the order they finished.
    """
    use_ray = check_parallel(
        workers=workers, backend=backend, ray_address=ray_address, threads=threads
    )
    parallel = workers > 1 or ray_address is not None
    if store is not None and key is None:
        raise ValueError("a store needs key(record) -> cell to find the finished cells")
    cells = list(cells)
    if store is not None:
        finished = {key(r) for r in load_records(store)}
        cells = [c for c in cells if c not in finished]
    if not cells:
        return []
    done: list[Record] = []

    def finish(cell: Any, outcome: tuple[str, Any]) -> None:
        status, value = outcome
        if status == "skip":
            logger.warning("skip %s: %s", label(cell), value)
            return
        if store is not None:
            stored = key(json.loads(json.dumps(value)))  # what a resumed sweep will read
            if stored != cell:
                raise ValueError(
                    f"the record of cell {label(cell)} has key {stored!r}: "
                    "key(record) must give back the cell"
                )
            append_record(store, value)
        done.append(value)
        if on_record is not None:
            on_record(cell, value)

    cwd = os.getcwd()
    if not parallel:
        for cell in cells:
            finish(cell, _run_cell(fn, cell, threads, cwd))
    elif use_ray:
        _on_ray(cells, fn, finish, workers, ray_address, threads, gpus, cwd)
    else:
        _in_processes(cells, fn, finish, workers, threads, cwd)
    return done


def _in_processes(cells, fn, finish, workers, threads, cwd) -> None:
    """The cells in a pool of ``workers`` spawned processes, stored as they finish."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending = {pool.submit(_run_cell, fn, c, threads, cwd): c for c in cells}
    try:
        while pending:
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                finish(pending.pop(future), future.result())
    except BaseException:
        for future in [f for f in pending if f.done() and not f.cancelled()]:
            if future.exception() is None:  # finished while we were stopping: keep it
                finish(pending.pop(future), future.result())
        processes = list((pool._processes or {}).values())  # no public way before 3.14
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # the cells in flight are lost, as in an interruption
            p.terminate()
        raise
    pool.shutdown()


def _on_ray(cells, fn, finish, workers, ray_address, threads, gpus, cwd) -> None:
    """The cells as Ray tasks (one CPU each), at most ``workers`` in flight."""
    import ray

    started = not ray.is_initialized()
    if started:
        with warnings.catch_warnings():  # a tip on GPU visibility: `gpus` takes care of it
            warnings.simplefilter("ignore", FutureWarning)
            if ray_address is None:  # "local": never join a cluster someone else started
                ray.init(address="local", num_cpus=workers, include_dashboard=False)
            else:
                ray.init(address=ray_address)
    try:
        limit = workers if workers > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_run_cell)
        fn_ref = ray.put(fn)
        todo, pending = list(reversed(cells)), {}
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    cell = todo.pop()
                    pending[task.remote(fn_ref, cell, threads, cwd)] = cell
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    finish(pending.pop(ref), ray.get(ref))
        except BaseException:
            refs = list(pending)
            ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
            for ref in ready:  # finished while we were stopping: keep the ones that worked
                try:
                    outcome = ray.get(ref)
                except Exception:
                    continue
                finish(pending.pop(ref), outcome)
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers``, ``--ray-address``, ``--backend`` and ``--threads`` to a script."""

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value}: use a positive integer")
        return value

    group = parser.add_argument_group("parallel sweeps (see leakage.app.sweep)")
    group.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="cells at once (default 1: in this process, in order); with --ray-address, "
        "1 means as many as the cluster has CPUs",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run the cells on this Ray cluster (`ray start --head` on one machine)",
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto: Ray if installed, else a process pool (default auto)",
    )
    group.add_argument(
        "--threads",
        type=positive,
        default=1,
        help="torch threads per cell (default 1: results do not depend on --workers)",
    )


def parallel_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_cells` keywords from :func:`add_parallel_args`'s flags (defaults if absent:
    serial, torch's threads untouched)."""
    return {
        "workers": getattr(args, "workers", 1),
        "backend": getattr(args, "backend", "auto"),
        "ray_address": getattr(args, "ray_address", None),
        "threads": getattr(args, "threads", None),
    }
