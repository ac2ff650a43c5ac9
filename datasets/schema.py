"""`dataset.json`: the contract between data producers (synth, converters) and consumers.

Layout of a dataset directory::

    DIR/dataset.json            # this spec, with the row count of every part file
    DIR/train/part-00000.parquet ...
    DIR/valid/part-00000.parquet ...
    DIR/test/part-00000.parquet ...
    DIR/profile/                # written by `embshard data profile` (see profile.py)
    DIR/items/part-00000.parquet # optional item catalog (see ItemCatalog), e.g. MovieLens' movies
    DIR/vocab/<feature>.parquet  # a converter's raw value of each id (see vocabulary.py)

Parquet columns: `label` (float32), one float32 column per dense feature, one column per sparse
feature: int64 for single-hot (exactly one id per row), list<int64> for multi-hot (0..n ids),
plus any `extra` columns (e.g. MovieLens' raw `rating`). Ids are contiguous in [0, cardinality).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embshard.datasets.storage import (
    StoragePath,
    arrow_source,
    check_reachable,
    is_count,
    location,
    moved_aside,
    read_json,
    read_json_version,
)
from embshard.errors import DataError

SPEC_FILE = "dataset.json"
SPEC_VERSION = 1
SPLITS = ("train", "valid", "test")
PART_PATTERN = "part-*.parquet"
# The id every converter gives values it has no row for: unseen in train, rarer than min_count, or
# missing. It must get gradients in training, or every unseen test value lands on an untrained row.
OOV_ID = 0
# An extra float32 column of datasets with an item catalog: the share of train positives whose
# item is this row's item (0 for an item never positive in train). It is what in-batch sampling
# draws the row's item with, carried per row so no id remap can misalign it (two-tower's log-q).
ITEM_FREQUENCY = "item_frequency"


# A file name's most bytes (NAME_MAX), less the longest suffix a column's files take (".parquet").
_NAME_BYTES = 255 - len(".parquet")


def check_column_names(names: list[str], where: str) -> None:
    """DataError for a column name a dataset cannot carry, or one given twice. A sparse feature's
    name is a file name (its profile's `profile/<name>.npy`: `../x` wrote outside the dataset) and
    a torch module name (its table `t_<name>`: a '.' converted, then failed to train)."""
    seen = set()
    for name in names:
        if not isinstance(name, str) or not name or not name.isprintable() or any(c in name for c in "/\\."):
            raise DataError(f"{where}: column name {name!r}: a column needs a name without '/', '\\', '.' "
                            "or control characters; rename it")
        if len(name.encode()) > _NAME_BYTES:
            # Said when the header is read: the file system refused `vocab/<name>.parquet` as
            # "File name too long" after the whole conversion, as a traceback.
            raise DataError(f"{where}: column name {name[:40]!r}... is {len(name.encode())} bytes long; a column "
                            f"name is also a file name in the dataset (vocab/<name>.parquet), at most {_NAME_BYTES} "
                            "bytes; rename it")
        if name in seen:
            raise DataError(f"{where}: column name {name!r} given twice")
        seen.add(name)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


ROLES = ("query", "item", "")
# What `label` holds: "click", 0 or 1 (a click, or a rating above / below neutral), or "rating",
# the raw rating itself (a regression target, e.g. for matrix factorisation).
TARGETS = ("click", "rating")
ITEMS_DIR = "items"
PROFILE_DIR = "profile"  # the train split's id counts (profile.py)
PROFILE_FILE = "profile.json"  # in PROFILE_DIR, beside one `<feature>.npy` count file per feature
# A converter's raw values of each feature, in id order (vocab.py): what a served id stands for.
VOCAB_DIR = "vocab"


def vocabulary_file(feature: str) -> str:
    """Where a feature's vocabulary lives in a dataset (or an export) folder."""
    return f"{VOCAB_DIR}/{feature}.parquet"


def is_vocabulary_entry(parts: tuple[str, ...]) -> bool:
    """Whether an entry of a dataset or export folder, as the names of its path within it, is
    the vocabulary folder or one of its files."""
    return parts[0] == VOCAB_DIR and (len(parts) == 1 or len(parts) == 2 and parts[1].endswith(".parquet"))


@dataclass(frozen=True)
class SparseFeature:
    name: str
    cardinality: int
    multi_hot: bool = False
    # Which tower of a retrieval model reads it: "query" (the user side), "item", or "" (neither
    # said; ranking models read every feature regardless).
    role: str = ""


@dataclass(frozen=True)
class ItemCatalog:
    """Every item a retrieval model ranks, one row each: the `item_id` column (ids as in the
    splits, one row per id in [0, cardinality)) and the item features, in the same column types
    as the splits."""

    item_id: str
    features: list[str]  # the item features besides item_id
    rows: int
    path: str = f"{ITEMS_DIR}/part-00000.parquet"  # relative to the dataset folder


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    dense: list[str]
    sparse: list[SparseFeature]
    label: str = "label"
    extra: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # split -> row count
    # split -> rows of each part file, in part order: lets a reader name a missing or swapped part.
    # Empty in datasets written before it was recorded; those are checked by `rows` alone.
    parts: dict[str, list[int]] = field(default_factory=dict)
    source: str = ""
    # How rows were split (time, random, leave-last, or an official split such as ML-100K's u1).
    split: str = ""
    # split -> sparse feature -> share of its ids that are OOV_ID. A share near 1 in test means
    # cold start: the model cannot use that feature there. Empty in datasets written before it was recorded.
    oov_share: dict[str, dict[str, float]] = field(default_factory=dict)
    # What `data synth --planted` planted (ranks, Bayes AUC): for benchmarks to compare against.
    # No planner or training code reads it, so a method cannot cheat by looking. Empty otherwise.
    planted: dict[str, Any] = field(default_factory=dict)
    # The item catalog, when the dataset has one (MovieLens); None in datasets without items.
    catalog: ItemCatalog | None = None
    target: str = "click"  # one of TARGETS; datasets written before it was recorded are click data
    # A name this dataset alone has, given when it is written: a reader that finds another one at
    # the same path knows the dataset was replaced under it. Empty in datasets written before.
    id: str = ""
    # Features whose raw values a converter kept (vocabulary_file), so ids can be told from values
    # and back. Empty for synth's ids (they are the values) and datasets written before.
    vocabularies: list[str] = field(default_factory=list)
    version: int = SPEC_VERSION

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def inputs_sha256(self) -> str:
        """The hash of what a model trained on this data is built from and reads: its label and
        target, the dense features in order, and each sparse feature's name, cardinality, kind and
        role. A dataset.json edited in place keeps its id, not this."""
        inputs = [self.label, self.target, self.dense,
                  [[f.name, f.cardinality, f.multi_hot, f.role] for f in self.sparse]]
        return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise DataError(f"{self.name}: no sparse feature {name!r} (have {', '.join(self.sparse_names)})")

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field(self.label, pa.float32())]
        fields += [pa.field(d, pa.float32()) for d in self.dense]
        for f in self.sparse:
            fields.append(pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64()))
        return pa.schema(fields)

    def save(self, directory: str | Path) -> StoragePath:
        path = location(directory) / SPEC_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @staticmethod
    def load(directory: str | StoragePath) -> "DatasetSpec":
        where = location(directory)
        check_reachable(where)
        path = where / SPEC_FILE
        if not where.exists():
            raise DataError(f"{where}: dataset directory not found{moved_aside(where)}")
        if not path.is_file():
            raise DataError(f"{path}: missing (is {where} a dataset written by `embshard data`?)")
        return DatasetSpec.from_json(read_json_version(path, SPEC_VERSION, DataError), str(path))

    def check_still_at(self, directory: str | StoragePath, doing: str,
                       then: str = "run again on the dataset there now") -> None:
        """DataError when `directory` no longer holds this dataset (another was written over it,
        `--overwrite`, since this one was read): what is read next would be the other's rows.
        `then`: what to do about it."""
        if not self.id:
            return
        path = location(directory) / SPEC_FILE
        try:
            raw = read_json(path, DataError)
        except (DataError, FileNotFoundError):
            raw = None  # gone (a store's replacement takes it away first), or half-written
        now = raw.get("id") if isinstance(raw, dict) else None
        if now != self.id:
            raise DataError(f"{location(directory)}: the dataset was replaced while {doing} read it; stopped "
                            f"before reading any of the new one: {then}")

    @staticmethod
    def from_json(raw: dict[str, Any], where: str) -> "DatasetSpec":
        """A spec from its JSON form (`dataset.json`, or a copy kept beside an export)."""
        try:
            catalog = raw.get("catalog")
            spec = DatasetSpec(**{**raw, "sparse": [SparseFeature(**s) for s in raw["sparse"]],
                                  "catalog": ItemCatalog(**catalog) if catalog is not None else None})
        except (KeyError, TypeError) as e:
            unknown = re.search(r"unexpected keyword argument '([^']*)'", str(e))
            if unknown:  # fields are added without a version change: older specs still load
                raise DataError(f"{where}: field {unknown.group(1)!r} is unknown to this embshard (written by a newer "
                                "one?); upgrade embshard where it is read") from None
            raise DataError(f"{where}: malformed dataset spec ({e})") from None
        _check_types(spec, where)
        check_column_names([spec.label, *spec.dense, *spec.sparse_names, *spec.extra], where)
        if spec.target not in TARGETS:
            raise DataError(f"{where}: target {spec.target!r} (one of {', '.join(TARGETS)})")
        if not spec.sparse:
            # Planned as "0 tables", it crashed in every worker once Ray had started.
            raise DataError(f"{where}: no sparse features; embshard trains the embedding tables of a dataset's "
                            "sparse features")
        for f in spec.sparse:
            if not isinstance(f.name, str) or isinstance(f.cardinality, bool) or not isinstance(f.cardinality, int) \
                    or f.cardinality < 1:
                raise DataError(f"{where}: sparse feature {f.name!r}: cardinality {f.cardinality!r} "
                                f"(expected an integer >= 1)")
            if f.role not in ROLES:
                raise DataError(f"{where}: sparse feature {f.name!r}: role {f.role!r} (one of query, item, or \"\")")
        for name in spec.vocabularies:
            if name not in spec.sparse_names:
                raise DataError(f"{where}: vocabularies: {name!r} is no sparse feature")
        if spec.catalog is not None:
            for name in [spec.catalog.item_id, *spec.catalog.features]:
                if name not in spec.sparse_names:
                    raise DataError(f"{where}: catalog column {name!r} is no sparse feature")
        return spec

    def with_role(self, role: str) -> list[str]:
        return [f.name for f in self.sparse if f.role == role]

    def catalog_arrow_schema(self) -> pa.Schema:
        if self.catalog is None:
            raise DataError(f"{self.name}: no item catalog")
        schema = self.arrow_schema()
        return pa.schema([schema.field(c) for c in [self.catalog.item_id, *self.catalog.features]])


