"""Streaming delimited text (Criteo TSV, Avazu CSV) in blocks, with per-line error reporting.

Lines with the wrong number of fields are found on the raw bytes with numpy (no per-line Python)
and cut out before pyarrow parses the block, so one broken line never fails a whole block and
every problem is reported with its physical line number.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from embshard.errors import DataError

BLOCK_BYTES = 16 << 20
_SHOWN = 5  # malformed lines printed in full; the rest are only counted


@dataclass
class Malformed:
    """Counts skipped lines; with strict=True the first one raises instead."""

    path: Path
    strict: bool
    count: int = 0
    covered: int = 0  # lines below this (0-based) were already checked by an earlier pass
    shown: list[str] = field(default_factory=list)

    def report(self, lines: np.ndarray, describe: Callable[[int], str]) -> None:
        """`lines` are 0-based physical line indices; describe(i) explains lines[i]."""
        fresh = np.flatnonzero(lines >= self.covered)
        if not fresh.size:
            return
        if self.strict:
            i = int(fresh[0])
            raise DataError(f"{self.path}:{int(lines[i]) + 1}: {describe(i)}")
        for i in fresh[: max(0, _SHOWN - len(self.shown))]:
            message = f"{self.path}:{int(lines[i]) + 1}: {describe(int(i))}; line skipped"
            self.shown.append(message)
            print(f"warning: {message}", file=sys.stderr)
        self.count += fresh.size


@dataclass
class TextChunk:
    table: pa.Table  # every column as string; empty fields are null
    lines: np.ndarray  # 0-based physical line index of each row


def count_lines(path: Path) -> int:
    total, last = 0, b"\n"
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"{path.name}: counting lines",
                                      unit="B", unit_scale=True, leave=False) as bar:
        while block := f.read(BLOCK_BYTES):
            total += block.count(b"\n")
            last = block[-1:]
            bar.update(len(block))
    return total + (last != b"\n")


def read_chunks(path: Path, names: list[str], delimiter: str, malformed: Malformed, *,
                skip_lines: int = 0, stop_line: int | None = None, desc: str = "") -> Iterator[TextChunk]:
    """Rows of lines [skip_lines, stop_line) that have len(names) fields."""
    line = 0
    carry = b""
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=desc or path.name, unit="B",
                                      unit_scale=True, leave=False) as bar:
        for _ in range(skip_lines):
            bar.update(len(f.readline()))
            line += 1
        while stop_line is None or line < stop_line:
            block = f.read(BLOCK_BYTES)
            bar.update(len(block))
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            if data:
                chunk = _parse_block(data, line, names, delimiter, malformed)
                line = _next_line(data, line)
                if stop_line is not None:
                    chunk = _before(chunk, stop_line)
                if chunk.table.num_rows:
                    yield chunk
            if not block:
                break


def _next_line(data: bytes, first_line: int) -> int:
    return first_line + data.count(b"\n") + (not data.endswith(b"\n"))


def _before(chunk: TextChunk, stop_line: int) -> TextChunk:
    n = int(np.searchsorted(chunk.lines, stop_line))
    return TextChunk(chunk.table.slice(0, n), chunk.lines[:n])


def _parse_block(data: bytes, first_line: int, names: list[str], delimiter: str,
                 malformed: Malformed) -> TextChunk:
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1])
    seps = np.flatnonzero(buf == ord(delimiter))
    fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    blank = ends == starts
    bad = (fields != len(names)) & ~blank
    lines = first_line + np.arange(len(ends))
    if bad.any():
        bad_lines, bad_fields = lines[bad], fields[bad]
        malformed.report(bad_lines, lambda i: f"expected {len(names)} fields separated by "
                                              f"{delimiter!r}, found {bad_fields[i]}")
    keep = ~bad & ~blank
    if not keep.any():
        return TextChunk(pa.table({n: pa.array([], pa.string()) for n in names}), lines[:0])
    if not keep.all():
        pieces, pos = [], 0
        for i in np.flatnonzero(~keep):
            pieces.append(data[pos:starts[i]])
            pos = ends[i] + 1
        pieces.append(data[pos:])
        data = b"".join(pieces)
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, block_size=BLOCK_BYTES + (1 << 20)),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             null_values=[""], strings_can_be_null=True),
    )
    return TextChunk(table, lines[keep])
