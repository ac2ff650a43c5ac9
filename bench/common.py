"""Shared set-up for the benchmarks: a single-process gloo group, cached datasets, in-memory
batches. Benchmarks compare variants measured in the same run, interleaved, and report ratios:
absolute numbers drift between machines."""

from __future__ import annotations

import os
import socket
import statistics
import time
from itertools import islice
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from embshard.datasets.profile import write_profile
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE
from embshard.datasets.synth import synthesize

CACHE = Path(__file__).resolve().parent / "results" / "cache"


def init_single_process_group() -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def synth_dataset(rows: int, max_cardinality: int, seed: int = 0) -> Path:
    path = CACHE / f"synth-{rows}-{max_cardinality}-{seed}"
    if not (path / SPEC_FILE).is_file():
        synthesize(path, rows=rows, seed=seed, max_cardinality=max_cardinality)
        write_profile(path)
    return path


def load_batches(path: Path, batch_size: int, n: int, id_maps=None) -> list[Batch]:
    reader = ParquetBatchReader(path, "train", batch_size, shuffle=False, id_maps=id_maps)
    batches = list(islice(iter(reader), n))
    if len(batches) < n:
        raise SystemExit(f"{path}: only {len(batches)} batches of {batch_size}; need {n} (raise --rows)")
    return batches


def interleaved_rates(
    variants: dict[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Run every variant `repeats` times, round-robin, so slow drift of the machine hits all alike.
    Each callable returns samples/s of one timed pass."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            rates[name].append(run())
    return rates


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
