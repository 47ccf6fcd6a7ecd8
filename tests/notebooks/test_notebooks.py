"""The notebooks run top to bottom and are committed without outputs (the tutorials
page, docs/tutorials.md: outputs are regenerated, never reviewed as diffs).

Each notebook executes in a fresh ``python3`` kernel with ``LEAKAGE_NB_BUDGET=small`` (its
quick setting) and ``OMP_NUM_THREADS=1``, from the ``notebooks/`` folder; a cell that raises
fails the test. At the ``small`` budget the notebooks must not write their figures, which
only a ``full`` run refreshes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = [
    "01_one_gradient.ipynb",
    "02_attack_gallery.ipynb",
    "03_defenses.ipynb",
    "04_robust_aggregation.ipynb",
    "05_malicious_server.ipynb",
]
KERNEL = "python3"
CELL_TIMEOUT = 600  # seconds; a small-budget notebook takes well under a minute in all


def _require_kernel() -> None:
    """Skip when the notebook tooling (a dev dependency) is not installed."""
    missing = [m for m in ("nbformat", "nbclient", "ipykernel") if not importlib.util.find_spec(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[dev]'")


def _execute(nb, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every cell of ``nb`` in place, in a fresh kernel started from ``notebooks/``."""
    from nbclient import NotebookClient

    monkeypatch.setenv("LEAKAGE_NB_BUDGET", "small")  # the kernel inherits this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)
    ]
    assert not dirty, f"{name}: cells {dirty} hold outputs; clear them before committing"
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert "LEAKAGE_NB_BUDGET" in "".join(code[0]["source"]), "the first code cell sets the budget"
    assert nb["metadata"]["kernelspec"]["name"] == KERNEL


def test_kernel_runs_this_interpreter(monkeypatch):
    """The ``python3`` kernel must be this environment's Python, where the lab is installed."""
    _require_kernel()
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")]
    _execute(nb, monkeypatch)
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve(), (
        f"the {KERNEL!r} kernel runs {printed}, not {sys.executable}: install this "
        f"environment's kernel with `{sys.executable} -m ipykernel install --sys-prefix`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch, tmp_path):
    _require_kernel()
    import nbformat

    figures = sorted((NOTEBOOKS / "figures").glob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in figures}
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    try:
        _execute(nb, monkeypatch)
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, for a look after a failure
    after = {p: p.stat().st_mtime_ns for p in figures}
    assert after == before, "a small-budget run rewrote notebooks/figures/"
