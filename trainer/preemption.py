"""Graceful preemption: SIGTERM asks the loop to finish its step, checkpoint and stop.

Ranks run collectives every step, so they must stop after the same step: the flag is all-reduced
once per step (one scalar; negligible beside a training step).

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
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | None

# Process-wide: the handler runs on the main thread, the guard polls from the training thread.
_signalled = threading.Event()
_previous: _Handler = None


def _handle(signum: int, frame: FrameType | None) -> None:
    if not _signalled.is_set():
        _signalled.set()
        return
    # A second SIGTERM means "now": do what the process did before the guard (Ray: exit).
    if callable(_previous):
        _previous(signum, frame)
    else:  # SIG_DFL or SIG_IGN (None: set outside Python, treated as the default)
        signal.signal(signum, _previous if _previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)


def install_process_handler() -> None:
    """Main thread only. A fresh install forgets an earlier run's SIGTERM (same process)."""
    global _previous
    _signalled.clear()
    current = signal.getsignal(signal.SIGTERM)
    if current is not _handle:
        _previous = current
        signal.signal(signal.SIGTERM, _handle)


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


class SigtermGuard:
    def __init__(self) -> None:
        self.installed = False

    @property
    def signalled(self) -> bool:
        return _signalled.is_set()

    def install(self) -> bool:
        if threading.current_thread() is threading.main_thread():
            install_process_handler()
        elif not _install_on_actor_main_thread():
            log.warning("SIGTERM checkpointing unavailable: training runs outside the main thread")
            return False
        self.installed = True
        return True

    def any_rank_signalled(self) -> bool:
        """Collective: True on every rank once any rank got SIGTERM."""
        flag = torch.tensor([int(self.signalled)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
