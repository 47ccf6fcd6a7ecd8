"""``leakage attack --threads``: one thread for small victims, a clear error for bad counts."""

from __future__ import annotations

import json

import pytest
import torch

from fl_core import build_model
from leakage.app.cli import main
from leakage.app.experiment import SMALL_VICTIM_PARAMS, resolve_threads


def test_auto_runs_small_victims_on_one_thread_and_leaves_large_ones():
    lenet = build_model("lenet")  # 15,826 parameters
    resnet = build_model("resnet20")  # 269,722
    assert sum(p.numel() for p in lenet.parameters()) < SMALL_VICTIM_PARAMS
    assert sum(p.numel() for p in resnet.parameters()) > SMALL_VICTIM_PARAMS
    assert resolve_threads("auto", lenet, "cpu") == 1
    assert resolve_threads("auto", resnet, "cpu") is None  # torch's default
    assert resolve_threads("auto", lenet, "cuda") is None  # CPU threads do not matter there
    assert resolve_threads(3, resnet, "cpu") == 3
    assert resolve_threads(None, lenet, "cpu") is None


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        resolve_threads(bad, build_model("lenet"), "cpu")


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_cli_refuses_bad_threads_in_one_line(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["attack", "--threads", bad, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_attack_records_and_restores_its_threads(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "run"
    code = main(
        ["attack", "--attack", "idlg", "--steps", "2", "--restarts", "1", "--quiet"]
        + ["--out", str(out), "--threads", "auto"]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["threads"] == 1  # the default LeNet is a small victim
    assert torch.get_num_threads() == before
