"""The `septet eval` verb."""

from __future__ import annotations

import argparse
from typing import Callable


def add_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register this package's verbs with the main parser (see septet.cli.build_parser)."""
