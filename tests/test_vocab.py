"""Raw categorical values to ids: the same ids whichever lookup a chunk takes (Arrow's index_in
for a vocabulary small beside the chunk, a table built once for a large one)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embshard.datasets.convert.vocab import Vocabulary, VocabularyBuilder
from embshard.errors import DataError


@pytest.mark.parametrize("values, chunk, want", [
    (["a", "b", "c"], [None, "zz", "c", "a", "c"], [0, 0, 3, 1, 3]),
    ([7, 3, 2**60], [2**60, None, 3, 9, 7], [3, 0, 2, 0, 1]),  # past float64's integers: exact
])
def test_both_lookups_give_the_same_ids(values, chunk, want) -> None:
    vocab = Vocabulary(pa.array(values), np.ones(len(values), dtype=np.int64))
    small = pa.array(chunk)  # 5 values: a vocabulary of 3 is hashed at each call
    assert vocab.encode(small).tolist() == want
    one_value = pa.chunked_array([small.slice(i, 1) for i in range(len(small))])
    assert [vocab.encode(one_value.chunk(i)).tolist()[0] for i in range(len(small))] == want  # the table, built once
    assert vocab.encode(one_value).tolist() == want


def test_a_large_vocabulary_encodes_as_arrow_does() -> None:
    rng = np.random.default_rng(0)
    builder = VocabularyBuilder()
    builder.add(pa.array(np.char.mod("%x", rng.integers(0, 50_000, 200_000))))
    vocab = builder.build(min_count=2)
    chunk = pa.array(np.char.mod("%x", rng.integers(0, 60_000, 1_000)))  # vocabulary > 5 x the chunk
    expected = pc.fill_null(pc.index_in(chunk, value_set=vocab.values), -1).to_numpy() + 1
    assert np.array_equal(vocab.encode(chunk), expected) and (expected == 0).any()


def test_weighted_values_count_as_their_repeats() -> None:
    # A user's or movie's feature is counted once, weighted by its train ratings: the same
    # vocabulary, tie-break (first appearance) included, as counting every rating.
    values = ["b", None, "a", "c", "a", "d", "b"]
    weights = np.array([2, 5, 1, 0, 1, 2, 1])
    weighted, repeated = VocabularyBuilder(), VocabularyBuilder()
    weighted.add(pa.array(values), weights)
    repeated.add(pa.array([v for v, w in zip(values, weights, strict=True) for _ in range(w)]))
    for min_count in (1, 3):
        w, r = weighted.build(min_count), repeated.build(min_count)
        assert w.values.to_pylist() == r.values.to_pylist() and w.counts.tolist() == r.counts.tolist()
    assert weighted.build().values.to_pylist() == ["b", "a", "d"]  # "c" has weight 0: never seen


# -- the vocabulary file: what a served id stands for --------------------------------------------


def test_a_vocabulary_file_reads_back_and_decodes_ids_to_values(tmp_path) -> None:
    vocab = Vocabulary(pa.array(["a", "b", "c"]), np.array([5, 3, 2]))
    vocab.write(tmp_path / "f.parquet")
    read = Vocabulary.read(tmp_path / "f.parquet", cardinality=4)
    assert read.values.to_pylist() == ["a", "b", "c"] and read.counts.tolist() == [5, 3, 2]
    assert read.decode(read.encode(pa.array(["c", None, "zz", "a"]))).to_pylist() == ["c", None, None, "a"]
    with pytest.raises(DataError, match=r"^id 4 outside \[0, 4\)$"):
        read.decode(np.array([1, 4]))


@pytest.mark.parametrize("table, cardinality, message", [
    ({"value": ["a", "b"], "count": [2, 1]}, 4, r"2 values for 3 known ids \(dataset.json's cardinality less the OOV"),
    ({"value": ["a", "b", "a"], "count": [2, 1, 1]}, 4, r"a value missing or given twice"),
    ({"value": ["a", None, "c"], "count": [2, 1, 1]}, 4, r"a value missing or given twice"),
    ({"id": [1, 2, 3], "count": [2, 1, 1]}, 4, r"expected the columns 'value' \(raw values\) and 'count'"),
    ({"value": ["a", "b", "c"], "count": ["2", "1", "1"]}, 4, r"expected the columns"),
])
def test_a_vocabulary_file_that_names_no_single_value_per_id_is_one_line(tmp_path, table, cardinality,
                                                                          message) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        Vocabulary.read(path, cardinality)
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        Vocabulary.read(path, cardinality)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'gone.parquet'}: missing \(dataset.json records a vocabulary"):
        Vocabulary.read(tmp_path / "gone.parquet", cardinality)