def _check_types(spec: DatasetSpec, where: str) -> None:
    """DataError naming the first field of dataset.json whose type is not what readers index and
    format by (row counts, part sizes, column lists)."""
    for key in ("name", "label", "source", "split", "target", "id"):
        if not isinstance(getattr(spec, key), str):
            raise DataError(f"{where}: {key}: expected a string, got {getattr(spec, key)!r}")
    for key in ("dense", "extra", "vocabularies"):
        if not isinstance(getattr(spec, key), list):
            raise DataError(f"{where}: {key}: expected a list of column names, got {getattr(spec, key)!r}")
    for key in ("rows", "parts", "oov_share", "planted"):
        if not isinstance(getattr(spec, key), dict):
            raise DataError(f"{where}: {key}: expected an object, got {getattr(spec, key)!r}")
    for split, n in spec.rows.items():
        if split not in SPLITS or not is_count(n):
            raise DataError(f"{where}: rows.{split}: expected a row count of a split ({', '.join(SPLITS)}), got {n!r}")
    for split, sizes in spec.parts.items():
        if split not in SPLITS or not isinstance(sizes, list) or not all(is_count(n) for n in sizes):
            raise DataError(f"{where}: parts.{split}: expected the row counts of a split's part files, got {sizes!r}")
    for f in spec.sparse:
        if not isinstance(f.multi_hot, bool):
            raise DataError(f"{where}: sparse feature {f.name!r}: multi_hot {f.multi_hot!r} (true or false)")


