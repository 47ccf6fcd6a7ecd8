"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """``../shared/datasets`` (the project's offline copy of real datasets), or skip."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(
            f"../shared/datasets not present at {SHARED_DATASETS}: "
            "real datasets unavailable on this machine"
        )
    return SHARED_DATASETS


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tests on one intra-op thread, then restore the previous count.

    The tests' tensors are small: on a loaded machine, OpenMP threads waiting on
    each other made a ResNet-18 forward pass ~30x slower than on one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
