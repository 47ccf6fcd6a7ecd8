"""A run's output folder: its default name, a writable check before any work, the
folders a failed run created removed again, and the package versions a results
file records."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from collections.abc import Sequence
from pathlib import Path

from .config import AttackConfig

__all__ = [
    "default_out",
    "missing_folders",
    "package_versions",
    "prepare_out",
    "remove_if_empty",
    "version_of",
]


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages the numbers depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("leakage-lab", "torch", "torchvision", "numpy", "scipy", "scikit-image"):
        out[pkg] = version_of(pkg)
    return out


def version_of(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def default_out(cfg: AttackConfig) -> Path:
    """A new folder under ``results/`` named after the run."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("results") / f"{cfg.attack}-{cfg.model}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def prepare_out(path: str | Path) -> Path:
    """Create the output folder and check it is writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed run created, deepest first, while they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return
