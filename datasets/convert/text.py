"""Streaming delimited text (Criteo TSV, Avazu CSV) in blocks, with per-line error reporting.

Lines with the wrong number of fields are found on the raw bytes with numpy (no per-line Python)
and cut out before pyarrow parses the block, so one broken line never fails a whole block and
every problem is reported with its physical line number. Gzip input is read as it streams
(recognised by its magic bytes, whatever the file is called); tar archives are refused.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from embshard.errors import DataError
from embshard.progress import progress_bar

BLOCK_BYTES = 16 << 20
_SHOWN = 5  # malformed lines printed in full; the rest are only counted
# A file whose first SNIFF_LINES non-empty data lines all have the wrong field count is another
# format, not a file with a few broken lines.
SNIFF_LINES = 5
_SNIFF_LINE_BYTES = 1 << 20  # a binary file may have no newline for a long way
_GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_AT = 257  # "ustar" in the first tar header block
# An integer field; at most 18 digits, so a cast to int64 can never overflow. Said so: 23 digits
# were "not an integer".
INTEGER, AN_INTEGER = r"^-?[0-9]{1,18}$", "an integer of at most 18 digits"


@dataclass
class Malformed:
    """Counts skipped lines; with strict=True the first one raises instead, at `settle`.

    A block of lines is checked in stages (field counts, then UTF-8, then each format's values),
    so with strict=True a report only keeps the earliest line so far: `settle`, once every stage
    has seen the block, raises for it. Raised at once, a short line 9 was "the first malformed
    line" of a file whose line 5 held a bad label."""

    path: Path
    strict: bool
    count: int = 0
    covered: int = 0  # lines below this (0-based) were already checked by an earlier pass
    shown: list[str] = field(default_factory=list)
    first: tuple[int, str] | None = None  # strict: the earliest bad line reported, and why

    def report(self, lines: np.ndarray, describe: Callable[[int], str]) -> None:
        """`lines` are 0-based physical line indices, ascending; describe(i) explains lines[i]."""
        fresh = np.flatnonzero(lines >= self.covered)
        if not fresh.size:
            return
        if self.strict:
            i = int(fresh[0])
            if self.first is None or int(lines[i]) < self.first[0]:
                self.first = (int(lines[i]), describe(i))
            return
        for i in fresh[: max(0, _SHOWN - len(self.shown))]:
            message = f"{self.path}:{int(lines[i]) + 1}: {describe(int(i))}; line skipped"
            self.shown.append(message)
            tqdm.write(f"warning: {message}", file=sys.stderr)  # not in the middle of a progress bar
        self.count += fresh.size

    def settle(self) -> None:
        """With strict=True, DataError for the earliest bad line reported; call once every check
        of a block has reported, before anything of it is used."""
        if self.first is not None:
            line, why = self.first
            raise DataError(f"{self.path}:{line + 1}: {why}")


@dataclass
class TextChunk:
    table: pa.Table  # every column as string; empty fields are null
    lines: np.ndarray  # 0-based physical line index of each row


# What each input file was when a conversion first opened it: (device, inode, size, mtime).
_first_seen: ContextVar[dict[Path, tuple[int, int, int, int]] | None] = ContextVar("first_seen", default=None)


@contextmanager
def inputs_held_still() -> Iterator[None]:
    """Within it, every input must be the file it was when first opened, unchanged, at every open
    and close: a conversion reads each file in several passes (count, vocabulary, write), and a
    file replaced between them gave ids of one file's vocabulary to another's rows, unsaid."""
    token = _first_seen.set({})
    try:
        yield
    finally:
        _first_seen.reset(token)


def _check_unchanged(path: Path, raw: BinaryIO) -> None:
    seen = _first_seen.get()
    if seen is None:
        return
    st = os.fstat(raw.fileno())
    now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if seen.setdefault(path, now) != now:
        raise DataError(f"{path}: changed while it was being converted (replaced, rewritten or appended to); "
                        "convert it once it is complete")


@contextmanager
def open_input(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(data, raw): `data` yields the decompressed bytes of a gzip file, else the file itself;
    progress is measured on `raw`, whose size is known."""
    try:
        opened = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        seen = _first_seen.get()
        if seen is None or path not in seen:
            raise
        raise DataError(f"{path}: removed while it was being converted") from None
    try:
        with opened as raw:
            _check_unchanged(path, raw)
            compressed = raw.read(2) == _GZIP_MAGIC

            def rewound() -> BinaryIO:
                raw.seek(0)
                return gzip.GzipFile(fileobj=raw) if compressed else raw  # type: ignore[return-value]

            head = rewound().read(_TAR_MAGIC_AT + 5)
            if head[_TAR_MAGIC_AT:] == b"ustar":
                raise DataError(f"{path}: a tar archive; unpack it first (tar xf) and give the data file inside")
            encoding = _wide_encoding(head)
            if encoding is not None:
                # Its tabs and newlines are where UTF-8's are, so every line passed as one of the
                # format and failed on its values: all skipped as malformed, said line by line.
                raise DataError(f"{path}: {encoding} text; the converters read UTF-8: convert it first "
                                f"(iconv -f {encoding} -t UTF-8)")
            yield rewound(), raw
            _check_unchanged(path, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def _wide_encoding(head: bytes) -> str | None:
    """'UTF-16' or 'UTF-32' where `head` (a file's first bytes) starts with that encoding's
    byte-order mark, or is ASCII text in it without one (each character's other bytes NUL, in
    either byte order); else None. Binary numbers (int16s) have NULs so too, but not text between."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    first = head[:64]
    for width, name in ((4, "UTF-32"), (2, "UTF-16")):
        if len(first) < 4 * width:
            continue
        for at in (0, width - 1):  # little-endian, big-endian
            chars = first[at::width]
            rest = bytes(b for i, b in enumerate(first) if i % width != at)
            if not any(rest) and all(32 <= c < 127 or c in b"\t\r\n" for c in chars):
                return name
    return None


def sniff(path: Path, names: list[str], delimiter: str, *, skip_lines: int, what: str) -> None:
    """Fails at once, in one line, on a file of another format instead of skipping every line."""
    first = None
    with open_input(path) as (data, _):
        for _ in range(skip_lines):
            data.readline()
        number, checked = skip_lines, 0
        while checked < SNIFF_LINES and (line := data.readline(_SNIFF_LINE_BYTES)):
            number += 1
            if not line.strip(b"\r\n"):
                continue
            fields = line.count(delimiter.encode()) + 1
            if fields == len(names):
                return
            first = first or (number, fields)
            checked += 1
    if first is not None:
        raise DataError(f"{path}: does not look like {what}: line {first[0]} has {first[1]} fields, "
                        f"expected {len(names)} separated by {delimiter!r}")


def count_lines(path: Path) -> int:
    total, last = 0, b"\n"
    with open_input(path) as (data, raw), progress_bar(total=path.stat().st_size, desc=f"{path.name}: counting lines",
                                                unit="B", unit_scale=True, leave=False) as bar:
        while block := data.read(BLOCK_BYTES):
            total += block.count(b"\n")
            last = block[-1:]
            bar.update(raw.tell() - bar.n)
    return total + (last != b"\n")


def read_chunks(path: Path, names: list[str], delimiter: str, malformed: Malformed, *,
                skip_lines: int = 0, stop_line: int | None = None, desc: str = "") -> Iterator[TextChunk]:
    """Rows of lines [skip_lines, stop_line) that have len(names) fields; lines from stop_line on
    are not even parsed, so a later pass is the only one to report them."""
    with open_input(path) as (f, raw), progress_bar(total=path.stat().st_size, desc=desc or path.name, unit="B",
                                             unit_scale=True, leave=False) as bar:
        for _ in range(skip_lines):
            f.readline()
        for data, at in line_blocks(f):
            bar.update(raw.tell() - bar.n)
            line = skip_lines + at
            if stop_line is not None:
                if line >= stop_line:
                    return
                data = _first_lines(data, stop_line - line)
            chunk = _parse_block(data, line, names, delimiter, malformed)
            if chunk.table.num_rows:
                yield chunk  # the caller checks its values, then settles
            malformed.settle()


def line_blocks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(data, line): whole lines of about BLOCK_BYTES each (the last may lack its newline), and
    the 0-based line of `f` (from where it is read) that `data` starts at."""
    line, carry = 0, b""
    while True:
        block = f.read(BLOCK_BYTES)
        data = carry + block
        if block:
            cut = data.rfind(b"\n") + 1
            data, carry = data[:cut], data[cut:]
        if data:
            yield data, line
            line = _next_line(data, line)
        if not block:
            return


def _next_line(data: bytes, first_line: int) -> int:
    return first_line + data.count(b"\n") + (not data.endswith(b"\n"))


def _first_lines(data: bytes, n: int) -> bytes:
    """The first n lines of `data` (with their newlines)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    return data if len(ends) < n else data[: int(ends[n - 1]) + 1]


def line_bounds(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of each line of `buf`: ends at its newline, or at the end of a last line
    without one."""
    ends = np.flatnonzero(buf == ord("\n"))
    if len(buf) and buf[-1] != ord("\n"):
        ends = np.append(ends, len(buf))
    return np.concatenate([[0], ends[:-1] + 1])[: len(ends)].astype(np.int64), ends


def blank_lines(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each line is empty, a CRLF file's empty line included."""
    length = ends - starts
    return (length == 0) | ((length == 1) & (buf[np.minimum(starts, len(buf) - 1)] == ord("\r")))


def emptied(data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray) -> bytes:
    """`data` with these lines' text cut out and their newlines kept: no record, and every later
    line keeps its number."""
    pieces, at = [], 0
    for line in lines:
        pieces.append(data[at:starts[line]])
        at = int(ends[line])
    pieces.append(data[at:])
    return b"".join(pieces)


def without_stray_returns(data: bytes, first_line: int, malformed: Malformed) -> bytes:
    """`data` with each line that holds a carriage return other than its CRLF ending reported and
    emptied. pyarrow ends a record at a lone \\r too, so such a line reached it as two short rows,
    counted here as one line: a traceback, or the skipped lines after it named wrongly."""
    buf = np.frombuffer(data, dtype=np.uint8)
    returns = np.flatnonzero(buf[:-1] == ord("\r"))  # a last byte \r ends the last line
    stray = returns[buf[returns + 1] != ord("\n")]
    if not stray.size:
        return data
    starts, ends = line_bounds(buf)
    lines = np.unique(np.searchsorted(ends, stray))
    malformed.report(first_line + lines, lambda _: "a carriage return (\\r) inside the line")
    return emptied(data, starts, ends, lines)


def _parse_block(data: bytes, first_line: int, names: list[str], delimiter: str,
                 malformed: Malformed) -> TextChunk:
    data = without_stray_returns(data, first_line, malformed)
    buf = np.frombuffer(data, dtype=np.uint8)
    starts, ends = line_bounds(buf)
    seps = np.flatnonzero(buf == ord(delimiter))
    fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    blank = blank_lines(buf, starts, ends)
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
        # Bytes first: text would fail the whole block on one field that is not UTF-8.
        convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                             null_values=[""], strings_can_be_null=True),
    )
    return as_text(table, lines[keep], malformed)


def as_text(table: pa.Table, lines: np.ndarray, malformed: Malformed) -> TextChunk:
    """The binary columns as strings; rows with a field that is not UTF-8 are malformed lines."""
    text: dict[str, pa.ChunkedArray] = {}
    bad = np.zeros(table.num_rows, dtype=bool)
    culprit = np.full(table.num_rows, "", dtype=object)
    for name in table.column_names:
        try:
            text[name] = pc.cast(table[name], pa.string())
        except pa.ArrowInvalid:
            # Rare, so found value by value in Python.
            for i, value in enumerate(table[name].to_pylist()):
                if value is not None and not bad[i] and not _is_utf8(value):
                    bad[i], culprit[i] = True, name
    if not bad.any():
        return TextChunk(pa.table(text), lines)
    malformed.report(lines[bad], lambda i: f"column {culprit[bad][i]!r}: not UTF-8 text")
    keep = pa.array(~bad)
    return TextChunk(pa.table({n: pc.cast(table[n].filter(keep), pa.string()) for n in table.column_names}),
                     lines[~bad])


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