def read_parquet_table(path: StoragePath, what: str) -> pa.Table:
    """A small Parquet file read whole (an item catalog, a vocabulary); `what` says why it should
    be there when it is not."""
    if not path.is_file():  # pyarrow reads a folder as a dataset of its files
        raise _missing(path, what)
    return _parquet(path, what, pq.read_table)


def read_parquet_footer(path: StoragePath, what: str = "") -> pq.FileMetaData:
    """A Parquet file's footer alone (its rows, schema and metadata); `what` as above. No listing
    first: a split's part files are found by one, and a bucket would be asked again for each."""
    return _parquet(path, what, pq.read_metadata)


def _parquet(path: StoragePath, what: str, read: Any) -> Any:
    fs, source = arrow_source(path)
    try:
        return read(source, filesystem=fs)
    except FileNotFoundError:
        raise _missing(path, what) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _missing(path: StoragePath, what: str) -> DataError:
    return DataError(f"{path}: missing" + (f" ({what})" if what else ""))


def split_dir(directory: str | Path, split: str) -> StoragePath:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    return location(directory) / split


def flat_ids(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """A sparse column as (ids, offsets): offsets[i]:offsets[i+1] are row i's ids; None if single-hot."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_list(column.type):
        return column.to_numpy(zero_copy_only=False), None
    offsets = column.offsets.to_numpy()
    # A sliced list array keeps its parent's offsets; rebase them onto the flattened values.
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def check_part_schema(path: str | StoragePath, actual: pa.Schema, spec: DatasetSpec) -> None:
    """DataError unless a part file has every column dataset.json declares, of its type."""
    for column in spec.arrow_schema():
        found = actual.get_all_field_indices(column.name)
        if len(found) > 1:  # get_field_index gives -1 for it too: it was said to be missing
            raise DataError(f"{path}: column {column.name!r} appears {len(found)} times; a part file holds each "
                            "column once")
        if not found:
            raise DataError(f"{path}: column {column.name!r} missing (dataset.json declares it)")
        i = found[0]
        if not reads_as(actual.field(i).type, column.type):
            raise DataError(f"{path}: column {column.name!r} has type {actual.field(i).type}, "
                            f"dataset.json implies {column.type}")
    for name in spec.extra:
        i = actual.get_field_index(name)
        if i < 0:
            raise DataError(f"{path}: extra column {name!r} missing (dataset.json declares it)")
        # A batch carries extras as tensors: a string column was a TypeError from torch mid-epoch.
        kind = actual.field(i).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise DataError(f"{path}: extra column {name!r} has type {kind}; an extra column holds numbers")


def reads_as(actual: pa.DataType, declared: pa.DataType) -> bool:
    """Whether a part's column type reads as the declared one. A list whose items may not be null
    is one: Spark writes multi-hot lists so (`element: int64 not null`), and they were refused."""
    if pa.types.is_list(actual) and pa.types.is_list(declared):
        return actual.value_type.equals(declared.value_type)
    return actual.equals(declared)


def check_no_nulls(path: str | StoragePath, table: pa.Table, names: list[str], first_row: int) -> None:
    """DataError naming the first null value, or the first null id inside a multi-hot row's list
    (its list is not null, so the ids came out as NaN floats: an IndexError in whoever indexed)."""
    for name in names:
        chunks = table[name]
        nested = pa.types.is_list(chunks.type) and any(c.flatten().null_count for c in chunks.chunks)
        if not chunks.null_count and not nested:
            continue  # every row group read in training passes here: no copy of the column
        column = chunks.combine_chunks()
        if column.null_count:
            row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: column {name!r}, row {first_row + row}: null value")
        if nested:
            offsets = column.offsets.to_numpy()
            i = int(np.flatnonzero(pc.is_null(column.flatten()).to_numpy(zero_copy_only=False))[0])
            row = int(np.searchsorted(offsets - offsets[0], i, side="right")) - 1
            raise DataError(f"{path}: column {name!r}, row {first_row + row}: a null id in its list")


def check_ids(path: str | StoragePath, column: str, ids: np.ndarray, cardinality: int, *,
              offsets: np.ndarray | None = None, first_row: int = 0) -> None:
    """Raises DataError naming file, column, row and value of the first id outside [0, cardinality)."""
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < cardinality):
        return
    i = int(np.flatnonzero((ids < 0) | (ids >= cardinality))[0])
    row = i if offsets is None else int(np.searchsorted(offsets, i, side="right")) - 1
    raise DataError(f"{path}: column {column!r}, row {first_row + row}: id {ids[i]} outside [0, {cardinality})")
