"""The hot-path and L-BFGS history benchmarks: bad input stops before any work,
and the history sweep's table counts successes and precisions as documented."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hot = _load("hot_paths")
history = _load("lbfgs_history")


def test_hot_paths_needs_a_timed_engine_round(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        hot.main(["--only", "engines", "--engine-rounds", "1", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "--engine-rounds must be at least 2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured or written


def test_history_sweep_rejects_an_empty_history_before_loading_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        history.main(["--data", str(tmp_path / "absent"), "--history", "400", "0",
                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert stop.value.code == 2
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_history_summary_counts_successes_per_precision():
    runs = [  # the earliest records carry no dtype: the attack's float64 default
        {"attack": "dlg", "history": 400, "seconds": 6.0, "evaluations": 1000, "psnr": 45.0,
         "success": True},
        {"attack": "dlg", "history": 400, "seconds": 10.0, "evaluations": 3000, "psnr": 25.0,
         "success": False},
        {"attack": "dlg", "dtype": "float32", "history": 400, "seconds": 30.0,
         "evaluations": 5000, "psnr": 44.0, "success": True},
        {"attack": "dlg", "dtype": "float64", "rows": "float32", "history": 400,
         "seconds": 5.0, "evaluations": 990, "psnr": 44.5, "success": True},
    ]  # fmt: skip
    rows = [line for line in history.summary(runs).splitlines() if line.startswith("| dlg")]
    # 16 s over one success; evaluations and seconds are means over both runs; a
    # record without "rows" kept its pairs in the attack's precision
    assert rows[0] == "| dlg | float32 | float32 | 400 | 1 | 1 | 5000 | 30.00 | 30.00 | 44.0 |"
    assert rows[1] == "| dlg | float64 | float32 | 400 | 1 | 1 | 990 | 5.00 | 5.00 | 44.5 |"
    assert rows[2] == "| dlg | float64 | float64 | 400 | 2 | 1 | 2000 | 8.00 | 16.00 | 35.0 |"


def test_hot_paths_summary_gives_the_convolutions_batch_scaling():
    """The convolution-scaling line divides 8 images' seconds by one image's, per
    thread count and precision, from the records alone."""
    conv = {
        "1 images, 1 threads": 0.2e-3,
        "8 images, 1 threads": 1.4e-3,
        "1 images, 2 threads": 0.1e-3,
        "8 images, 2 threads": 0.5e-3,
        "1 images, 1 threads, float32": 0.25e-3,
        "8 images, 1 threads, float32": 0.5e-3,
        "1 images, 2 threads, float32": 0.2e-3,
        "8 images, 2 threads, float32": 0.3e-3,
    }
    machine = {"processor": "x86_64", "torch": "2"}
    records = [
        {"section": "conv-scaling", "name": "dlg-lenet", "setting": k, "lab_s": v, **machine}
        for k, v in conv.items()
    ]
    records.append({"section": "restarts", "name": "dlg-lenet", "setting": 1, "lab_s": 1.0,
                    "evaluations": 10, "threads": 2, **machine})  # fmt: skip
    lines = [x for x in hot.summary(records, "cmd").splitlines() if "convolutions in" in x]
    assert lines == [
        "dlg-lenet: the victim's convolutions in float64 (forward, summed over its layers) "
        "take 0.200 ms for one image and 1.400 ms for 8 on 1 thread (7.0x); 0.100 ms for one "
        "image and 0.500 ms for 8 on 2 threads (5.0x).",
        "dlg-lenet: the victim's convolutions in float32 (forward, summed over its layers) "
        "take 0.250 ms for one image and 0.500 ms for 8 on 1 thread (2.0x); 0.200 ms for one "
        "image and 0.300 ms for 8 on 2 threads (1.5x).",
    ]
