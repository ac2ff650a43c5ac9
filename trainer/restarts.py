"""Counting worker-group restarts of one `embshard train` invocation.

The driver resets a counter file in the output folder before it starts the workers; every start
of the worker group increments it, so starts - 1 is the number of restarts Ray Train made.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from embshard.datasets.storage import write_whole

STARTS_FILE = "worker_group_starts"


def reset_starts(output_dir: Path) -> None:
    (output_dir / STARTS_FILE).unlink(missing_ok=True)


def record_start(output_dir: Path) -> int:
    """Collective: count this start of the worker group; returns the restarts before it."""
    restarts = [0]
    if dist.get_rank() == 0:
        path = output_dir / STARTS_FILE
        starts = int(path.read_text()) if path.is_file() else 0
        write_whole(path, f"{starts + 1}\n")
        restarts = [starts]
    dist.broadcast_object_list(restarts, src=0)
    return int(restarts[0])
