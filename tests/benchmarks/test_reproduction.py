"""The reproduction runner: a quick pass of every experiment resumes and reports."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from leakage.app.store import load_records
from leakage.app.sweep import load_script

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduction.py"
_spec = importlib.util.spec_from_file_location("reproduction", _SCRIPT)
rep = importlib.util.module_from_spec(_spec)
sys.modules["reproduction"] = rep  # dataclasses look their module up while the script loads
_spec.loader.exec_module(rep)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_quick_pass_reports_every_claim_and_resumes(shared_datasets, tmp_path, capsys):
    argv = ["--quick", "--data-root", str(shared_datasets), "--out", str(tmp_path / "runs"),
            "--report-file", str(tmp_path / "R.md"),
            "--figures", str(tmp_path / "figures")]  # fmt: skip
    assert rep.main(argv) == 0
    report = (tmp_path / "R.md").read_text()
    for claims in rep.CLAIMS.values():
        for run_name in claims:
            row = next(line for line in report.splitlines() if line.startswith(f"| {run_name} |"))
            assert "–" not in row, row  # every run finished and was reported
    for name, verdicts in rep.VERDICTS.items():
        section = report.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for v in verdicts:  # every qualitative claim was decided (either way) on the runs
            row = next(line for line in section.splitlines() if line.startswith(f"| {v.claim} |"))
            assert "pending" not in row and "held**" in row, row
    assert (tmp_path / "figures" / "robust_gd.png").exists()
    # a second pass finds every run done and adds no record
    before = load_records(tmp_path / "runs" / "fedavg" / "M10-iid" / "rounds.jsonl")
    assert rep.main(argv) == 0
    after = load_records(tmp_path / "runs" / "fedavg" / "M10-iid" / "rounds.jsonl")
    assert before == after and len(after) == 2
    # the records alone rebuild the same report: nothing under --out is needed
    records = tmp_path / "runs" / "records"
    assert {p.stem for p in records.glob("*.json")} == set(rep.EXPERIMENTS)
    moved = tmp_path / "records"
    records.rename(moved)
    for folder in (tmp_path / "runs").iterdir():
        shutil.rmtree(folder)
    again = argv + ["--report", "--results", str(moved), "--report-file", str(tmp_path / "R2.md")]
    assert rep.main(again) == 0
    assert (tmp_path / "R2.md").read_text() == report.replace(str(records), str(moved))
    # a record measured under other settings (a default changed since) is left out as stale
    path = moved / "fedavg.json"
    doc = json.loads(path.read_text())
    doc["runs"]["M10-iid"]["settings"]["weighting"] = "processed"
    path.write_text(json.dumps(doc))
    assert rep.main(again) == 0
    stale = (tmp_path / "R2.md").read_text()
    assert "| M10-iid | 86.17% | – | – |" in stale
    assert "measured under settings the runs no longer have (rerun them): M10-iid." in stale
    capsys.readouterr()


def test_an_interrupted_pass_keeps_the_runs_it_finished(shared_datasets, tmp_path, monkeypatch):
    args = argparse.Namespace(quick=True, data_root=str(shared_datasets), out=tmp_path / "runs",
                              results=tmp_path / "records", seed=0, device="cpu", runs=None,
                              workers=1, ray_address=None, threads=1)  # fmt: skip
    script = load_script(os.path.realpath(_SCRIPT))  # the copy run_cells calls into
    real = script.run_fl

    calls, dies = [], ["mean-flip25"]

    def dies_on_the_second(cfg):
        calls.append(Path(cfg.out).name)
        if Path(cfg.out).name in dies:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(script, "run_fl", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        rep.run_experiments(["label_flip_krum"], args)
    kept = rep.load_results("label_flip_krum", args)
    assert list(kept) == ["mean-flip0", "krum-flip0"]  # recorded as each finished
    assert kept["mean-flip0"]["curve"][-1] == [2, kept["mean-flip0"]["accuracy"]]
    calls.clear(), dies.clear()
    rep.run_experiments(["label_flip_krum"], args)  # resumes: the recorded two are not rerun
    assert calls == ["mean-flip25", "krum-flip25", "mean-flip50", "krum-flip50"]
    assert list(rep.load_results("label_flip_krum", args)) == list(rep.EXPERIMENTS[
        "label_flip_krum"]())  # fmt: skip


def _gd(mean, median, trimmed):
    """Final accuracies of the gradient-descent study, per rule, at ratios 0, 0.1, 0.2, 0.4."""
    acc = {f"mean-ratio{r:g}": a for r, a in zip(rep.RATIOS, mean)}
    acc |= {f"median-ratio{r:g}": a for r, a in zip(rep.RATIOS, median)}
    acc |= {f"trimmed_mean-ratio{r:g}": a for r, a in zip(rep.RATIOS[1:], trimmed)}
    return acc


def _decide(name, acc):
    return [None if (r := v.check(acc)) is None else r[0] for v in rep.VERDICTS[name]]


def test_gd_verdicts_follow_their_criteria():
    # the source's picture: robust rules flat, the mean falls
    assert _decide("robust_gd", _gd([.7, .68, .6, .3], [.7, .7, .69, .66], [.7, .69, .67])) == [
        True, True, True]  # fmt: skip
    # the median losing 6 pts, the trimmed mean 5.5, the mean only 9: none holds
    assert _decide("robust_gd", _gd([.7, .68, .65, .61], [.7, .69, .66, .64], [.7, .68, .645])) == [
        False, False, False]  # fmt: skip
    acc = _gd([0.7, 0.68, 0.6, 0.3], [0.7, 0.7, 0.69, 0.66], [0.7, 0.69, 0.67])
    acc["median-ratio0.4"] = None  # unfinished: that claim waits, the others are decided
    assert _decide("robust_gd", acc) == [None, True, True]


def test_label_flip_and_fedml_verdicts_follow_their_criteria():
    acc = {"mean-flip0": .85, "mean-flip25": .80, "mean-flip50": .60, "krum-flip0": .84,
           "krum-flip25": .84, "krum-flip50": .55}  # fmt: skip
    assert _decide("label_flip_krum", acc) == [True, True, True, False]
    acc["mean-flip25"] = 0.835  # 1.5 pts: within noise, not a loss
    assert _decide("label_flip_krum", acc)[0] is False

    fedml = {"fedavg-none": .5, "fedavg-byz-random": .1, "fedavg-byz-zero": .48,
             "fedavg-byz-flip": .3, "fedavg-label-flip": .47}  # fmt: skip
    fedml |= {f"{d}-none": 0.45 for d in rep.FEDML_DEFENSES}
    fedml |= {"multi_krum-byz-random": 0.44}
    assert _decide("fedmlsecurity", fedml) == [True, True, True]
    fedml |= {"fedavg-byz-flip": 0.05, "median-none": 0.51, "multi_krum-byz-random": 0.40}
    assert _decide("fedmlsecurity", fedml) == [False, False, False]
