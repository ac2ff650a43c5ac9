"""A run's record over time: one JSON object per line, each with the model step it was taken at.

AutoDim's alpha (`alpha_history.jsonl`) and PEP's non-zero count (`nonzero_history.jsonl`) are
written this way while a run trains, so a plot over steps needs nothing but the file. Only rank 0
writes (both quantities are already global: alpha is replicated, the count all-reduced).

A resumed run repeats the steps after its checkpoint, so the first record of a start drops the
records it is about to repeat (those at or after its step) before appending; the rest of the file
is kept. The file is rewritten for that through a temporary file and a rename, so it is never
half written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embshard.datasets.storage import write_whole
from embshard.errors import DataError


class StepHistory:
    """Appends step records to `path`; see the module doc for what a restart keeps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._started = False

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if not self._started:
            self._keep_before(step)
            self._started = True
        with self.path.open("a") as f:
            # One write per line: a reader never sees two records run together.
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _keep_before(self, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        kept = [r for r in read_history(self.path) if r["step"] < step]
        write_whole(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a history file, in order. A last line without its newline is a write cut
    short by a kill and is left out; any other line that is not a record is an error."""
    # Everything after the last newline is "" or a torn write: never a complete record.
    complete = path.read_text().split("\n")[:-1]
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, TypeError, KeyError):
            raise DataError(f"{path}: line {number} is not a step record (a JSON object with 'step')") from None
        records.append(record)
    return records
