"""The two-pass conversion of large, time-ordered text logs (Criteo, Avazu).

Pass 1 reads the lines up to the last train line and counts categorical values of train lines;
pass 2 reads everything, encodes with the train vocabularies and writes the splits. The split is by
line position (the first 80% for the time split, a seeded draw for the random one), fixed before reading, so the split of a line never depends on how many earlier
lines were malformed; a malformed line is skipped from whichever split it falls in, and reported
by exactly one pass (pass 1 for lines it read, pass 2 for the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embshard.datasets.convert.text import Malformed, TextChunk, count_lines, read_chunks, sniff
from embshard.datasets.convert.vocab import VocabularyBuilder
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.datasets.writer import TRAIN, DatasetWriter, SplitPlan
from embshard.errors import DataError


@dataclass
class Parsed:
    lines: np.ndarray  # 0-based physical line of each row
    label: np.ndarray  # float32
    dense: dict[str, np.ndarray]  # float32 per dense feature
    categorical: dict[str, pa.Array | pa.ChunkedArray]  # raw values; null = missing


@dataclass(frozen=True)
class TextFormat:
    name: str
    description: str  # for "does not look like ..." errors, e.g. "Criteo TSV"
    columns: list[str]  # raw fields of a line, in order
    delimiter: str
    header_lines: int
    dense: list[str]
    categorical: list[str]
    parse: Callable[[TextChunk, Malformed], Parsed]


def drop_invalid(chunk: TextChunk, ok: dict[str, np.ndarray], expected: dict[str, str],
                 malformed: Malformed) -> TextChunk:
    """Reports and removes rows where any ok[column] is False; expected[column] says what was wanted."""
    names = list(ok)
    matrix = np.column_stack([ok[n] for n in names])
    bad = np.flatnonzero(~matrix.all(axis=1))
    if not bad.size:
        return chunk
    first_bad_column = np.argmin(matrix[bad], axis=1)

    def describe(i: int) -> str:
        column = names[first_bad_column[i]]
        value = chunk.table[column][int(bad[i])].as_py()
        return f"column {column!r}: {value!r} is not {expected[column]}"

    malformed.report(chunk.lines[bad], describe)
    keep = np.ones(chunk.table.num_rows, dtype=bool)
    keep[bad] = False
    return TextChunk(chunk.table.filter(pa.array(keep)), chunk.lines[keep])


def convert_text(fmt: TextFormat, src: Path, out_dir: str | Path, *, min_count: int, split: str,
                 seed: int, strict: bool, overwrite: bool) -> tuple[DatasetSpec, str]:
    if not src.is_file():
        raise DataError(f"{src}: {fmt.name} input file not found")
    sniff(src, fmt.columns, fmt.delimiter, skip_lines=fmt.header_lines, what=fmt.description)
    total = count_lines(src) - fmt.header_lines
    if total < 1:
        raise DataError(f"{src}: no data lines")
    plan = SplitPlan(total) if split == "time" else SplitPlan.random(total, seed)
    malformed = Malformed(src, strict)
    train_stop = fmt.header_lines + plan.train_stop

    builders = {c: VocabularyBuilder() for c in fmt.categorical}
    for chunk in read_chunks(src, fmt.columns, fmt.delimiter, malformed, skip_lines=fmt.header_lines,
                             stop_line=train_stop, desc=f"{fmt.name}: counting train values"):
        parsed = fmt.parse(chunk, malformed)
        train = pa.array(plan.codes(parsed.lines - fmt.header_lines) == TRAIN)
        for c in fmt.categorical:
            builders[c].add(parsed.categorical[c].filter(train))
    malformed.covered = train_stop
    vocabs = {c: b.build(min_count) for c, b in builders.items()}

    spec = DatasetSpec(
        name=fmt.name,
        dense=fmt.dense,
        sparse=[SparseFeature(c, vocabs[c].cardinality) for c in fmt.categorical],
        source=f"{fmt.name}:{src} (min_count={min_count}, split {_describe(split, seed)})",
        split=split,
    )
    with DatasetWriter(out_dir, spec.arrow_schema(), overwrite=overwrite, total_rows=total,
                       desc=f"{fmt.name}: writing") as writer:
        for chunk in read_chunks(src, fmt.columns, fmt.delimiter, malformed, skip_lines=fmt.header_lines,
                                 desc=f"{fmt.name}: encoding"):
            parsed = fmt.parse(chunk, malformed)
            columns = {spec.label: parsed.label, **parsed.dense}
            columns.update({c: vocabs[c].encode(parsed.categorical[c]) for c in fmt.categorical})
            writer.write_ordered(pa.table(columns), parsed.lines - fmt.header_lines, plan)
        spec = writer.finish(spec, source=str(src), skipped=malformed.count)
    return spec, writer.summary(f"{fmt.name} -> {out_dir}", skipped=malformed.count)


def _describe(split: str, seed: int) -> str:
    return "by line order 80/10/10" if split == "time" else f"at random 80/10/10, seed {seed}"
