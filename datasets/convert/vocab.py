"""Raw categorical values -> contiguous ids ranked by train-split frequency.

Id 0 (schema.OOV_ID) is the shared "unknown" id: values seen fewer than `min_count` times in the train split,
missing values and values that never occur in the train split all map to it. Known values get
ids 1..n by descending train count; ties keep the order of first appearance, so ids are
deterministic for a given input file. A converter keeps each vocabulary in the dataset
(datasets/vocabulary.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embshard.datasets.vocabulary import Vocabulary

# Merging per-chunk counts every few chunks bounds memory by the number of distinct values.
_MERGE_EVERY = 16


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
