"""Arguments shared by every verb that runs a job config, so they read and behave alike."""

from __future__ import annotations

import argparse

from embshard.arg_types import nonempty_path
from embshard.config import MAX_WORLD_SIZE, device_memory_problem


def config_arguments(p: argparse.ArgumentParser, config_help: str = "job config (YAML), e.g. configs/default.yaml",
                     set_example: str = "train.epochs=2", workers: bool = False) -> None:
    p.add_argument("config", type=nonempty_path, help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help=f"override a config field, e.g. --set {set_example} (repeatable)")
    if workers:
        p.add_argument("--workers", type=world_size, help="Ray Train workers (default: cluster.workers)")


def positive(text: str) -> int:
    """argparse type: 0 must not fall back to the config's count the way a missing flag does."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def gibibytes(text: str) -> float:
    """argparse type of a memory size in GiB: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    problem = device_memory_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def world_size(text: str) -> int:
    """argparse type of a rank count: as `cluster.workers` is checked."""
    value = positive(text)
    if value > MAX_WORLD_SIZE:
        raise argparse.ArgumentTypeError(f"at most {MAX_WORLD_SIZE:,} ranks, got {value:,}")
    return value


def verbose_argument(p: argparse.ArgumentParser) -> None:
    """For verbs that run on Ray: by default the console shows only what a person acts on."""
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and the libraries' output on the console "
                        "(it always goes to <output_dir>/logs/embshard.log)")
