"""The privacy-utility sweep: a smoke run that resumes, reports and refuses mixed settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "privacy_utility.py"
_spec = importlib.util.spec_from_file_location("privacy_utility", _SCRIPT)
pu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pu)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _argv(root, out, *extra):
    return [
        "--data-root", str(root), "--out", str(out), "--families", "none", "prune",
        "--attacks", "dlg", "--images", "1", "--attack-steps", "2", "--rounds", "2",
        "--train-limit", "200", "--test-limit", "100", "--clients", "2", *extra,
    ]  # fmt: skip


def test_sweep_resumes_and_writes_the_report(shared_datasets, tmp_path, capsys):
    out = tmp_path / "pu"
    assert pu.main(_argv(shared_datasets, out)) == 0
    records = pu.load_records(out / "records.jsonl")
    points = 1 + len(pu.GRID["prune"])
    assert len(records) == 2 * points  # one utility run and one attack per point
    assert {r["part"] for r in records} == {"utility", "attack"}
    assert (out / "report.md").exists() and (out / "frontier.png").exists()

    # an interruption mid-write leaves a cut line: only that measurement is redone
    lines = (out / "records.jsonl").read_text().splitlines()
    cut = json.loads(lines[-1])
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert pu.main(_argv(shared_datasets, out)) == 0
    again = pu.load_records(out / "records.jsonl")
    assert len(again) == len(records)
    assert pu.record_key(again[-1]) == pu.record_key(cut)
    assert again[-1]["psnr" if cut["part"] == "attack" else "accuracy"] == pytest.approx(
        cut["psnr" if cut["part"] == "attack" else "accuracy"]
    )  # the same seed gives the same number

    with pytest.raises(SystemExit, match="other settings"):
        pu.main(_argv(shared_datasets, out, "--rounds", "3"))
    capsys.readouterr()


def _records():
    """Hand-made records: two attacks on two images at three points of one family."""
    out = [
        {"family": "none", "strength": "none", "part": "utility", "accuracy": 0.80},
        {"family": "prune", "strength": "10%", "part": "utility", "accuracy": 0.79},
        {"family": "prune", "strength": "50%", "part": "utility", "accuracy": 0.70},
        {"family": "prune", "strength": "90%", "part": "utility", "accuracy": 0.60},
    ]
    psnr = {  # (strength, attack) -> per-image PSNRs
        ("none", "dlg"): (50, 40), ("none", "ig"): (30, 20),
        ("10%", "dlg"): (30, 20), ("10%", "ig"): (14, 12),
        ("50%", "dlg"): (10, 8), ("50%", "ig"): (13, 12),  # IG mean 12.5: not defeated
        ("90%", "dlg"): (5, 5), ("90%", "ig"): (9, 7),
    }  # fmt: skip
    for (strength, attack), values in psnr.items():
        family = "none" if strength == "none" else "prune"
        for image, v in enumerate(values):
            out.append(
                {"family": family, "strength": strength, "part": "attack", "attack": attack,
                 "image": image, "psnr": float(v), "ssim": 0.5, "label_accuracy": 1.0}
            )  # fmt: skip
    return out


def test_summary_means_and_headline_pick():
    budgets = dict(pu.ATTACK_BUDGETS)
    try:
        pu.ATTACK_BUDGETS.clear()
        pu.ATTACK_BUDGETS.update({"dlg": {}, "ig": {}})
        rows = pu.summarise(_records())
        by = {(r["family"], r["strength"]): r for r in rows}
        assert by[("none", "none")]["dlg_psnr"] == 45.0 and by[("none", "none")]["top_psnr"] == 45
        assert by[("prune", "50%")]["top_psnr"] == 12.5  # the best attack's mean, not the min
        text = "\n".join(pu.headlines(rows, test_n=2000))
        # 50% leaves IG at 12.5 dB (not < 12); 90% is the weakest defeating both, at cost 0.2
        assert "| prune | 90% | 8.0 (ig) | 0.600 | 0.200 |" in text
        incomplete = [
            r for r in _records() if not (r.get("attack") == "ig" and r["strength"] == "90%")
        ]
        text = "\n".join(pu.headlines(pu.summarise(incomplete), test_n=2000))
        assert "| prune | none in the grid" in text  # DLG alone cannot claim "every attack"
    finally:
        pu.ATTACK_BUDGETS.clear()
        pu.ATTACK_BUDGETS.update(budgets)
