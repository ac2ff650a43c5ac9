"""Raw categorical values -> contiguous ids ranked by train-split frequency.

Id 0 (schema.OOV_ID) is the shared "unknown" id: values seen fewer than `min_count` times in the train split,
missing values and values that never occur in the train split all map to it. Known values get
ids 1..n by descending train count; ties keep the order of first appearance, so ids are
deterministic for a given input file.

A converter keeps each vocabulary in the dataset (`vocab/<feature>.parquet`: `value`, `count`,
row i for id i + 1), so a served model can take raw values and name its ids by them.
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

# Merging per-chunk counts every few chunks bounds memory by the number of distinct values.
_MERGE_EVERY = 16
# Vocabulary values Arrow hashes in the time pandas' prebuilt table looks one value up, about
# (bench/vocab_encode.py, 64k-value chunks of Criteo-like strings).
_HASH_PER_LOOKUP = 5
VALUE, COUNT = "value", "count"  # a vocabulary file's columns


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

    def write(self, path: Path) -> None:
        pq.write_table(pa.table({VALUE: self.values, COUNT: pa.array(self.counts, pa.int64())}), path)

    @staticmethod
    def read(path: StoragePath, cardinality: int) -> "Vocabulary":
        """The vocabulary of a feature with `cardinality` ids; DataError unless the file holds one
        value per known id, each once (an id must name one value, and a value one id)."""
        table = read_parquet_table(path, "dataset.json records a vocabulary there")
        if table.schema.names != [VALUE, COUNT] or not pa.types.is_integer(table.schema.field(COUNT).type) \
                or pa.types.is_nested(table.schema.field(VALUE).type):
            raise DataError(f"{path}: expected the columns {VALUE!r} (raw values) and {COUNT!r} (integers), got "
                            f"{table.schema}".replace("\n", ", "))
        values = table[VALUE].combine_chunks()
        if len(values) != cardinality - 1:
            raise DataError(f"{path}: {len(values):,} values for {cardinality - 1:,} known ids (dataset.json's "
                            "cardinality less the OOV id); written by another conversion?")
        if values.null_count or pc.count_distinct(values).as_py() != len(values):
            raise DataError(f"{path}: a value missing or given twice, so some id names no single value")
        return Vocabulary(values, table[COUNT].to_numpy())

    @cached_property
    def _lookup(self) -> pd.Index:
        return pd.Index(self.values.to_numpy(zero_copy_only=False))


class VocabularyBuilder:
    """Counts values of any Arrow type chunk by chunk; nulls (missing values) are not counted."""

    def __init__(self) -> None:
        self._parts: list[tuple[pa.Array, np.ndarray]] = []
        self._type: pa.DataType = pa.string()  # an empty vocabulary must still match the values' type

    def add(self, values: pa.Array | pa.ChunkedArray, weights: np.ndarray | None = None) -> None:
        """weights[i]: how many times values[i] counts (default: once). Values with weight 0 are not
        seen, as if absent: they take no place in the order of first appearance."""
        self._type = values.type
        if weights is None:
            counted = pc.value_counts(values.drop_null())
            self._parts.append((counted.field("values"), counted.field("counts").to_numpy()))
        else:
            if isinstance(values, pa.ChunkedArray):
                values = values.combine_chunks()
            seen = (weights > 0) & values.is_valid().to_numpy(zero_copy_only=False)
            encoded = pc.dictionary_encode(values.filter(pa.array(seen)))
            counts = np.bincount(encoded.indices.to_numpy(), weights=weights[seen],
                                 minlength=len(encoded.dictionary))
            self._parts.append((encoded.dictionary, counts.astype(np.int64)))
        if len(self._parts) >= _MERGE_EVERY:
            self._parts = [self._merged()]

    def build(self, min_count: int = 1) -> Vocabulary:
        values, counts = self._merged()
        order = np.argsort(-counts, kind="stable")
        order = order[counts[order] >= min_count]
        return Vocabulary(values.take(order), counts[order])

    def _merged(self) -> tuple[pa.Array, np.ndarray]:
        if not self._parts:
            return pa.array([], self._type), np.zeros(0, dtype=np.int64)
        # Dictionary encoding numbers values in order of first appearance, which makes that
        # order the tie-break (Arrow's group_by does not promise any output order).
        encoded = pc.dictionary_encode(pa.concat_arrays([v for v, _ in self._parts]))
        counts = np.bincount(encoded.indices.to_numpy(), weights=np.concatenate([c for _, c in self._parts]),
                             minlength=len(encoded.dictionary))
        return encoded.dictionary, counts.astype(np.int64)
