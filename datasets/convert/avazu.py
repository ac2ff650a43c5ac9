"""Avazu CTR CSV (train file, with header): label = click, `hour` (YYMMDDHH) becomes the two
categorical features hour_of_day and day_of_week (Monday = 0), every other column except `id` is
categorical. No dense features."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from embshard.datasets.convert.stream import Parsed, TextFormat, drop_invalid
from embshard.datasets.convert.text import Malformed, TextChunk, open_input
from embshard.datasets.schema import check_column_names
from embshard.errors import DataError

DESCRIPTION = "Avazu CSV"
LABEL = "click"
HOUR = "hour"
TIME_FEATURES = ["hour_of_day", "day_of_week"]
_DROPPED = {"id", LABEL, HOUR}
_LABELS = pa.array(["0", "1"])
_HOUR_FORMAT = "%y%m%d%H"
# Columns of the converted dataset that no raw column may be called.
_MADE = {"label", *TIME_FEATURES}


def text_format(files: list[Path]) -> TextFormat:
    """The format of `files`, which must all have the same header."""
    columns = _header(files[0])
    clash = [c for c in columns if c in _MADE]
    if clash:
        raise DataError(f"{files[0]}: line 1 (the header) has a column {clash[0]!r}, a name the converter "
                        f"gives a column it makes ({', '.join(sorted(_MADE))}); rename it")
    for required in (LABEL, HOUR):
        if required not in columns:
            raise DataError(f"{files[0]}: does not look like {DESCRIPTION}: line 1 (the header) has no column "
                            f"{required!r}")
    check_column_names(columns, f"{files[0]}: line 1 (the header)")
    for path in files[1:]:
        if _header(path) != columns:
            raise DataError(f"{path}: line 1 (the header) differs from that of {files[0]}; "
                            f"files converted together need the same columns in the same order")
    raw = [c for c in columns if c not in _DROPPED]
    return TextFormat(
        name="avazu",
        description=DESCRIPTION,
        columns=columns,
        delimiter=",",
        header_lines=1,
        dense=[],
        categorical=TIME_FEATURES + raw,
        parse=partial(parse, raw=raw),
    )


def _header(path: Path) -> list[str]:
    with open_input(path) as (data, _):
        line = data.readline(1 << 20)
    try:
        # utf-8-sig: a byte-order mark (spreadsheets save one) is no part of the first column's name.
        return line.decode("utf-8-sig").rstrip("\r\n").split(",")
    except UnicodeDecodeError as e:
        # Replaced by U+FFFD, two headers that differ in those bytes were taken for one.
        raise DataError(f"{path}: line 1 (the header) is not UTF-8 text (byte {e.start + 1}: "
                        f"{line[e.start:e.end]!r}); save it as UTF-8") from None


def _hours(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """The YYMMDDHH hours as timestamps, null where the text is no real hour: Arrow's strptime
    rolled 31 February over to 3 March and took a one-digit hour, so only a time that prints back
    as its own text is one."""
    time = pc.strptime(text, format=_HOUR_FORMAT, unit="s", error_is_null=True)
    return pc.if_else(pc.equal(pc.strftime(time, format=_HOUR_FORMAT), text), time, pa.scalar(None, time.type))


def parse(chunk: TextChunk, malformed: Malformed, *, raw: list[str]) -> Parsed:
    t = chunk.table
    ok = {
        LABEL: pc.fill_null(pc.is_in(t[LABEL], value_set=_LABELS), False).to_numpy(zero_copy_only=False),
        HOUR: pc.is_valid(_hours(t[HOUR])).to_numpy(zero_copy_only=False),
    }
    chunk = drop_invalid(chunk, ok, {LABEL: "0 or 1", HOUR: "a YYMMDDHH hour"}, malformed)
    t = chunk.table
    time = _hours(t[HOUR])
    categorical = {"hour_of_day": pc.hour(time), "day_of_week": pc.day_of_week(time)}
    categorical.update({c: t[c] for c in raw})
    return Parsed(chunk.lines, pc.cast(t[LABEL], pa.float32()).to_numpy(), {}, categorical)
