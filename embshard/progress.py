"""Progress bars that suit where they are read.

On a terminal a bar is redrawn in place. In a log (a pipe, a file, `kubectl logs`, a Ray job's
log) each redraw's "\\r" piled up into one endless line of fragments; there a bar is a whole line
at most every `LOG_INTERVAL` seconds, and work shorter than that writes none. `progress_bar`
makes a conversion's bars; the driver of a Ray run feeds its workers' training bar, which they
draw as on a terminal, through `RedrawsAsLines` when its own console is not one.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between a bar's lines in a log


class RedrawsAsLines:
    """A bar's redraws as lines on `sink`: one once `LOG_INTERVAL` seconds passed since the bar's
    first redraw or its last line, and its last state when it ends, if it wrote any line."""

    def __init__(self, sink: TextIO) -> None:
        self.sink = sink
        self.interval = LOG_INTERVAL
        self.since: float | None = None  # the bar's first redraw, then its last line
        self.last = ""  # the latest redraw
        self.written: str | None = None  # the latest line written

    def show(self, text: str) -> None:
        text = text.strip()
        if not text:  # a bar cleared to print a message above it
            return
        now = time.monotonic()
        self.last = text
        if self.since is None:
            self.since = now
        elif now - self.since >= self.interval and text != self.written:
            self._write(text)
            self.since = now

    def flush(self) -> None:
        """Its state now, where a line of it said less: before another line is printed (a test's
        result came before the bar's 100% line), and when it ends."""
        if self.written is not None and self.last != self.written:
            self._write(self.last)

    def end(self) -> None:
        self.flush()
        self.since, self.last, self.written = None, "", None

    def _write(self, text: str) -> None:
        self.sink.write(text + "\n")
        self.sink.flush()
        self.written = text


class _LogBar(tqdm):
    """tqdm for a stream that is not a terminal: lines by `RedrawsAsLines`, nothing to clear."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lines = RedrawsAsLines(kwargs.get("file") or sys.stderr)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # a clear: nothing to undo in a log (False: tqdm then writes no "\r")
            return False
        self._lines.show(str(self))
        return True

    def clear(self, nolock: bool = False) -> None:
        pass

    def close(self) -> None:
        if not getattr(self, "disable", True):  # a bar stopped inside its constructor has none
            self._lines.show(str(self))
            self._lines.end()
            self.leave = False  # tqdm would redraw the bar and end the line: a blank line here
        super().close()


def progress_bar(**kwargs: Any) -> tqdm:
    """tqdm(**kwargs), drawn as lines where its stream (default stderr) is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    return (tqdm if is_terminal(stream) else _LogBar)(**kwargs)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
