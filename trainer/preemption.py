"""Graceful stops: SIGTERM (preemption), Ctrl-C, or a stop request ask the loop to finish its
step, checkpoint and stop.

Ranks run collectives every step, so they must stop after the same step: the flag is all-reduced
once per step (one scalar; negligible beside a training step).

Three ways in, one flag:
- SIGTERM or SIGINT to a process that runs the loop (a preempted pod's workers; Ctrl-C on a
  process that trains in its main thread). A second signal of the same kind does what the
  process did before the guard (Ray: exit; Python: KeyboardInterrupt).
- A stop-request file in the run folder, which `embshard` writes on Ctrl-C. A terminal's Ctrl-C
  reaches only the driver: Ray starts its processes with SIGINT blocked, in process groups of
  their own, and ends them when the driver exits. So the driver stays alive on the first Ctrl-C,
  writes the request, and the workers see it at their next step.

Python lets only the main thread install signal handlers, and Ray Train v2 runs the train function
in a thread of the worker actor. The actor's own tasks run on the process's main thread, so a
guard installing from the training thread asks its actor to install the handler there
(`__ray_call__`). A `worker_process_setup_hook` would be too early: Ray's worker main loop sets
its own SIGTERM handler (exit the process) after the hook has run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | None

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_REQUEST_FILE = "stop-requested"  # in the run's output_dir; see the module docstring

# Process-wide: the handler runs on the main thread, the guard polls from the training thread.
_signalled = threading.Event()
_previous: dict[int, _Handler] = {}


def _handle(signum: int, frame: FrameType | None) -> None:
    if not _signalled.is_set():
        _signalled.set()
        return
    # A second signal means "now": do what the process did before the guard.
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL or SIG_IGN (None: set outside Python, treated as the default)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)


def install_process_handler() -> None:
    """Main thread only. A fresh install forgets an earlier run's signal (same process)."""
    _signalled.clear()
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is not _handle:
            _previous[signum] = current
        # Set again even where Python says it is ours: a library's C code (Ray's, at ray.init in
        # this process) may have replaced it underneath, which getsignal cannot see.
        signal.signal(signum, _handle)


def _install_from_actor(_actor: object) -> bool:
    # A threaded or async actor runs its tasks off the main thread too.
    if threading.current_thread() is not threading.main_thread():
        return False
    install_process_handler()
    return True


def _install_on_actor_main_thread() -> bool:
    """In a Ray actor whose tasks run on the main thread: install there, wait for it."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    try:
        actor = ray.get_runtime_context().current_actor
    except RuntimeError:  # a task or the driver: no actor to ask
        return False
    return bool(ray.get(actor.__ray_call__.remote(_install_from_actor)))


class StopGuard:
    def __init__(self, stop_request: Path | None = None) -> None:
        """`stop_request`: a file whose appearance asks for the same stop as a signal."""
        self.installed = False
        self.stop_request = stop_request

    @property
    def signalled(self) -> bool:
        return _signalled.is_set() or (self.stop_request is not None and self.stop_request.exists())

    def install(self) -> bool:
        if threading.current_thread() is threading.main_thread():
            install_process_handler()
        elif not _install_on_actor_main_thread():
            log.warning("SIGTERM checkpointing unavailable: training runs outside the main thread")
            return False
        self.installed = True
        return True

    def any_rank_signalled(self) -> bool:
        """Collective: True on every rank once any rank got a stop signal or request."""
        flag = torch.tensor([int(self.signalled)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
