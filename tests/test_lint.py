"""The repository passes `ruff check` under the configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("septet", "tests", "benchmarks", "tools")


def _ruff_bin() -> str:
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:
        pytest.skip("ruff is not installed (pip install ruff)")
    try:
        return str(find_ruff_bin())
    except FileNotFoundError:
        pytest.skip("the ruff package is installed but its binary was not found")


def test_ruff_check_is_clean():
    proc = subprocess.run([_ruff_bin(), "check", "--no-cache", "--output-format", "concise", *PATHS],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff check {' '.join(PATHS)} found problems:\n{proc.stdout}{proc.stderr}"
