"""Fault injection for tests: a real process death or hang (not an exception) at a chosen step.

`EMBSHARD_CRASH_AT=RANK:STEP` makes that rank `os._exit(1)` right after training step STEP, and
`RANK:STEP:hang` makes it stop there for good (a stuck or SIGSTOPped worker: alive, in no
collective); once per output folder (a marker file records that it happened, so the restarted
worker lives on).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from embshard.trainer.callbacks import Callback, StepInfo

ENV = "EMBSHARD_CRASH_AT"
MARKER = "crash-injected"


class CrashAtStep(Callback):
    def __init__(self, step: int, marker: Path, hang: bool = False) -> None:
        self.step = step
        self.marker = marker
        self.hang = hang

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.step and not self.marker.exists():
            self.marker.write_text(f"{os.getpid()}\n")
            while self.hang:
                time.sleep(60)
            os._exit(1)


def crash_from_env(rank: int, output_dir: Path) -> CrashAtStep | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    crash_rank, step, *how = spec.split(":")
    if how not in ([], ["hang"]):
        raise ValueError(f"{ENV}={spec!r}: RANK:STEP, or RANK:STEP:hang")
    if int(crash_rank) != rank:
        return None
    return CrashAtStep(int(step), output_dir / MARKER, hang=bool(how))
