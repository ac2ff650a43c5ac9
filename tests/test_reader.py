"""ParquetBatchReader: round trip, rank partitioning, determinism, resume, id maps, bad input."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import ConfigError, DataError

SPEC = DatasetSpec(
    name="tiny",
    dense=["d0", "d1"],
    sparse=[SparseFeature("a", 10), SparseFeature("m", 5, multi_hot=True)],
    extra=["rid"],
)
FILE_ROWS = (300, 207)  # two part files; 50-row groups, so the last group of each file is short
GROUP_ROWS = 50


def _table(first: int, n: int, rng: np.random.Generator) -> pa.Table:
    lengths = rng.integers(0, 4, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        "label": pa.array(rng.integers(0, 2, size=n).astype(np.float32)),
        "d0": pa.array(rng.standard_normal(n).astype(np.float32)),
        "d1": pa.array(rng.standard_normal(n).astype(np.float32)),
        "a": pa.array(rng.integers(0, 10, size=n)),
        "m": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 5, size=offsets[-1]))),
        "rid": pa.array(np.arange(first, first + n)),
    })


def write_dataset(root: Path, tables: list[pa.Table] | None = None, spec: DatasetSpec = SPEC) -> Path:
    rng = np.random.default_rng(1)
    if tables is None:
        starts = np.cumsum((0,) + FILE_ROWS[:-1])
        tables = [_table(int(s), n, rng) for s, n in zip(starts, FILE_ROWS, strict=True)]
    train = root / "train"
    train.mkdir(parents=True)
    for i, t in enumerate(tables):
        pq.write_table(t, train / f"part-{i:05d}.parquet", row_group_size=GROUP_ROWS)
    spec.save(root)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds")


def _rids(reader: ParquetBatchReader) -> list[np.ndarray]:
    return [b.extra["rid"].numpy() for b in reader]


def test_round_trip_matches_parquet(dataset: Path) -> None:
    expected = pq.read_table(dataset / "train")
    reader = ParquetBatchReader(dataset, "train", 64, shuffle=False, drop_last=False)
    batches = list(reader)
    assert len(batches) == len(reader) == int(np.ceil(sum(FILE_ROWS) / 64))
    assert [b.labels.shape[0] for b in batches[:-1]] == [64] * (len(batches) - 1)
    labels = torch.cat([b.labels for b in batches]).numpy()
    dense = torch.cat([b.dense for b in batches]).numpy()
    np.testing.assert_array_equal(labels, expected["label"].to_numpy())
    np.testing.assert_array_equal(dense[:, 1], expected["d1"].to_numpy())
    assert batches[0].dense.dtype == torch.float32 and batches[0].labels.dtype == torch.float32
    kjt = batches[0].sparse
    assert kjt.keys() == ["a", "m"]
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
    a = torch.cat([b.sparse["a"].values() for b in batches]).numpy()
    np.testing.assert_array_equal(a, expected["a"].to_numpy())
    m_lengths = torch.cat([b.sparse["m"].lengths() for b in batches]).numpy()
    m_values = torch.cat([b.sparse["m"].values() for b in batches]).numpy()
    np.testing.assert_array_equal(m_lengths, pc.list_value_length(expected["m"]).to_numpy())
    np.testing.assert_array_equal(m_values, pc.list_flatten(expected["m"]).to_numpy())
    moved = batches[0].to("cpu")
    assert torch.equal(moved.labels, batches[0].labels) and moved.extra["rid"].shape == (64,)


def test_ranks_partition_rows_with_equal_batch_counts(dataset: Path) -> None:
    readers = [ParquetBatchReader(dataset, "train", 32, rank=r, world_size=2, seed=3) for r in range(2)]
    for epoch in range(3):
        seen = []
        for reader in readers:
            reader.set_epoch(epoch)
            rids = _rids(reader)
            assert len(rids) == len(readers[0])
            seen.append(np.concatenate(rids))
        assert len(set(seen[0]) & set(seen[1])) == 0
        assert set(np.concatenate(seen)) <= set(range(sum(FILE_ROWS)))
    # 507 rows split into contiguous halves of 253 and 254 rows: 7 full batches each.
    assert len(readers[0]) == len(readers[1]) == 253 // 32


def test_fewer_row_groups_than_ranks_still_feeds_every_rank(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "one", tables=[_table(0, 40, np.random.default_rng(2))])
    readers = [ParquetBatchReader(root, "train", 8, rank=r, world_size=3, seed=0, drop_last=False)
               for r in range(3)]
    rids = [np.concatenate(_rids(r)) for r in readers]
    assert [len(x) for x in rids] == [13, 13, 14]  # one 40-row group cut into near-equal slices
    assert sorted(np.concatenate(rids).tolist()) == list(range(40))


@pytest.mark.parametrize("rows, batch", [(501, 50), (40, 8), (41, 8), (500, 50), (7, 2)])
def test_an_evaluation_reads_every_row_once_on_two_ranks_in_as_many_batches(tmp_path: Path, rows: int,
                                                                             batch: int) -> None:
    # 501 rows at 50 a batch: rank 0's 250 rows are 5 batches, rank 1's 251 are 6, and both
    # yielded 5: the last row was never evaluated, and the metrics moved with the worker count.
    root = write_dataset(tmp_path / "d", tables=[_table(0, rows, np.random.default_rng(3))])
    readers = [ParquetBatchReader(root, "train", batch, rank=r, world_size=2, drop_last=False) for r in range(2)]
    batches = [_rids(r) for r in readers]
    assert len(batches[0]) == len(batches[1]) == len(readers[0]) == len(readers[1])
    assert all(len(b) for rank in batches for b in rank) and all(len(b) <= batch for rank in batches for b in rank)
    assert sorted(np.concatenate([np.concatenate(rank) for rank in batches]).tolist()) == list(range(rows))
    with pytest.raises(ConfigError, match="an evaluation batch of 1 row cannot cover a split shared by several"):
        ParquetBatchReader(root, "train", 1, rank=0, world_size=2, drop_last=False)


def test_a_split_of_fewer_rows_than_ranks_is_refused_when_its_reader_is_made(tmp_path: Path) -> None:
    # Its readers yielded no batch, and the run said "no rows to evaluate on" of a split with
    # rows, for the test split only after the whole training.
    root = write_dataset(tmp_path / "d", tables=[_table(0, 2, np.random.default_rng(3))])
    with pytest.raises(DataError, match=r"/train: 2 row\(s\), fewer than the 3 ranks that each evaluate a share"):
        ParquetBatchReader(root, "train", 4, rank=0, world_size=3, drop_last=False)
    assert len(ParquetBatchReader(root, "train", 4, rank=1, world_size=2, drop_last=False)) == 1


def test_order_is_deterministic_per_seed_and_epoch(dataset: Path) -> None:
    def order(seed: int, epoch: int) -> np.ndarray:
        reader = ParquetBatchReader(dataset, "train", 50, seed=seed)
        reader.set_epoch(epoch)
        return np.concatenate(_rids(reader))

    np.testing.assert_array_equal(order(7, 0), order(7, 0))
    assert not np.array_equal(order(7, 0), order(7, 1))
    assert not np.array_equal(order(7, 0), order(8, 0))
    assert not np.array_equal(order(7, 0), np.sort(order(7, 0)))  # rows inside groups are shuffled


def test_state_dict_resume_continues_exactly(dataset: Path) -> None:
    full = ParquetBatchReader(dataset, "train", 48, seed=5)
    full.set_epoch(2)
    reference = _rids(full)

    first = ParquetBatchReader(dataset, "train", 48, seed=5)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    it.close()
    assert state == {"epoch": 2, "batches": 3}

    resumed = ParquetBatchReader(dataset, "train", 48, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer loop calls this again; it must keep the resume point
    rest = _rids(resumed)
    assert len(rest) == len(reference) - 3
    for got, want in zip(rest, reference[3:], strict=True):
        np.testing.assert_array_equal(got, want)
    assert resumed.state_dict() == {"epoch": 2, "batches": len(reference)}


def test_early_stop_ends_the_producer_thread(dataset: Path) -> None:
    reader = ParquetBatchReader(dataset, "train", 8, prefetch=1)
    for _ in reader:
        break
    assert not [t for t in threading.enumerate() if t.name.startswith("embshard-reader")]


def test_wait_seconds_measures_a_slow_producer(dataset: Path, monkeypatch) -> None:
    delay = 0.2
    load = ParquetBatchReader._load

    def slow_load(self, *args, **kwargs):
        time.sleep(delay)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ParquetBatchReader, "_load", slow_load)
    reader = ParquetBatchReader(dataset, "train", 8, prefetch=1)
    for _ in reader:  # the first batch cannot exist before its row group is loaded
        break
    # All but the first moments: the producer starts before the consumer's clock does, and on a
    # loaded machine slept 2 ms of the delay first (0.198 s measured).
    assert reader.wait_seconds >= 0.9 * delay


def test_id_maps_are_applied(dataset: Path) -> None:
    maps = {"a": np.arange(10)[::-1].copy(), "m": np.array([4, 0, 1, 2, 3])}
    plain = list(ParquetBatchReader(dataset, "train", 64, shuffle=False))
    mapped = list(ParquetBatchReader(dataset, "train", 64, shuffle=False, id_maps=maps))
    for p, m in zip(plain, mapped, strict=True):
        for key in ("a", "m"):
            np.testing.assert_array_equal(m.sparse[key].values().numpy(), maps[key][p.sparse[key].values().numpy()])
            assert torch.equal(m.sparse[key].lengths(), p.sparse[key].lengths())


def _corrupt(tmp_path: Path, column: str, row: int, value: object) -> Path:
    table = _table(0, 120, np.random.default_rng(2))
    values = table[column].to_pylist()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                             pa.array(values, table.schema.field(column).type))
    return write_dataset(tmp_path / "bad", [table])


@pytest.mark.parametrize("column,row,value,needle", [
    ("a", 77, 10, "id 10"),
    ("a", 3, -1, "id -1"),
    ("m", 64, [1, 7], "id 7"),
    ("d1", 101, float("nan"), "nan"),
    ("label", 5, float("inf"), "inf"),
    ("a", 9, None, "null"),
    ("m", 64, [1, None], "a null id in its list"),  # was an IndexError from NaN ids, in training too
    ("label", 7, 7.0, "label 7 is no click, 0 or 1"),  # trained as a BCE target without a word
    ("label", 7, 0.3, "label 0.3 is no click, 0 or 1"),  # trained, then the first evaluation failed
])
def test_bad_values_name_file_column_and_row(tmp_path: Path, column: str, row: int, value: object,
                                             needle: str) -> None:
    root = _corrupt(tmp_path, column, row, value)
    with pytest.raises(DataError) as err:
        list(ParquetBatchReader(root, "train", 16, shuffle=True))
    message = str(err.value)
    assert "part-00000.parquet" in message and repr(column) in message
    assert f"row {row}" in message and needle in message


@pytest.mark.parametrize("column,row,value,needle", [("a", 9, None, "null value"),
                                                     ("m", 64, [1, None], "a null id in its list")])
def test_the_profile_checks_values_as_the_reader_does(tmp_path: Path, column: str, row: int, value: object,
                                                      needle: str) -> None:
    # Each was a traceback in `data profile` (an IndexError in check_ids).
    from embshard.datasets.profile import write_profile

    root = _corrupt(tmp_path, column, row, value)
    with pytest.raises(DataError, match=rf"part-00000\.parquet: column '{column}', row {row}: {needle}"):
        write_profile(root)
    table = _table(0, 60, np.random.default_rng(3))
    text = write_dataset(tmp_path / "text", [table.set_column(3, "a", pc.cast(table["a"], pa.string()))])
    with pytest.raises(DataError, match=r"part-00000\.parquet: column 'a' has type string"):
        write_profile(text)


def test_schema_mismatch_names_file_and_column(tmp_path: Path) -> None:
    table = _table(0, 60, np.random.default_rng(3))
    wrong = write_dataset(tmp_path / "wrong", [table.set_column(3, "a", pc.cast(table["a"], pa.int32()))])
    with pytest.raises(DataError, match=r"part-00000\.parquet: column 'a' has type int32"):
        ParquetBatchReader(wrong, "train", 16)
    missing = write_dataset(tmp_path / "missing", [table.drop_columns(["d0"])])
    with pytest.raises(DataError, match=r"part-00000\.parquet: column 'd0' missing"):
        ParquetBatchReader(missing, "train", 16)


def test_a_multi_hot_list_whose_items_may_not_be_null_is_read(tmp_path: Path) -> None:
    # Spark writes list columns so (`list<element: int64 not null>`); they were refused as a type mismatch.
    table = _table(0, 60, np.random.default_rng(3))
    strict = pa.list_(pa.field("element", pa.int64(), nullable=False))
    root = write_dataset(tmp_path / "spark", [table.set_column(4, "m", table["m"].cast(strict))])
    assert sum(b.labels.numel() for b in ParquetBatchReader(root, "train", 20)) == 60
    # Beside a part of embshard's own, read across the two in one batch: a merge of the two
    # schemas was refused mid-epoch.
    mixed = write_dataset(tmp_path / "mixed", [table.set_column(4, "m", table["m"].cast(strict)),
                                               _table(60, 60, np.random.default_rng(4))])
    assert sum(b.labels.numel() for b in ParquetBatchReader(mixed, "train", 50, shuffle=False)) == 100


def test_missing_dataset_or_split_is_a_data_error(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ParquetBatchReader(tmp_path / "nope", "train", 16)
    with pytest.raises(DataError, match="valid"):
        ParquetBatchReader(dataset, "valid", 16)


def test_dataset_without_dense_features(tmp_path: Path) -> None:
    spec = DatasetSpec(name="nodense", dense=[], sparse=[SparseFeature("a", 10)])
    table = _table(0, 100, np.random.default_rng(4)).select(["label", "a"])
    root = write_dataset(tmp_path / "nd", [table], spec)
    batch = next(iter(ParquetBatchReader(root, "train", 25)))
    assert batch.dense.shape == (25, 0) and batch.extra == {}


def test_a_damaged_page_behind_an_intact_footer_names_the_file_and_rows(dataset: Path) -> None:
    # Once a "crash" of an OSError naming no file (Couldn't deserialize thrift).
    part = dataset / "train" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[200:len(data) // 2] = np.random.default_rng(0).integers(0, 256, len(data) // 2 - 200, dtype=np.uint8).tobytes()
    part.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"part-00000\.parquet: row group 0 \(file rows 0 to 49\) cannot be read "
                                        r"\(.*\); the file is damaged"):
        list(ParquetBatchReader(dataset, "train", 16, shuffle=False))


def test_a_non_finite_extra_column_is_named(tmp_path: Path) -> None:
    # NaN in MovieLens' item_frequency (two-tower's log-q correction) read without a word.
    spec = DatasetSpec(name="x", dense=[], sparse=[SparseFeature("a", 10)], extra=["item_frequency"])
    table = _table(0, 60, np.random.default_rng(5)).select(["label", "a"])
    freq = np.full(60, 0.1, np.float32)
    freq[12] = np.nan
    root = write_dataset(tmp_path / "x", [table.append_column("item_frequency", pa.array(freq))], spec)
    with pytest.raises(DataError, match=r"column 'item_frequency', row 12: non-finite value nan"):
        list(ParquetBatchReader(root, "train", 16))


@pytest.mark.parametrize("column,value,target", [("d1", 3e38, "click"), ("label", -1e20, "rating")])
def test_a_value_whose_square_overflows_float32_is_named(tmp_path: Path, column: str, value: float,
                                                         target: str) -> None:
    # One train row of 3e38 dense values trained to exit 0 with AUC 0.50 (its loss 5.9e32 is
    # finite); in valid, or as a rating, it was "evaluate() returned mse = inf", blamed on the model.
    table = _table(0, 60, np.random.default_rng(5))
    values = table[column].to_numpy().copy()
    values[23] = value
    spec = dataclasses.replace(SPEC, target=target)
    root = write_dataset(tmp_path / "x", [table.set_column(table.schema.get_field_index(column), column,
                                                           pa.array(values))], spec)
    shown = re.escape(f"{value:g}")
    with pytest.raises(DataError, match=rf"part-00000\.parquet: column '{column}', row 23: value {shown} is beyond "
                                        r"±1\.8e\+19, where its square overflows float32 \(.*\); rescale the column"):
        list(ParquetBatchReader(root, "train", 20))
    values[23] = 1.8e19  # as large as still squares
    fine = write_dataset(tmp_path / "y", [table.set_column(table.schema.get_field_index(column), column,
                                                           pa.array(values))], spec)
    assert sum(b.labels.numel() for b in ParquetBatchReader(fine, "train", 20)) == 60


def test_a_huge_click_label_is_said_to_be_no_click(tmp_path: Path) -> None:
    # The square's bound is for what trains by a square: a click label of 1e20 is no click, as one of 7 is.
    table = _table(0, 60, np.random.default_rng(5))
    labels = table["label"].to_numpy().copy()
    labels[9] = 1e20
    root = write_dataset(tmp_path / "x", [table.set_column(0, "label", pa.array(labels))])
    with pytest.raises(DataError, match=r"column 'label', row 9: label 1e\+20 is no click, 0 or 1"):
        list(ParquetBatchReader(root, "train", 20))


def test_an_extra_column_of_text_or_with_a_null_is_named(tmp_path: Path) -> None:
    # Text was a TypeError from torch mid-epoch; a null in an integer extra made its batch float64
    # with a NaN, without a word.
    spec = DatasetSpec(name="x", dense=[], sparse=[SparseFeature("a", 10)], extra=["cnt"])
    table = _table(0, 60, np.random.default_rng(5)).select(["label", "a"])
    texts = write_dataset(tmp_path / "t", [table.append_column("cnt", pa.array(["x"] * 60))], spec)
    with pytest.raises(DataError, match=r"extra column 'cnt' has type string; an extra column holds numbers"):
        list(ParquetBatchReader(texts, "train", 16))
    counts: list[int | None] = list(range(60))
    counts[7] = None
    nulls = write_dataset(tmp_path / "n", [table.append_column("cnt", pa.array(counts, pa.int64()))], spec)
    with pytest.raises(DataError, match=r"column 'cnt', row 7: null value"):
        list(ParquetBatchReader(nulls, "train", 16, shuffle=False))


def test_a_column_written_twice_is_named_as_such(tmp_path: Path) -> None:
    # It was said to be missing.
    table = _table(0, 60, np.random.default_rng(5))
    root = write_dataset(tmp_path / "d", [table.append_column("a", table["a"])])
    with pytest.raises(DataError, match=r"column 'a' appears 2 times; a part file holds each column once"):
        ParquetBatchReader(root, "train", 16)
