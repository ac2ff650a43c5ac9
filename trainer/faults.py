"""Fault injection for tests: a real process death (not an exception) at a chosen step.

`EMBSHARD_CRASH_AT=RANK:STEP` makes that rank `os._exit(1)` right after training step STEP, once
per output folder (a marker file records that it happened, so the restarted worker lives on).
"""

from __future__ import annotations

import os
from pathlib import Path

from embshard.trainer.callbacks import Callback, StepInfo

ENV = "EMBSHARD_CRASH_AT"
MARKER = "crash-injected"


class CrashAtStep(Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.step and not self.marker.exists():
            self.marker.write_text(f"{os.getpid()}\n")
            os._exit(1)


def crash_from_env(rank: int, output_dir: Path) -> CrashAtStep | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    crash_rank, step = (int(v) for v in spec.split(":"))
    return CrashAtStep(step, output_dir / MARKER) if crash_rank == rank else None
