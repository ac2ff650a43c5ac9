"""argparse types shared by every layer's command line (`embshard data` as well as the cluster's
verbs), so an argument reads and is refused alike wherever it appears."""

from __future__ import annotations

import argparse
from pathlib import Path

EMPTY_PATH = "an empty path (an unset shell variable?)"


def nonempty(text: str, empty: str = EMPTY_PATH) -> str:
    """argparse type of an output path or URI: an empty one (an unset shell variable) is refused,
    not read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(empty)
    return text


def nonempty_name(text: str) -> str:
    """argparse type of a name: an empty one is refused, not read as the default."""
    return nonempty(text, "an empty name (an unset shell variable?)")


def nonempty_path(text: str) -> Path:
    return Path(nonempty(text))
