"""The attack suite's table: rows merged from an earlier table, the best attack per cell.

Expected values are the hand-made inputs' own: the best row of a cell is the
one with the highest mean PSNR (ties to the faster attack), and a merged
earlier row survives only where the new cells measure nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

from leakage.app.sweep import load_script

SUITE = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "attack_suite.py")


def _cell(attack, victim, psnr, seconds=1.0, seed=0, batch=1, threat="fedsgd"):
    return {
        "dataset": "cifar10", "attack": attack, "victim": victim, "batch": batch,
        "threat": threat, "seed": seed, "psnr": psnr, "ssim": psnr / 100,
        "label_set_accuracy": 1.0, "label_count_accuracy": 1.0, "seconds": seconds,
        "budget": "closed form",
    }  # fmt: skip


def test_best_column_and_merge(tmp_path):
    earlier_dir = tmp_path / "earlier"
    earlier_dir.mkdir()
    SUITE.write_tables(
        [
            _cell("dlg", "lenet-sigmoid", 40.0),
            _cell("ig", "lenet-sigmoid", 17.0),
            _cell("rgap", "lenet-sigmoid", 5.0),  # re-measured below
            _cell("ig", "lenet-relu", 20.0),
        ],
        earlier_dir,
    )
    earlier = SUITE.read_table(earlier_dir / "table.csv")
    assert {r["attack"] for r in earlier} == {"dlg", "ig", "rgap"}
    out = tmp_path / "new"
    out.mkdir()
    md = SUITE.write_tables(
        [
            _cell("rgap", "lenet-sigmoid", 100.0, seconds=1.0, seed=0),
            _cell("rgap", "lenet-sigmoid", 60.0, seconds=1.0, seed=1),  # mean 80
            _cell("spear", "mlp-relu", 100.0, seconds=0.1),
            _cell("analytic", "mlp-relu", 100.0, seconds=2.0),  # a tie: the faster wins
        ],
        out,
        earlier,
    )
    with open(out / "table.csv", newline="") as f:
        rows = {(r["attack"], r["victim"]): r for r in csv.DictReader(f)}
    assert set(rows) == {
        ("dlg", "lenet-sigmoid"), ("ig", "lenet-sigmoid"), ("rgap", "lenet-sigmoid"),
        ("ig", "lenet-relu"), ("spear", "mlp-relu"), ("analytic", "mlp-relu"),
    }  # fmt: skip
    assert float(rows[("rgap", "lenet-sigmoid")]["psnr"]) == 80.0  # the new cells replace
    assert rows[("rgap", "lenet-sigmoid")]["seeds"] == "2"
    best = {k for k, r in rows.items() if r["best"] == "yes"}
    assert best == {("rgap", "lenet-sigmoid"), ("ig", "lenet-relu"), ("spear", "mlp-relu")}
    assert "| cifar10 | lenet-sigmoid | 1 | fedsgd | rgap | 80.0 | 0.800 | dlg 40.0 |" in md
