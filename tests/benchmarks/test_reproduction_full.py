"""The full reproductions (hours on 2 cores), marked slow: every source claim against the lab.

    pytest -m slow tests/benchmarks/test_reproduction_full.py

Runs (or resumes) ``benchmarks/reproduction.py`` into ``$LEAKAGE_REPRO_OUT``
(default ``benchmarks/out/reproduction``, where the script itself writes, so
runs finished there are not repeated), then checks each numeric claim within
``TOLERANCE`` of the source's number and each qualitative claim by its
criterion (``reproduction.VERDICTS``). Claims the lab's runs did not
reproduce are strict xfails that name the measured numbers: if a later run
reproduces them, the xfail fails and asks to be removed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "reproduction", _ROOT / "benchmarks" / "reproduction.py"
)
rep = importlib.util.module_from_spec(_spec)
sys.modules["reproduction"] = rep
_spec.loader.exec_module(rep)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]

TOLERANCE = 0.02  # 2 accuracy points: the spread of the lab's FL runs around the source's

# Measured on this machine (benchmarks/REPRODUCTION.md); each names why it differs.
NOT_REPRODUCED = {
    ("fedavg", "centralized"): "83.39% vs 87.74%: the source's centralised step budget is not "
    "stated; 20 x 500 SGD steps of batch 20 is a guess",
    ("robust_one_round", "median-ratio0.4"): "72.82% vs 70.37%: the lab's median loses less at "
    "ratio 0.4 than the source's (+2.45 pts); the claim's direction holds",
    ("robust_gd", "The median stays stable as the Byzantine ratio grows"): "at 150 images per "
    "client the sigmoid CNN's initial plateau decides: median 66.98 / 10.00 / 60.35 / 10.00% at "
    "ratios 0 / 0.1 / 0.2 / 0.4, the 10% runs never learned; with 600 images per client "
    "(robust_gd_scale) the median at 0.1 reaches 78.00%",
    ("robust_gd", "The trimmed mean (beta = ratio) stays stable as the ratio grows"): "the same "
    "plateau: trimmed mean 10.00 / 10.00 / 54.17% at ratios 0.1 / 0.2 / 0.4",
    ("label_flip_krum", "Krum restores the clean accuracy at 50%"): "Krum (f = 0, n = 4) picks "
    "one of the two flipped clients: 1.68% against FedAvg's clean 76.91%",
}

CUDA_ONLY = {"robust_gd_full": "40 hours"}  # 11 runs of 3.5 hours


_DONE: set[str] = set()  # experiments run (or found finished) in this session


@pytest.fixture
def out(shared_datasets) -> Path:
    return Path(os.environ.get("LEAKAGE_REPRO_OUT", _ROOT / "benchmarks" / "out" / "reproduction"))


@pytest.fixture
def ran(out, shared_datasets):
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(name: str) -> None:
        if name in CUDA_ONLY and device == "cpu":
            pytest.skip(f"{name} needs about {CUDA_ONLY[name]} on one CPU core: run it with CUDA")
        if name not in _DONE:
            rep.run_experiment(name, _args(out, shared_datasets, device))
            _DONE.add(name)

    return run


def _xfail(key):
    reason = NOT_REPRODUCED.get(key)
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


def _args(out: Path, data_root="data", device="cpu") -> Namespace:
    """The runs go to ``out``, their records to ``out/records`` (not the committed ones)."""
    return Namespace(quick=False, data_root=str(data_root), out=out, results=out / "records",
                     seed=0, device=device)  # fmt: skip


def _records(name: str, out: Path) -> dict:
    """The records of the experiment's runs finished (this session or before) under ``out``."""
    return rep.current_records(name, _args(out))[0]


@pytest.mark.parametrize(
    "name, run_name",
    [pytest.param(n, r, marks=_xfail((n, r))) for n, c in rep.CLAIMS.items() for r in c],
)
def test_numeric_claim(name, run_name, ran, out):
    ran(name)
    got = rep._final(_records(name, out), run_name)
    claim = rep.CLAIMS[name][run_name]
    assert got is not None and abs(got - claim) <= TOLERANCE, (got, claim)


@pytest.mark.parametrize(
    "name, claim",
    [
        pytest.param(n, v.claim, marks=_xfail((n, v.claim)))
        for n, vs in rep.VERDICTS.items()
        for v in vs
    ],
)
def test_qualitative_claim(name, claim, ran, out):
    ran(name)
    verdict = next(v for v in rep.VERDICTS[name] if v.claim == claim)
    result = verdict.check(rep._accuracies(_records(name, out), name))
    assert result is not None and result[0], result
