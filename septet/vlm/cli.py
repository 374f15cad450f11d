"""The vision-language verbs: `septet vlm train`, `septet vqa`, `septet caption`, `septet train-clip`."""

from __future__ import annotations

import argparse
from typing import Callable


def add_verbs(verb: Callable[..., argparse.ArgumentParser]) -> None:
    """Register this package's verbs with the main parser (see septet.cli.build_parser)."""
