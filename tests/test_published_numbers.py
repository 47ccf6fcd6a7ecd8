"""Every number the README and the documentation state comes from a committed results file.

Two checks: every path under ``benchmarks/results/`` that the README, a
documentation page (``docs/``), the reproduction report or a notebook names (or
links to) exists in the repository; and the tables of measured numbers equal,
to the digits they print, the committed summary files their paragraphs cite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.is_symlink())
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "REPRODUCTION.md", *PAGES]
DOCUMENTS += sorted((ROOT / "notebooks").glob("*.ipynb"))
README = "\n".join(p.read_text() for p in (ROOT / "README.md", *PAGES))  # where tables are
RESULT_PATH = re.compile(r"benchmarks/results/[A-Za-z0-9_./-]*[A-Za-z0-9_/-]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"")


def _cited_paths() -> list[tuple[str, str]]:
    out = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        for m in RESULT_PATH.finditer(text):
            out.append((doc.name, m.group(0)))
        if doc.suffix == ".md":
            for m in LINK.finditer(text):
                target = m.group(1) or m.group(2)
                if "://" not in target and not target.startswith("mailto:"):
                    out.append((doc.name, str((doc.parent / target).relative_to(ROOT))))
    return sorted(set(out))


def test_the_documents_cite_results():
    assert any(p.startswith("benchmarks/results/") for _, p in _cited_paths())


@pytest.mark.parametrize("doc, path", _cited_paths())
def test_every_cited_path_is_committed(doc, path):
    assert (ROOT / path).exists(), f"{doc} cites {path}, which is not in the repository"


def _table_after(marker: str, text: str = README) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after ``marker``."""
    start = text.index(marker)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):
            rows.append(cells)
    return rows[1:]  # without the header


def test_readme_ig_tuning_table_matches_the_sweep_summary():
    summary = ROOT / "benchmarks/results/tuning/ig/summary.md"
    means = {}
    for victim, setting, _, psnr, *_ in _table_after("## Test images", summary.read_text()):
        means[victim, setting] = float(psnr.split("±")[0])
    names = {  # README row -> the sweep's victim
        "LeNet, sigmoid": "lenet-sigmoid",
        "LeNet, ReLU": "lenet-relu",
        "small CNN, sigmoid": "cnn",
        "ResNet-20, BatchNorm train": "resnet20-train",
        "ResNet-20, BatchNorm eval": "resnet20-eval",
        "LeNet, sigmoid, raw pixels (DLG's victim)": "lenet-sigmoid-raw",
        "LeNet, ReLU, raw pixels": "lenet-relu-raw",
        "LeNet, sigmoid, Fashion-MNIST": "fmnist-lenet-sigmoid",
        "LeNet, sigmoid, Fashion-MNIST, raw pixels": "fmnist-lenet-sigmoid-raw",
    }
    rows = _table_after("| victim | tuned (the defaults now)")
    assert {r[0] for r in rows} == set(names)
    for name, tuned, previous, breaching in rows:
        v = names[name]
        for cell, setting in (
            (tuned, "tuned"),
            (previous, "lab's previous defaults"),
            (breaching, "breaching's defaults"),
        ):
            # the summary prints two decimals, the README one: 12.35 may read 12.4
            assert abs(float(cell) - means[v, setting]) <= 0.05 + 1e-9, (name, setting)


def test_readme_vs_breaching_table_matches_its_summaries():
    rows = _table_after("| BatchNorm | breaching PSNR dB")
    assert {r[0] for r in rows} == {"eval", "train"}
    for mode, b_psnr, l_psnr, b_s, l_s, speedup in rows:
        path = ROOT / f"benchmarks/results/vs_breaching/{'train/' if mode == 'train' else ''}"
        summary = path / f"summary-resnet20-{mode}-1000.md"
        means = {
            r[1]: r
            for r in _table_after("| image | peer", summary.read_text())
            if r[0] == "**mean**"
        }
        assert (b_psnr, b_s) == (means["breaching"][2], means["breaching"][5])
        assert (l_psnr, l_s) == (means["lab"][2], means["lab"][5])
        assert speedup == means["lab"][6].split()[0]


