"""Is a dataset folder (or object-store prefix) whole? Every split's part files, and every
vocabulary, are checked against dataset.json from Parquet footers alone (no data read), so a
missing, stray or truncated file is an error instead of training quietly on fewer rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embshard.datasets.catalog import read_catalog
from embshard.datasets.schema import (
    PART_PATTERN,
    SPEC_FILE,
    SPLITS,
    DatasetSpec,
    part_name,
    read_parquet_footer,
    split_dir,
    vocabulary_file,
)
from embshard.datasets.storage import StoragePath, location
from embshard.datasets.vocabulary import DATASET_KEY, PART_KEY, check_provenance, part_stamp
from embshard.errors import DataError, first_line


def verify_dataset(dataset_dir: str | Path) -> None:
    """Raises DataError naming the first part file (or split) that disagrees with dataset.json."""
    spec = DatasetSpec.load(dataset_dir)
    for split in SPLITS:
        verify_split(dataset_dir, spec, split)
    for name in spec.vocabularies:
        # Training reads none, but an export carries them: a damaged one is found before the run.
        path = location(dataset_dir) / vocabulary_file(name)
        footer = read_parquet_footer(path, f"{SPEC_FILE} lists {name!r} under vocabularies: convert the dataset "
                                           f"again, or take {name!r} off that list to train and serve by ids")
        check_provenance(path, footer.schema.to_arrow_schema(), footer.num_rows, spec.feature(name).cardinality,
                         spec.id, name)
    if spec.catalog is not None:  # read whole (one row per item): evaluation read it first, after training
        read_catalog(dataset_dir, spec)


# The unstamped part files this process has warned of (a run's reader verifies them each epoch).
_said_unstamped: set[StoragePath] = set()


def verify_split(dataset_dir: str | Path, spec: DatasetSpec,
                 split: str) -> list[tuple[StoragePath, pq.FileMetaData]]:
    """The split's part files with their footers, in part order, after checking them against `spec`."""
    directory = split_dir(dataset_dir, split)
    if not directory.is_dir():
        raise DataError(f"{directory}: split directory not found")
    files: list[StoragePath] = sorted(directory.glob(PART_PATTERN), key=str)
    unread = sorted((f for f in directory.glob("*.parquet") if not f.name.startswith(".") and f not in files), key=str)
    if unread:
        # Not read: a user's `extra.parquet` beside the parts left its rows out of training, unsaid.
        raise DataError(f"{unread[0]}: a Parquet file whose name is no part file's ({PART_PATTERN}), so its rows would "
                        "not be read; name it as a part, or move it out of the split")
    if not files:
        raise DataError(f"{directory}: no {PART_PATTERN} files")
    recorded = spec.parts.get(split)
    if recorded is not None:
        expected = [directory / part_name(i) for i in range(len(recorded))]
        for path in expected:
            if not path.is_file():
                raise DataError(f"{path}: {_not_a_file(path)}; {SPEC_FILE} records {len(recorded)} part files "
                                f"for split {split!r}")
        stray = sorted(set(files) - set(expected), key=str)
        if stray:
            raise DataError(f"{stray[0]}: not recorded in {SPEC_FILE} ({len(recorded)} part files for "
                            f"split {split!r}); left over from another dataset?")
    found = []
    for i, path in enumerate(files):
        meta = read_parquet_footer(path)
        stamps = meta.metadata or {}
        written_for = stamps.get(DATASET_KEY, b"").decode(errors="replace")
        if written_for and written_for != spec.id:  # files of before the stamp have none
            if not spec.id:  # a dataset.json of before the id has no stamped parts
                raise DataError(f"{path}: written for the dataset with id {written_for[:8]}, and {SPEC_FILE} has no "
                                f"id (taken out by hand?): write the dataset again")
            raise DataError(f"{path}: written for another dataset (id {written_for[:8]}) than {SPEC_FILE}'s "
                            f"({spec.id[:8]}): copied in from another dataset? Write the dataset again")
        if not written_for and spec.id and path not in _said_unstamped:
            # pandas, DuckDB and Spark drop the stamp: another dataset's part, so rewritten, trained
            # as this one's without a word. The same rows so rewritten are fine: a warning, once.
            _said_unstamped.add(path)
            print(f"warning: {path}: carries no dataset stamp though {SPEC_FILE} has an id (rewritten by another "
                  "tool?), so its rows cannot be checked to be this dataset's", file=sys.stderr)
        if recorded is not None and meta.num_rows != recorded[i]:
            raise DataError(f"{path}: {meta.num_rows:,} rows, {SPEC_FILE} records {recorded[i]:,}")
        written_as = stamps.get(PART_KEY, b"").decode(errors="replace")
        if written_as and written_as != part_stamp(split, path.name):  # files of before this stamp have none
            raise DataError(f"{path}: written as this dataset's {written_as} (copied or renamed here?), so its rows "
                            "are not this part's: restore the part file, or write the dataset again")
        found.append((path, meta))
    rows = sum(meta.num_rows for _, meta in found)
    if split in spec.rows and rows != spec.rows[split]:
        raise DataError(f"{directory}: {rows:,} rows in {len(files)} part files, {SPEC_FILE} records "
                        f"{spec.rows[split]:,} (a part file missing or left over?)")
    return found


def _not_a_file(path: StoragePath) -> str:
    """What stands where a part file should: a folder or a broken link was said to be "missing"."""
    if path.is_symlink() and not path.exists():
        return "a symbolic link to nothing (or a loop of links), not a part file"
    if path.is_dir():
        return "a folder, not a part file"
    if path.exists():
        return "not a regular file"
    return "missing"


def read_row_group(parquet: pq.ParquetFile, path: StoragePath, index: int, first_row: int,
                   columns: list[str]) -> pa.Table:
    """Row group `index` of the part file `path` (whose rows start at `first_row`); DataError
    naming them where a damaged page behind an intact footer cannot be read. A store's failures
    are its own, said (and retried) by the caller."""
    try:
        return parquet.read_row_group(index, columns=columns)
    except (OSError, pa.ArrowException) as e:
        if not isinstance(path, Path):
            raise
        rows = parquet.metadata.row_group(index).num_rows
        raise DataError(f"{path}: row group {index} (file rows {first_row:,} to {first_row + rows - 1:,}) cannot be "
                        f"read ({first_line(e)}); the file is damaged: write the dataset again") from None
