"""The default ``leakage attack`` alone and beside one busy CPU-bound process, per thread setting.

On a machine with few cores, torch's OpenMP threads spin at every barrier; a
second process that keeps one core busy then stalls every parallel region of
an attack whose kernels are small (the default job's LeNet: 15,826
parameters), and a run of seconds takes minutes. ``leakage attack --threads
auto`` (the default) runs victims under ``SMALL_VICTIM_PARAMS`` parameters on
one thread. This script measures both settings, alone and beside a busy
process (a Python loop that keeps one core at 100%), each run a fresh
``python -m leakage attack`` process (the README's default job: DLG on the
bundled sample photograph, sigmoid LeNet), and reports the attack's own
seconds from its ``results.json``. A run that passes ``--timeout`` seconds is
stopped and reported as such.

    python benchmarks/threads.py                      # writes benchmarks/results/threads/
    python benchmarks/threads.py --repeats 3 --timeout 600

Writes ``records.jsonl`` (one line per run, resumable) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakage.app.store import append_record, load_records, write_atomic  # noqa: E402

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def one_run(threads: str, busy: bool, timeout: float) -> dict:
    """One default attack in a fresh process; ``seconds`` None when it timed out."""
    hog = None
    if busy:
        hog = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=timeout + 60)])
        time.sleep(1.0)  # the loop is running before the attack starts
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "run"
            cmd = [sys.executable, "-m", "leakage", "attack", "--quiet", "--out", str(out)]
            cmd += ["--threads", threads]
            start = time.perf_counter()
            try:
                subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout, capture_output=True)
            except subprocess.TimeoutExpired:
                return {"seconds": None, "wall": time.perf_counter() - start, "timed_out": True}
            result = json.loads((out / "results.json").read_text())
            return {
                "seconds": result["seconds"],
                "wall": time.perf_counter() - start,
                "timed_out": False,
                "threads_used": result["threads"],
                "psnr": result["summary"]["psnr"],
            }
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument(
        "--settings",
        nargs="+",
        default=[str(os.cpu_count()), "auto"],
        help="--threads values to compare (default: the core count, torch's default, and auto)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/threads"))
    args = p.parse_args(argv)
    if args.repeats < 1 or not args.timeout > 0:
        p.error("--repeats must be positive and --timeout above 0")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "records.jsonl"
    done = load_records(store)
    for repeat in range(args.repeats):
        for busy in (False, True):
            for threads in args.settings:
                key = {"threads": threads, "busy": busy, "repeat": repeat}
                if any(all(r.get(k) == v for k, v in key.items()) for r in done):
                    continue
                r = {**key, "cores": os.cpu_count(), **one_run(threads, busy, args.timeout)}
                append_record(store, r)
                done.append(r)
                print(json.dumps(r), flush=True)
    lines = [
        "# The default `leakage attack`, alone and beside one busy process",
        "",
        f"Command: `python benchmarks/threads.py --repeats {args.repeats} --timeout "
        f"{args.timeout:g}`. {os.cpu_count()} cores. Seconds: the attack's own time from "
        "`results.json` (median over repeats); busy: a Python loop keeps one core at 100% "
        "throughout. `>T`: stopped at the timeout.",
        "",
        "| --threads | threads used | alone s | beside a busy process s | slow-down |",
        "|---|--:|--:|--:|--:|",
    ]
    for threads in args.settings:

        def median(busy: bool, threads: str = threads) -> float | None:
            rs = [r for r in done if r["threads"] == threads and r["busy"] == busy]
            if not rs or any(r["timed_out"] for r in rs):
                return None
            return statistics.median(r["seconds"] for r in rs)

        alone, busy = median(False), median(True)
        used = {r.get("threads_used") for r in done if r["threads"] == threads} - {None}
        cell = f">{args.timeout:g}" if busy is None else f"{busy:.1f}"
        ratio = "–" if busy is None or alone is None else f"{busy / alone:.1f}x"
        lines.append(
            f"| {threads} | {', '.join(map(str, sorted(used)))} | "
            f"{'–' if alone is None else f'{alone:.1f}'} | {cell} | {ratio} |"
        )
    text = "\n".join(lines) + "\n"
    write_atomic(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
