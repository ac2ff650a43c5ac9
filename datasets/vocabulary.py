"""A feature's vocabulary: its known raw values in id order (id i + 1 is values[i]; id 0, the
OOV id, stands for every unknown value), and its file in a dataset or an export folder,
`vocab/<feature>.parquet` (`value`, `count`), which lets a served model take raw values and
name its ids by them. The converters build vocabularies (convert/vocab.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embshard.datasets.schema import read_parquet_table
from embshard.datasets.storage import StoragePath
from embshard.errors import DataError

# Vocabulary values Arrow hashes in the time pandas' prebuilt table looks one value up, about
# (bench/vocab_encode.py, 64k-value chunks of Criteo-like strings).
_HASH_PER_LOOKUP = 5
VALUE, COUNT = "value", "count"  # a vocabulary file's columns
# Its Parquet key-value metadata: which writing of a dataset (dataset.json's id), which feature.
# A part file carries the first, and PART_KEY: the split and file name it was written as.
DATASET_KEY, FEATURE_KEY, PART_KEY = b"embshard.dataset_id", b"embshard.feature", b"embshard.part"


def part_stamp(split: str, name: str) -> str:
    """A part file's PART_KEY: the split and file name it was written as."""
    return f"{split}/{name}"


@dataclass(frozen=True)
class Vocabulary:
    values: pa.Array  # known values, ids 1..len(values) in this order
    counts: np.ndarray  # train count of each known value

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1  # + the unknown id

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        # Each distinct value of the chunk looked up once. Arrow's index_in hashes the whole
        # vocabulary at every call: alone it made encoding cost (chunks x vocabulary), 1.5 s a
        # chunk at 4M values. A table built once (pandas) answers in time of the chunk alone but
        # costs several times more per value than hashing one (bench/vocab_encode.py).
        if len(self.values) <= _HASH_PER_LOOKUP * len(values):
            return pc.fill_null(pc.index_in(values, value_set=self.values), -1).to_numpy().astype(np.int64) + 1
        encoded = pc.dictionary_encode(values)
        known = self._lookup.get_indexer(encoded.dictionary.to_numpy(zero_copy_only=False))
        unknown = len(known)  # where a null value's index points: -1 after the append
        ids = np.append(known, -1)[pc.fill_null(encoded.indices, unknown).to_numpy()]
        return ids.astype(np.int64) + 1

    def decode(self, ids: np.ndarray) -> pa.Array:
        """The raw value of each id; null for the OOV id, which stands for every unknown value."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((ids < 0) | (ids >= self.cardinality))
        if bad.size:
            raise DataError(f"id {ids[bad[0]]} outside [0, {self.cardinality})")
        unknown = ids == 0
        return self.values.take(pa.array(np.where(unknown, 0, ids - 1), mask=unknown))

    def write(self, path: Path, dataset_id: str, feature: str) -> None:
        """Written with the dataset and feature it belongs to, so that a file copied in from
        another dataset or feature is told apart even when it holds as many values."""
        table = pa.table({VALUE: self.values, COUNT: pa.array(self.counts, pa.int64())})
        pq.write_table(table.replace_schema_metadata({DATASET_KEY: dataset_id, FEATURE_KEY: feature}), path)

    @staticmethod
    def read(path: StoragePath, cardinality: int, dataset_id: str, feature: str, *,
             check_values: bool = True) -> "Vocabulary":
        """`feature`'s vocabulary of the dataset `dataset_id` (with `cardinality` ids); DataError
        unless the file is that one (check_provenance) and, with check_values, holds each value once
        (an id must name one value, and a value one id; it reads every value)."""
        table = read_parquet_table(path, "dataset.json records a vocabulary there")
        check_provenance(path, table.schema, table.num_rows, cardinality, dataset_id, feature)
        values = table[VALUE].combine_chunks()
        if check_values and (values.null_count or pc.count_distinct(values).as_py() != len(values)):
            raise DataError(f"{path}: a value missing or given twice, so some id names no single value")
        return Vocabulary(values, table[COUNT].to_numpy())

    @cached_property
    def _lookup(self) -> pd.Index:
        return pd.Index(self.values.to_numpy(zero_copy_only=False))


def check_provenance(path: StoragePath, schema: pa.Schema, rows: int, cardinality: int, dataset_id: str,
                     feature: str) -> None:
    """DataError unless a vocabulary file (its schema and row count: a footer tells both) is that
    of `feature` in the dataset `dataset_id`: its columns, one value per known id, written with
    that dataset and feature (a file without that record, made by hand, is taken)."""
    if schema.names != [VALUE, COUNT] or not pa.types.is_integer(schema.field(COUNT).type) \
            or pa.types.is_nested(schema.field(VALUE).type):
        raise DataError(f"{path}: expected the columns {VALUE!r} (raw values) and {COUNT!r} (integers), got "
                        + ", ".join(f"{f.name}: {f.type}" for f in schema))
    meta = schema.metadata or {}
    for key, want, what in [(DATASET_KEY, dataset_id, "dataset id"), (FEATURE_KEY, feature, "feature")]:
        written = meta.get(key, b"").decode("utf-8", "replace")
        if written and want and written != want:
            raise DataError(f"{path}: written for {what} {written[:32]!r}, not {want[:32]!r} (copied in from "
                            "another dataset or feature?); convert the dataset again")
    if rows != cardinality - 1:
        raise DataError(f"{path}: {rows:,} values for {cardinality - 1:,} known ids (dataset.json's cardinality "
                        "less the OOV id); written by another conversion?")


def raw_values(values: object, value_type: pa.DataType) -> pa.Array:
    """`values` (a list, tuple, 1-D numpy or Arrow array; None for a missing value) as an Arrow array of
    a vocabulary's `value_type`. DataError for what a conversion would take silently: a float or a
    bool for integer values (300.5 was read as 300), a number for strings, a bare string (split
    into its characters)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if not values.type.equals(value_type):
            raise DataError(f"the values are {value_type}; got an Arrow array of {values.type}")
        return values
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise DataError(f"expected a list of values, one a row; got {type(values).__name__} {values!r:.40}")
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise DataError(f"expected one value a row (a 1-D array); got an array of shape {values.shape}")
        if values.dtype.kind == "O":
            values = values.tolist()
        elif not (values.dtype.kind in "iu" and pa.types.is_integer(value_type)
                  or values.dtype.kind == "U" and pa.types.is_string(value_type)):
            raise DataError(f"the values are {value_type}; got an array of {values.dtype}")
    if isinstance(values, (list, tuple)):
        if pa.types.is_integer(value_type):
            wrong = next((v for v in values if v is not None and (isinstance(v, (bool, np.bool_))
                                                                  or not isinstance(v, (int, np.integer)))), None)
        elif pa.types.is_string(value_type):
            wrong = next((v for v in values if v is not None and not isinstance(v, str)), None)
        else:
            wrong = None
        if wrong is not None:
            raise DataError(f"the values are {value_type}; got {wrong!r:.40} ({type(wrong).__name__})")
    try:
        return pa.array(values, type=value_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as e:
        raise DataError(f"the values are {value_type} ({str(e).splitlines()[0]})") from None
