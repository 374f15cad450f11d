"""Every SEPTET_* environment variable, read here and nowhere else.

Each is read when asked for (not at import), so a test or a user can change it between calls.
The README's "Environment variables" table lists the same names.
"""

from __future__ import annotations

import os
from pathlib import Path


def _off(name: str) -> bool:
    """True when `name` is set to 0 (the switches below are on by default)."""
    return os.environ.get(name, "1").strip() == "0"


def home() -> Path:
    """SEPTET_HOME: where fetched assets and built kernels are cached (default
    $XDG_CACHE_HOME/septet, else ~/.cache/septet)."""
    if os.environ.get("SEPTET_HOME"):
        return Path(os.environ["SEPTET_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "septet"
    return Path.home() / ".cache" / "septet"


def kernels_enabled() -> bool:
    """SEPTET_KERNELS=0: never build or use septet's C kernels (PyTorch's own instead)."""
    return not _off("SEPTET_KERNELS")


def fused_decode_enabled() -> bool:
    """SEPTET_FUSED_DECODE=0: decode with the model's own forward instead of the one-call step."""
    return not _off("SEPTET_FUSED_DECODE")


def cuda_graphs_enabled() -> bool:
    """SEPTET_CUDA_GRAPHS=0: run the compiled decode step on CUDA without capturing a graph."""
    return not _off("SEPTET_CUDA_GRAPHS")


def deterministic_training() -> bool:
    """SEPTET_DETERMINISTIC=0: train without MKL's reproducible mode and deterministic kernels
    (a resumed or rewound run may then differ from an uninterrupted one in the last bits)."""
    return not _off("SEPTET_DETERMINISTIC")


def offline() -> bool:
    """SEPTET_OFFLINE=1: never download; an asset missing from the cache is an error."""
    return os.environ.get("SEPTET_OFFLINE", "0").strip() not in ("", "0")


def bigbench_dir() -> Path | None:
    """SEPTET_BIGBENCH_DIR: a local copy of BIG-bench's `bigbench/benchmark_tasks` (or a
    directory above it), used when the packaged sources are unreachable."""
    value = os.environ.get("SEPTET_BIGBENCH_DIR", "").strip()
    return Path(value).expanduser() if value else None


def values() -> dict[str, str | None]:
    """Each variable's raw value here (None: unset), for `septet env`."""
    return {name: os.environ.get(name) for name in VARIABLES}


# name -> what it does; the README's table and `septet env` print this
VARIABLES = {
    "SEPTET_HOME": home.__doc__,
    "SEPTET_OFFLINE": offline.__doc__,
    "SEPTET_KERNELS": kernels_enabled.__doc__,
    "SEPTET_FUSED_DECODE": fused_decode_enabled.__doc__,
    "SEPTET_CUDA_GRAPHS": cuda_graphs_enabled.__doc__,
    "SEPTET_DETERMINISTIC": deterministic_training.__doc__,
    "SEPTET_BIGBENCH_DIR": bigbench_dir.__doc__,
}
