"""The engine throughput benchmark: measures, tabulates, checks targets, resumes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from leakage.app.store import load_records

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fl_throughput.py"
_spec = importlib.util.spec_from_file_location("fl_throughput", _SCRIPT)
thr = importlib.util.module_from_spec(_spec)
sys.modules["fl_throughput"] = thr
_spec.loader.exec_module(thr)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_measures_the_local_engines_and_resumes(tmp_path, capsys):
    argv = ["--dataset", "samples", "--models", "lenet", "--clients", "4", "--per-client", "2",
            "--rounds", "1", "--engines", "loop", "batched", "--out", str(tmp_path)]  # fmt: skip
    assert thr.main(argv) == 0
    records = load_records(tmp_path / "throughput.jsonl")
    assert sorted(r["engine"] for r in records) == ["batched", "loop"]
    assert all(r["updates_per_s"] > 0 and r["clients"] == 4 for r in records)
    table = (tmp_path / "throughput.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| lenet | 4 |"))
    assert row.count("x |") == 1  # batched / loop measured, batched / flower not
    # a rerun finds both measured and adds nothing
    assert thr.main(argv) == 0
    assert len(load_records(tmp_path / "throughput.jsonl")) == 2
    capsys.readouterr()


def test_targets_are_checked_against_the_stated_setting():
    args = thr.argparse.Namespace(algorithm="fedsgd", local_steps=5, per_client=1, device="cpu")
    base = {"model": "lenet", "clients": 100, "algorithm": "fedsgd", "local_steps": 1,
            "per_client": 1, "device": "cpu", "threads": thr.torch.get_num_threads()}  # fmt: skip
    records = [
        {**base, "engine": "loop", "updates_per_s": 100.0},
        {**base, "engine": "batched", "updates_per_s": 250.0},
        {**base, "engine": "flower", "updates_per_s": 10.0},
        {**base, "engine": "batched", "per_client": 8, "updates_per_s": 1e6},  # another setting
    ]
    lines = thr.check_targets(records, args)
    assert any("10x flower" in ln and "25.0x, met" in ln for ln in lines), lines
    assert any("3x loop" in ln and "2.5x, NOT met" in ln for ln in lines), lines
