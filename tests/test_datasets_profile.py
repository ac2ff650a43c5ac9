"""Id-frequency profiles: counts, pooling factors, persistence and the missing-profile error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embshard.datasets.profile import load_profile, write_profile
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.datasets.synth import synthesize
from embshard.datasets.writer import DatasetWriter, SplitPlan
from embshard.errors import DataError


def test_single_hot_counts_sum_to_train_rows(tmp_path: Path) -> None:
    spec = synthesize(tmp_path, rows=5_000, seed=2, max_cardinality=1_000)
    written = write_profile(tmp_path)
    loaded = load_profile(tmp_path)
    assert loaded.features == spec.sparse_names
    for f in spec.sparse:
        counts = loaded.counts(f.name)
        assert counts.dtype == np.int64 and counts.shape == (f.cardinality,)
        assert counts.sum() == spec.rows["train"] == 4_000
        np.testing.assert_array_equal(counts, written.counts(f.name))
        assert loaded.pooling_factor(f.name) == 1.0
        assert loaded.stats[f.name].distinct_ids == np.count_nonzero(counts)
    raw = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert raw["C1"]["rows"] == 4_000 and raw["C1"]["total_ids"] == 4_000


def test_counts_are_exact_whether_a_group_is_sorted_or_bincounted(tmp_path: Path) -> None:
    # Features far larger than a row group's ids are counted by sorting the group's ids.
    import pyarrow.parquet as pq

    spec = synthesize(tmp_path, rows=5_000, seed=3, max_cardinality=5_000_000)
    profile = write_profile(tmp_path)
    train = pq.read_table(tmp_path / "train")
    assert max(f.cardinality for f in spec.sparse) > 16 * train.num_rows  # the sorting path is taken
    for f in spec.sparse:
        want = np.bincount(train[f.name].to_numpy(), minlength=f.cardinality)
        np.testing.assert_array_equal(profile.counts(f.name), want)


def test_multi_hot_pooling_factor(tmp_path: Path) -> None:
    spec = DatasetSpec(name="mh", dense=[], sparse=[SparseFeature("tags", 6, multi_hot=True)])
    lists = [[1, 2], [], [5], [1, 1, 3], [0], [2, 4], [3], [1, 5, 5, 2], [4], [2]]
    writer = DatasetWriter(tmp_path, spec.arrow_schema())
    table = pa.table({"label": pa.array(np.zeros(10, np.float32)),
                      "tags": pa.array(lists, pa.list_(pa.int64()))})
    writer.write_ordered(table, np.arange(10), SplitPlan(10))
    writer.finish(spec, source="fixture")
    profile = write_profile(tmp_path)
    train = lists[:8]
    assert profile.pooling_factor("tags") == pytest.approx(sum(map(len, train)) / 8)
    expected = np.bincount([i for row in train for i in row], minlength=6)
    np.testing.assert_array_equal(load_profile(tmp_path).counts("tags"), expected)


def test_missing_profile_tells_the_user_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"embshard data profile"):
        load_profile(tmp_path)
    synthesize(tmp_path, rows=100, max_cardinality=10)
    profile = write_profile(tmp_path)
    with pytest.raises(DataError, match="no feature 'nope'"):
        profile.counts("nope")


def test_out_of_range_id_names_file_column_and_row(tmp_path: Path) -> None:
    spec = DatasetSpec(name="bad", dense=[], sparse=[SparseFeature("a", 3)])
    writer = DatasetWriter(tmp_path / "bad", spec.arrow_schema())
    table = pa.table({"label": pa.array(np.zeros(20, np.float32)), "a": pa.array([0, 1] * 6 + [7] + [2] * 7)})
    writer.write_ordered(table, np.arange(20), SplitPlan(20))
    # The profile is part of the dataset: a dataset it rejects is never published.
    with pytest.raises(DataError, match=r"part-00000\.parquet: column 'a', row 12: id 7 outside \[0, 3\)"):
        writer.finish(spec, source="fixture")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_profile_leaves_the_earlier_one_whole(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "ds"
    synthesize(data, rows=2_000, seed=1, max_cardinality=100)
    np.save(data / "profile" / "C1.npy", np.zeros(5, np.int64))  # an earlier profile, other than this one's
    before = {p.name: p.read_bytes() for p in (data / "profile").iterdir()}
    saved = []

    def save_then_stop(path, counts):
        if saved:
            raise KeyboardInterrupt  # Ctrl-C after the first count file of the new profile
        saved.append(path)
        np.save(path, counts)
    monkeypatch.setattr("embshard.datasets.profile.np.save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        write_profile(data)
    # Once, the new C1.npy went into the profile folder itself, beside the old profile.json.
    assert {p.name: p.read_bytes() for p in (data / "profile").iterdir()} == before
    assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "profile", "test", "train", "valid"]
    monkeypatch.undo()
    assert write_profile(data).counts("C1").sum() == 1_600


def test_a_file_where_the_profile_folder_goes_is_refused_and_kept(tmp_path: Path) -> None:
    # It was renamed aside for the swap, could not be removed, and stayed as `.profile.old-*`.
    data = tmp_path / "ds"
    synthesize(data, rows=2_000, seed=1, max_cardinality=100)
    for p in (data / "profile").iterdir():
        p.unlink()
    (data / "profile").rmdir()
    (data / "profile").write_text("someone's notes")
    with pytest.raises(DataError, match=r"profile: a file where a folder goes; refusing to replace it"):
        write_profile(data)
    assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "profile", "test", "train", "valid"]
    assert (data / "profile").read_text() == "someone's notes"


def test_a_damaged_profile_is_one_line_naming_its_file(tmp_path: Path) -> None:
    # Each was a traceback from the planner (a missing count file, a NaN or negative pooling
    # factor, a string for a number) or planned silently (a stale or foreign count file).
    synthesize(tmp_path / "d", rows=500, max_cardinality=50)
    profile_dir = tmp_path / "d" / "profile"
    stats = json.loads((profile_dir / "profile.json").read_text())
    good_counts = np.load(profile_dir / "C1.npy")

    def damaged(change_stats=None, counts=None):
        raw = json.loads(json.dumps(stats))
        if change_stats:
            change_stats(raw["C1"])
        (profile_dir / "profile.json").write_text(json.dumps(raw))
        if counts is None:
            np.save(profile_dir / "C1.npy", good_counts)
        elif isinstance(counts, str):  # "missing"
            (profile_dir / "C1.npy").unlink()
        else:
            np.save(profile_dir / "C1.npy", counts)
        return load_profile(tmp_path / "d")

    for change, message in ((lambda s: s.update(mean_ids_per_row=float("nan")), "mean_ids_per_row nan is no pooling"),
                            (lambda s: s.update(mean_ids_per_row=-3), "mean_ids_per_row -3 is no pooling"),
                            (lambda s: s.update(mean_ids_per_row="1.0"), "mean_ids_per_row '1.0' is no pooling"),
                            # An OverflowError traceback from TorchRec's planner.
                            (lambda s: s.update(mean_ids_per_row=1e308), r"mean_ids_per_row 1e\+308 is no pooling"),
                            (lambda s: s.update(rows=-1), "rows -1 is no count")):
        with pytest.raises(DataError, match="profile.json: malformed profile .*" + message):
            damaged(change)
    for counts, message in (("missing", "C1.npy: missing from the profile; rerun `embshard data profile`"),
                            (good_counts[:-5], "C1.npy: not the counts profile.json describes"),
                            (good_counts.astype(np.float64), "C1.npy: not the counts profile.json describes"),
                            (np.array(["x"], dtype=object), "C1.npy: not a count file")):
        with pytest.raises(DataError, match=message):
            damaged(counts=counts).counts("C1")
    assert damaged().counts("C1").tolist() == good_counts.tolist()


def test_json_files_with_a_key_twice_or_nested_past_reading_are_refused(tmp_path: Path) -> None:
    from embshard.datasets.storage import read_json

    twice = tmp_path / "twice.json"
    twice.write_text('{"C1": {"dim": 8}, "C1": {"dim": 4}}')  # the last one counted, silently
    with pytest.raises(DataError, match=r"twice\.json: key 'C1' given twice in one object"):
        read_json(twice, DataError)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: not a file embshard writes \(nested deeper"):
        read_json(deep, DataError)


def test_a_profile_of_other_train_rows_is_refused(tmp_path: Path) -> None:
    # A train split cut by hand, dataset.json edited to match, and the old profile was planned on.
    data = tmp_path / "d"
    synthesize(data, rows=2000, max_cardinality=50)
    spec = json.loads((data / "dataset.json").read_text())
    spec["rows"]["train"] -= 1
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=rf"profile.json: counted {spec['rows']['train'] + 1:,} train rows, "
                                        rf"dataset.json records {spec['rows']['train']:,}: a profile of other data"):
        load_profile(data)


def test_a_count_file_of_other_data_with_the_same_total_is_refused(tmp_path: Path) -> None:
    # A count file copied in from another dataset: its total matched, so it was planned on.
    synthesize(tmp_path / "d", rows=500, max_cardinality=50)
    path = tmp_path / "d" / "profile" / "C1.npy"
    good = np.load(path)
    np.save(path, good[::-1].copy())
    assert (good[::-1] != good).any()
    with pytest.raises(DataError, match=r"C1\.npy: not the counts profile\.json describes"):
        load_profile(tmp_path / "d").counts("C1")
    # A profile written before the digests is checked by its total alone, as it was.
    np.save(path, good)
    stats = json.loads((path.parent / "profile.json").read_text())
    for s in stats.values():
        del s["sha256"]
    (path.parent / "profile.json").write_text(json.dumps(stats))
    assert load_profile(tmp_path / "d").counts("C1").tolist() == good.tolist()


def test_a_cardinality_edited_after_the_profile_names_the_count_file_and_the_fix(tmp_path: Path) -> None:
    # Was "id counts for 'C1': expected 1470 integers, got int64 (1460,)" from deep in the planner.
    data = tmp_path / "d"
    synthesize(data, rows=500, max_cardinality=50)
    spec = json.loads((data / "dataset.json").read_text())
    cardinality = spec["sparse"][0]["cardinality"]
    spec["sparse"][0]["cardinality"] += 10
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=rf"profile/C1\.npy: counts {cardinality} ids of feature 'C1', dataset\.json "
                                        rf"gives it cardinality {cardinality + 10}; rerun `embshard data profile`"):
        load_profile(data).counts("C1")


def test_a_damaged_page_is_one_line_naming_the_part_and_its_rows(tmp_path: Path) -> None:
    # `data profile` printed a 32-line traceback ending in "Couldn't deserialize thrift", naming
    # no file; a run on the same data said it in one line.
    import pyarrow.parquet as pq

    synthesize(tmp_path, rows=3_000, seed=2, max_cardinality=200)
    part = tmp_path / "train" / "part-00000.parquet"
    group = pq.read_metadata(part).row_group(0)
    column = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "C5")
    data = bytearray(part.read_bytes())
    for k in range(column.data_page_offset + 20, column.data_page_offset + column.total_compressed_size - 5):
        data[k] ^= 0x5A
    part.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{part}: row group 0 \(file rows 0 to [\d,]+\) cannot be read \(.*\); the "
                                        r"file is damaged: write the dataset again$"):
        write_profile(tmp_path)


def test_a_dataset_without_sparse_features_is_one_line(tmp_path: Path) -> None:
    # Planned as "0 tables on 1 workers", it crashed in the worker (torch.cat of no tensors).
    synthesize(tmp_path, rows=1_000, seed=2, max_cardinality=50)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**spec, "sparse": []}))
    with pytest.raises(DataError, match=r"dataset\.json: no sparse features; embshard trains the embedding tables"):
        DatasetSpec.load(tmp_path)


def test_a_profile_folder_that_is_a_link_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    # Swapped out for a real folder, the link stayed beside the dataset as a staging folder that
    # a warning said to delete: `rm -rf` of it emptied the user's folder it points to.
    data = tmp_path / "d"
    synthesize(data, rows=1_000, seed=2, max_cardinality=50)
    (data / "profile").rename(tmp_path / "mine")
    (data / "profile").symlink_to(tmp_path / "mine")
    before = sorted(p.name for p in (tmp_path / "mine").iterdir())
    with pytest.raises(DataError, match=rf"^{data / 'profile'}: a symbolic link \({tmp_path / 'mine'}\); refusing "
                                        "to replace it"):
        write_profile(data)
    assert (data / "profile").is_symlink() and sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == []


def test_a_part_without_the_dataset_stamp_is_warned_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # pandas, DuckDB and Spark drop it: another dataset's part so rewritten passed as this one's.
    import pyarrow.parquet as pq

    from embshard.datasets.verify import verify_dataset

    synthesize(tmp_path, rows=1_000, seed=2, max_cardinality=50)
    part = tmp_path / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    verify_dataset(tmp_path)
    verify_dataset(tmp_path)
    assert capsys.readouterr().err.count(f"warning: {part}: carries no dataset stamp though dataset.json has an "
                                         "id (rewritten by another tool?)") == 1


def test_a_cardinality_no_machine_can_count_names_its_feature(tmp_path: Path) -> None:
    # A dataset.json whose C1 was edited to 2**50 ids: "out of memory (... 8.00 PiB ...)", naming no feature.
    from embshard.errors import EnvironmentProblem

    out = tmp_path / "d"
    synthesize(out, rows=200, max_cardinality=20)
    raw = json.loads((out / "dataset.json").read_text())
    raw["sparse"][1]["cardinality"] = 2**50
    (out / "dataset.json").write_text(json.dumps(raw))
    name = raw["sparse"][1]["name"]
    with pytest.raises(EnvironmentProblem, match=rf"^{out}: sparse feature '{name}': the counts of its "
                                                 r"1,125,899,906,842,624 ids need 8192\.0 TiB, more than this "
                                                 r"machine can give \(is dataset\.json's cardinality right\?\)$"):
        write_profile(out)
