"""Graceful preemption: SIGTERM asks the loop to finish its step, checkpoint and stop.

Ranks run collectives every step, so they must stop after the same step: the flag is all-reduced
once per step (one scalar; negligible beside a training step).

Python lets only the main thread install signal handlers. Where training runs in another thread
(Ray Train v2 runs the train function in a thread of the worker actor) the guard cannot install
and says so once; the process then dies on SIGTERM as before and a restart resumes from the
last periodic checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class SigtermGuard:
    def __init__(self) -> None:
        self.signalled = False
        self.installed = False

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("SIGTERM checkpointing unavailable: training runs outside the main thread")
            return False
        signal.signal(signal.SIGTERM, self._handle)
        self.installed = True
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def any_rank_signalled(self) -> bool:
        """Collective: True on every rank once any rank got SIGTERM."""
        flag = torch.tensor([int(self.signalled)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