def test_readme_label_recovery_table_matches_its_results_file():
    committed = {}
    path = ROOT / "benchmarks/results/label_recovery/table.md"
    for model, strategy, *numbers in _table_after("| model | strategy", path.read_text()):
        committed[model, strategy] = numbers
    rows = _table_after("| victim | strategy | label-set acc.")
    assert len(rows) == len(committed)
    for victim, strategy, *numbers in rows:
        model = victim.split()[0]
        strategy = "ilrg-paper" if strategy.startswith("ilrg without") else strategy
        assert numbers == committed[model, strategy], (victim, strategy)


def test_readme_dlg_speed_table_matches_its_summary():
    path = ROOT / "benchmarks/results/dlg_speed/summary.md"
    committed = _table_after("| attack | batch", path.read_text())
    assert _table_after("| attack | batch | steps | restarts | runs |") == committed


def test_readme_threads_table_matches_its_summary():
    path = ROOT / "benchmarks/results/threads/summary.md"
    committed = _table_after("| --threads | threads used", path.read_text())
    assert _table_after("| --threads | threads used") == committed


def test_ig_defaults_are_the_settings_the_sweep_chose():
    """TUNED in leakage/attacks/inverting.py holds, per family, the sweep's winner."""
    import json

    from leakage.attacks.inverting import TUNED

    family = {  # the sweep's victim -> the family whose default it set
        "lenet-sigmoid": "lenet-sigmoid",
        "lenet-relu": "lenet",
        "cnn": "cnn",
        "resnet20-eval": "resnet-eval",
        "resnet20-train": "resnet-train",
        "lenet-sigmoid-raw": "lenet-sigmoid-raw",
        "lenet-relu-raw": "lenet-raw",
        "fmnist-lenet-sigmoid": "lenet-gray",
        "fmnist-lenet-sigmoid-raw": "lenet-gray-raw",
    }
    text = (ROOT / "benchmarks/results/tuning/ig/summary.md").read_text()
    chosen = dict(re.findall(r"^## (\S+)\n.*?^Chosen: `(\{.*?\})`", text, re.M | re.S))
    assert set(chosen) == set(family)
    for victim, options in chosen.items():
        assert TUNED[family[victim]] == json.loads(options), victim


def _reproduction():
    import importlib.util
    import sys

    script = ROOT / "benchmarks/reproduction.py"
    spec = importlib.util.spec_from_file_location("reproduction", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduction"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _reproduction_args(rep, figures):
    from argparse import Namespace

    out = Path("benchmarks/out/reproduction")
    return Namespace(results=rep.RESULTS, out=out, figures=figures, quick=False, seed=0,
                     data_root="../shared/datasets")  # fmt: skip


NEEDS_A_GPU = {"robust_gd_full"}  # 11 runs of 3.5 hours on one core: no records on this machine


def test_reproduction_report_is_built_from_its_committed_records(tmp_path, monkeypatch):
    """REPRODUCTION.md is what the committed run records give, and every run but the GPU-sized
    study's has a record measured under the run's current settings."""
    monkeypatch.chdir(ROOT)  # the report names its paths relative to the repository
    rep = _reproduction()
    args = _reproduction_args(rep, tmp_path)
    for name in rep.EXPERIMENTS:
        records, stale = rep.current_records(name, args)
        missing = [] if name in NEEDS_A_GPU else sorted(set(rep._cells(name)) - set(records))
        assert not stale and not missing, (name, stale, missing)
    committed = (ROOT / "benchmarks/REPRODUCTION.md").read_text()
    rebuild = "rebuild it: python benchmarks/reproduction.py --report"
    assert committed == rep.report_text(args), rebuild


def test_readme_reproduction_table_matches_the_records(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rep = _reproduction()
    args = _reproduction_args(rep, tmp_path)
    measured = set()
    for name in rep.EXPERIMENTS:
        records = rep.current_records(name, args)[0]
        measured |= {f"{100 * r['accuracy']:.2f}" for r in records.values()}
    rows = _table_after("| study | source claim | lab (this machine) | verdict |")
    assert len(rows) >= 9
    for study, _, lab, _ in rows:
        numbers = re.findall(r"\d+\.\d\d(?!\d)", lab)
        assert numbers, study
        for number in numbers:  # each is a final accuracy of a committed run record
            assert number in measured, (study, number)
