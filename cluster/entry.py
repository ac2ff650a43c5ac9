"""The `embshard` console script. A Ctrl-C or SIGTERM while the command line's own modules load
(its first second) is said like any later one, not as a traceback through Python's import
machinery or, for SIGTERM, as nothing at all."""

from __future__ import annotations

import signal
import sys
import threading

from embshard.cluster.interrupt import sigterm_as_ctrl_c
from embshard.errors import EXIT_INTERRUPTED


def main() -> int:
    # From before the CLI's modules load: SIGTERM's default ended the process without a word.
    # The block puts the default back after the command, so that the interpreter's exit (Ray's
    # shutdown) is not interrupted by a traceback that exits 0; a stop there ends the process as
    # the signal's default does.
    try:
        with sigterm_as_ctrl_c():
            try:
                from embshard.cluster.cli import main as run

                return run()
            except KeyboardInterrupt:
                print("embshard: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
    finally:
        # Ctrl-C too, once the command has said its last line: during the interpreter's exit it
        # printed "Exception ignored in atexit callback ... KeyboardInterrupt" and exited 0.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
