"""The `embshard` console script. A Ctrl-C while the command line's own modules load (its first
second) is said like any later Ctrl-C, not as a traceback through Python's import machinery."""

from __future__ import annotations

import sys

from embshard.errors import EXIT_INTERRUPTED


def main() -> int:
    try:
        from embshard.cluster.cli import main as run

        return run()
    except KeyboardInterrupt:
        print("embshard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
