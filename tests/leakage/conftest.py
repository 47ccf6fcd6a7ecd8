from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets (real MNIST / Fashion-MNIST / CIFAR-10), or skip."""
    if not (SHARED / "MNIST").is_dir():
        pytest.skip(f"../shared/datasets not present at {SHARED}: real datasets unavailable")
    return SHARED
