"""The `embshard` console script. A Ctrl-C or SIGTERM while the command line's own modules load
(its first second) is said like any later one, not as a traceback through Python's import
machinery or, for SIGTERM, as nothing at all."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType

from embshard.cluster.interrupt import sigterm_as_ctrl_c
from embshard.errors import EXIT_CRASH, EXIT_INTERRUPTED


def main() -> int:
    # From before the CLI's modules load: SIGTERM's default ended the process without a word.
    code = EXIT_CRASH  # an error that escaped the command (--verbose) printed its traceback
    try:
        with sigterm_as_ctrl_c():
            try:
                from embshard.cluster.cli import main as run

                code = run()
            except KeyboardInterrupt:
                print("embshard: interrupted", file=sys.stderr)
                code = EXIT_INTERRUPTED
            except SystemExit as e:  # argparse's --help and usage errors
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_CRASH
                raise
        return code
    finally:
        _exit_on_stop(code)


def _exit_on_stop(code: int) -> None:
    """Once the command has said its last line, a Ctrl-C or SIGTERM during the interpreter's exit
    (Ray's shutdown, atexit callbacks, thread pools: up to a second) ends the process at once with
    the command's own status. As KeyboardInterrupt it printed "Exception ignored in atexit
    callback" and exited 0; as the signal's default, an export whose files were in place and said
    so exited 130."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
