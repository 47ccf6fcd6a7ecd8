"""The documentation site builds with ``mkdocs build --strict``: a broken link, a page
missing from the navigation's targets or a docstring the API reference cannot parse fails
the suite. Needs the ``docs`` extra (the README's test command installs it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    needed = ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[docs]'")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    assert (tmp_path / "site" / "notebooks" / "05_malicious_server" / "index.html").exists()


def test_readme_is_a_front_door():
    """Under ~8 KB, and every relative link in it resolves in the repository."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 8 * 1024
    for target in re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r'src="([^"]+)"', text):
        if "://" not in target:
            assert (ROOT / target).exists(), target
