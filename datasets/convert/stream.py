"""The two-pass conversion of large, time-ordered text logs (Criteo, Avazu).

Several input files are read one after another as one log; a line's position counts data lines
across them. Pass 1 reads up to the last train line and counts categorical values of train lines;
pass 2 reads everything, encodes with the train vocabularies and writes the splits. The split is
by position (the first 80% for the time split, a seeded draw for the random one), fixed before
reading, so the split of a line never depends on how many earlier lines were malformed; a
malformed line is skipped from whichever split it falls in, and reported by exactly one pass (the
first to read it). With a dedup key, a pass 0 finds the first row of each key value; later rows
with that value are dropped from both passes, like malformed lines, after the split is fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embshard.datasets.convert.inputs import describe
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
        if value is None:
            return f"column {column!r}: missing, expected {expected[column]}"
        return f"column {column!r}: {value!r} is not {expected[column]}"

    malformed.report(chunk.lines[bad], describe)
    keep = np.ones(chunk.table.num_rows, dtype=bool)
    keep[bad] = False
    return TextChunk(chunk.table.filter(pa.array(keep)), chunk.lines[keep])


@dataclass
class _Input:
    """One input file; its data lines hold positions offset .. offset + lines of the whole log."""

    path: Path
    offset: int
    lines: int
    malformed: Malformed


def convert_text(fmt: TextFormat, files: list[Path], out_dir: str | Path, *, min_count: int, split: str,
                 seed: int, dedup_key: str | None, strict: bool, overwrite: bool) -> tuple[DatasetSpec, str]:
    """Converts `files`, read one after another as one log (see inputs.py)."""
    if dedup_key is not None and dedup_key not in fmt.columns:
        raise DataError(f"--dedup-key {dedup_key!r}: {fmt.name} input has no such column "
                        f"(columns: {', '.join(fmt.columns)})")
    inputs, total = [], 0
    for path in files:
        sniff(path, fmt.columns, fmt.delimiter, skip_lines=fmt.header_lines, what=fmt.description)
        lines = max(0, count_lines(path) - fmt.header_lines)
        inputs.append(_Input(path, total, lines, Malformed(path, strict)))
        total += lines
    if total < 1:
        raise DataError(f"{describe(files)}: no data lines")
    plan = SplitPlan(total) if split == "time" else SplitPlan.random(total, seed)
    first, duplicates = _first_occurrences(fmt, inputs, total, dedup_key) if dedup_key else (None, 0)

    builders = {c: VocabularyBuilder() for c in fmt.categorical}
    for inp, _, parsed in _parsed(fmt, inputs, f"{fmt.name}: counting train values", stop=plan.train_stop):
        positions = parsed.lines - fmt.header_lines + inp.offset
        train = plan.codes(positions) == TRAIN
        if first is not None:
            train &= first[positions]
        for c in fmt.categorical:
            builders[c].add(parsed.categorical[c].filter(pa.array(train)))
    vocabs = {c: b.build(min_count) for c, b in builders.items()}

    dedup = f", first row per {dedup_key!r}" if dedup_key else ""
    spec = DatasetSpec(
        name=fmt.name,
        dense=fmt.dense,
        sparse=[SparseFeature(c, vocabs[c].cardinality) for c in fmt.categorical],
        source=f"{fmt.name}:{','.join(map(str, files))} (min_count={min_count}, split {_describe(split, seed)}"
               f"{dedup})",
        split=split,
    )
    with DatasetWriter(out_dir, spec.arrow_schema(), overwrite=overwrite, total_rows=total,
                       desc=f"{fmt.name}: writing", oov_features=spec.sparse_names) as writer:
        for inp, _, parsed in _parsed(fmt, inputs, f"{fmt.name}: encoding"):
            positions = parsed.lines - fmt.header_lines + inp.offset
            columns = {spec.label: parsed.label, **parsed.dense}
            columns.update({c: vocabs[c].encode(parsed.categorical[c]) for c in fmt.categorical})
            table = pa.table(columns)
            if first is not None:
                keep = first[positions]
                table, positions = table.filter(pa.array(keep)), positions[keep]
            writer.write_ordered(table, positions, plan)
        writer.write_vocabularies(vocabs)
        skipped = sum(inp.malformed.count for inp in inputs)
        dropped = f"dropped {duplicates:,} rows repeating an earlier row's {dedup_key!r}" if dedup_key else ""
        spec = writer.finish(spec, source=describe(files), skipped=skipped, dropped=dropped,
                              one_label_hint="is the input sorted by label? Split it otherwise (--split random)")
    return spec, writer.summary(f"{fmt.name} -> {out_dir}", skipped=skipped, dropped=dropped)


def _parsed(fmt: TextFormat, inputs: list[_Input], desc: str,
            stop: int | None = None) -> Iterator[tuple[_Input, TextChunk, Parsed]]:
    """Parsed rows of all inputs in order, up to global position `stop`; marks the lines read as
    checked, so a later pass does not report a malformed line again."""
    for i, inp in enumerate(inputs, 1):
        if stop is not None and inp.offset >= stop:
            return
        end = fmt.header_lines + (inp.lines if stop is None else min(inp.lines, stop - inp.offset))
        # Each file's bar says which file of how many: a folder of 24 showed 24 unnamed bars a pass.
        which = f" [{i}/{len(inputs)}] {inp.path.name}" if len(inputs) > 1 else ""
        for chunk in read_chunks(inp.path, fmt.columns, fmt.delimiter, inp.malformed,
                                 skip_lines=fmt.header_lines, stop_line=end, desc=desc + which):
            parsed = fmt.parse(chunk, inp.malformed)
            inp.malformed.settle()  # every check of the block has run: with --strict, its first bad line
            yield inp, chunk, parsed
        inp.malformed.covered = max(inp.malformed.covered, end)


def _first_occurrences(fmt: TextFormat, inputs: list[_Input], total: int, key: str) -> tuple[np.ndarray, int]:
    """(first, duplicates): first[position] is False for a row whose `key` value occurred on an
    earlier well-formed row; duplicates counts those rows. Rows without a key are all kept.

    Each key is held as two SipHash digests under independent keys (128 bits) and its position:
    24 bytes a row, about twice that while they are sorted. Arrow's exact group_by on the strings
    took about 275 bytes a row (11 GB for Avazu's 40M). Two different keys are taken for one with
    probability below n^2 / 2^129: about 1e-24 at 40M rows.
    """
    digests, positions, keyless = [], [], []
    for inp, chunk, parsed in _parsed(fmt, inputs, f"{fmt.name}: finding repeated {key!r} values"):
        valid = np.isin(chunk.lines, parsed.lines, assume_unique=True)
        keys = chunk.table[key].filter(pa.array(valid)).combine_chunks()
        position = parsed.lines - fmt.header_lines + inp.offset
        present = keys.is_valid().to_numpy(zero_copy_only=False)
        digests.append(_digest(keys.filter(pa.array(present))))
        positions.append(position[present])
        keyless.append(position[~present])
    first = np.zeros(total, dtype=bool)
    if not positions:
        return first, 0
    first[np.concatenate(keyless)] = True
    digest, position = np.concatenate(digests), np.concatenate(positions)
    del digests, positions
    if not len(position):
        return first, 0  # no row has a key
    # Stable, and positions rise along the log: each run of one digest starts at its first row.
    order = np.lexsort((digest[:, 1], digest[:, 0]))
    digest = digest[order]
    starts = np.r_[True, (digest[1:] != digest[:-1]).any(axis=1)]
    first[position[order[starts]]] = True
    return first, len(order) - int(starts.sum())


_DIGEST_KEYS = ("embshard dedup 0", "embshard dedup 1")  # SipHash keys: 16 bytes each


def _digest(keys: pa.Array) -> np.ndarray:
    values = keys.to_numpy(zero_copy_only=False)
    return np.column_stack([pd.util.hash_array(values, hash_key=k, categorize=False) for k in _DIGEST_KEYS])


def _describe(split: str, seed: int) -> str:
    return "by line order 80/10/10" if split == "time" else f"at random 80/10/10, seed {seed}"
