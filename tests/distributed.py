"""Run a function on N gloo ranks over loopback (torch.multiprocessing), collecting results."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException:  # the parent re-raises with the rank's traceback
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on every rank; returns each rank's (picklable) result."""
    with mp.Manager() as manager:
        results = manager.dict()
        try:
            mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        except mp.ProcessRaisedException:
            errors = [v[1] for v in results.values() if v[0] == "error"]
            raise AssertionError("a rank failed:\n" + "\n".join(errors)) from None
        return [results[r][1] for r in range(world)]
