"""Steps that must not stop halfway: a stop (Ctrl-C, SIGTERM) that arrives during one is held back
until it ends, then delivered as usual."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOPS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stops_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the block (a few renames that publish files together, the
    removal of what they replaced), then raised again. Handlers, not the signal mask: a process
    signal goes to any thread that does not block it (pyarrow's, Ray's), and Python runs its
    handlers on the main thread, so elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOPS}
    held = [s for s, handler in previous.items() if handler is not None]  # None: not Python's to restore
    for s in held:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        # One stop is enough, and the first raised ends the loop (its handler raises): SIGTERM
        # first, whose default ends the process where Python's SIGINT handler would not.
        for signum in sorted(set(pending), key=lambda s: s != signal.SIGTERM):
            signal.raise_signal(signum)
