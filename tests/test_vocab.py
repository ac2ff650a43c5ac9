"""Raw categorical values to ids: the same ids whichever lookup a chunk takes (Arrow's index_in
for a vocabulary small beside the chunk, a table built once for a large one)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embshard.datasets.convert.vocab import VocabularyBuilder
from embshard.datasets.vocabulary import Vocabulary, raw_values
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
    vocab.write(tmp_path / "f.parquet", "d" * 32, "f")
    read = Vocabulary.read(tmp_path / "f.parquet", 4, "d" * 32, "f")
    assert read.values.to_pylist() == ["a", "b", "c"] and read.counts.tolist() == [5, 3, 2]
    assert read.decode(read.encode(pa.array(["c", None, "zz", "a"]))).to_pylist() == ["c", None, None, "a"]
    with pytest.raises(DataError, match=r"^id 4 outside \[0, 4\)$"):
        read.decode(np.array([1, 4]))
    # Another writing of the dataset, or another feature's file, with as many values: every id would
    # name another value.
    with pytest.raises(DataError, match=rf"^{tmp_path / 'f.parquet'}: written for dataset id 'dddd.*', not 'eeee"):
        Vocabulary.read(tmp_path / "f.parquet", 4, "e" * 32, "f")
    with pytest.raises(DataError, match=r"f\.parquet: written for feature 'f', not 'g' \(copied in from another"):
        Vocabulary.read(tmp_path / "f.parquet", 4, "d" * 32, "g")


@pytest.mark.parametrize("table, message", [
    ({"value": ["a", "b"], "count": [2, 1]}, r"2 values for 3 known ids \(dataset.json's cardinality less the OOV"),
    ({"value": ["a", "b", "a"], "count": [2, 1, 1]}, r"a value missing or given twice"),
    ({"value": ["a", None, "c"], "count": [2, 1, 1]}, r"a value missing or given twice"),
    ({"id": [1, 2, 3], "count": [2, 1, 1]}, r"expected the columns 'value' \(raw values\) and 'count' \(integers\), "
                                            r"got id: int64, count: int64$"),
    ({"value": ["a", "b", "c"], "count": ["2", "1", "1"]}, r"expected the columns"),
])
def test_a_vocabulary_file_that_names_no_single_value_per_id_is_one_line(tmp_path, table, message) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table(table), path)  # made by hand: no dataset or feature recorded, so taken
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        Vocabulary.read(path, 4, "d" * 32, "f")
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        Vocabulary.read(path, 4, "d" * 32, "f")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'gone.parquet'}: missing \(dataset.json records a vocabulary"):
        Vocabulary.read(tmp_path / "gone.parquet", 4, "d" * 32, "f")


@pytest.mark.parametrize("values, value_type, message", [
    ([300.5], pa.int64(), r"the values are int64; got 300.5 \(float\)"),  # was read as 300
    ([300.0], pa.int64(), r"the values are int64; got 300.0 \(float\)"),
    ([np.bool_(True)], pa.int64(), r"the values are int64; got np.True_ \(bool\)"),  # was read as 1
    ([True], pa.int64(), r"the values are int64; got True \(bool\)"),
    (["1"], pa.int64(), r"the values are int64; got '1' \(str\)"),
    ([2**70], pa.int64(), r"the values are int64 \(.*"),
    (np.array([1.5]), pa.int64(), r"the values are int64; got an array of float64"),
    (np.array([[1, 2]]), pa.int64(), r"expected one value a row \(a 1-D array\); got an array of shape \(1, 2\)"),
    ("10011", pa.string(), r"expected a list of values, one a row; got str '10011'"),  # was 5 characters
    (42, pa.int64(), r"expected a list of values, one a row; got int 42"),
    ([1995], pa.string(), r"the values are string; got 1995 \(int\)"),
    ({"a": 1}, pa.string(), r"expected a list of values, one a row; got dict"),
])
def test_raw_values_of_another_type_are_refused_not_converted(values, value_type, message) -> None:
    with pytest.raises(DataError, match=rf"^{message}"):
        raw_values(values, value_type)


def test_raw_values_of_the_vocabularys_type_pass() -> None:
    assert raw_values([1, None, np.int64(7)], pa.int64()).to_pylist() == [1, None, 7]
    assert raw_values(np.array([3, 4], dtype=np.int32), pa.int64()).to_pylist() == [3, 4]
    assert raw_values(("a", None), pa.string()).to_pylist() == ["a", None]
    assert raw_values(np.array(["a", "b"]), pa.string()).to_pylist() == ["a", "b"]
