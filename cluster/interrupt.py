"""Ctrl-C during a Ray job: the first one asks the workers to stop after their step with a
checkpoint (trainer/preemption.py explains why it travels as a file), the second aborts.

Ray Train v2's `fit()` installs a SIGINT handler of its own when it runs on the main thread, one
that aborts the worker group at once (mid-step, no checkpoint). So `fit()` runs on a helper
thread, where Ray Train leaves signals alone, and the main thread keeps this module's handler.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TypeVar

T = TypeVar("T")
_POLL_SECONDS = 0.2  # how soon the main thread notices the helper thread ended
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block SIGTERM (`kill`, a container's stop) raises KeyboardInterrupt, as Ctrl-C
    does: every verb then removes what it staged and says one line. The CLI's whole command runs
    in it (`init_ray` keeps it past ray.init, which replaces it: `sigterm_kept`)."""
    with sigterm_kept():
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        yield


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """The SIGTERM handler in place before the block, in place again after it. Signal handlers
    belong to the main thread; one Python did not install reads as None and cannot be put back."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_with_graceful_ctrl_c(fn: Callable[[], T], stop_request: Path, graceful: bool = True,
                             started: Callable[[], bool] = lambda: True,
                             slow_start: tuple[float, Callable[[], None]] | None = None) -> tuple[T, bool]:
    """Run `fn` (the blocking fit); while it runs, the first SIGINT or SIGTERM creates
    `stop_request` instead of raising KeyboardInterrupt, a second one raises it. Returns fn's result and whether a stop
    was requested. `graceful=False` (no checkpoint to stop with), or no worker `started()` yet
    (none to read the request: a group Ray cannot place waits for good), the first one raises it.
    `slow_start` (seconds, say): called once when no worker has started by then. Either way `fn`
    runs off the main thread, where Ray Train's controller installs no handler of its own: on the
    main thread its SIGINT handler exited 1 without a word. The request file is gone on return
    either way."""
    stop_request.unlink(missing_ok=True)  # an earlier invocation's request must not stop this one
    if threading.current_thread() is not threading.main_thread():
        return fn(), False
    requested = threading.Event()

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        if requested.is_set() or not graceful or not started():
            raise KeyboardInterrupt
        requested.set()
        stop_request.parent.mkdir(parents=True, exist_ok=True)
        stop_request.touch()
        what, again = ("interrupted", "Ctrl-C") if signum == signal.SIGINT else ("terminated", "a second signal")
        print(f"\nembshard: {what}: finishing the step and writing a checkpoint "
              f"({again} aborts without one)", file=sys.stderr, flush=True)

    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = e

    # A daemon thread: after a second Ctrl-C the process exits, and Ray ends the workers with it.
    worker = threading.Thread(target=target, name="embshard-fit", daemon=True)
    # SIGTERM too: what `kill` and `ray job stop` (`embshard stop`) send the driver. Ray's own
    # handler for it dumps a C++ stack and aborts, and the workers lost the steps since the
    # last checkpoint. A handler Python did not install reads as None and cannot be put back.
    previous = {sig: signal.signal(sig, on_interrupt) for sig in _STOP_SIGNALS}
    begun = time.monotonic()
    try:
        worker.start()
        while worker.is_alive():
            worker.join(_POLL_SECONDS)
            if slow_start is not None and time.monotonic() - begun > slow_start[0]:
                if not started():
                    slow_start[1]()
                slow_start = None  # asked once: not a file's stat every poll of the whole run
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        stop_request.unlink(missing_ok=True)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"], requested.is_set()  # type: ignore[return-value]
