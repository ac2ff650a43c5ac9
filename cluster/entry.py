"""The `embshard` console script. A Ctrl-C or SIGTERM while the command line's own modules load
(its first second) is said like any later one, not as a traceback through Python's import
machinery or, for SIGTERM, as nothing at all."""

from __future__ import annotations

import signal
import sys

from embshard.cluster.interrupt import raise_ctrl_c
from embshard.errors import EXIT_INTERRUPTED


def main() -> int:
    # Until the command installs its own (`sigterm_as_ctrl_c`): SIGTERM's default ended the
    # process without a word. Put back after it, so that the interpreter's exit (Ray's shutdown)
    # is not interrupted by a traceback that exits 0.
    previous = signal.signal(signal.SIGTERM, raise_ctrl_c)
    try:
        from embshard.cluster.cli import main as run

        return run()
    except KeyboardInterrupt:
        print("embshard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
