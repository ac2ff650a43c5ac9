"""verify_dataset: a missing, extra or truncated part file is found from Parquet metadata alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from embshard.datasets import writer
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE, DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.datasets.verify import verify_dataset
from embshard.errors import DataError


@pytest.fixture
def multi_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """200 rows in parts of 30 rows: train has 6 part files (5 x 30 + 10)."""
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 10)
    monkeypatch.setattr(writer, "PART_ROWS", 30)
    out = tmp_path / "d"
    synthesize(out, rows=200, max_cardinality=20)
    return out


def test_records_rows_per_part(multi_part: Path) -> None:
    spec = DatasetSpec.load(multi_part)
    assert spec.parts == {"train": [30, 30, 30, 30, 30, 10], "valid": [20], "test": [20]}
    verify_dataset(multi_part)  # a complete dataset passes


def test_missing_part_is_named(multi_part: Path) -> None:
    (multi_part / "train" / "part-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"train/part-00002\.parquet: missing; dataset\.json records 6 part "
                                        r"files for split 'train'"):
        verify_dataset(multi_part)
    with pytest.raises(DataError, match=r"part-00002\.parquet: missing"):
        ParquetBatchReader(multi_part, "train", 8)
    ParquetBatchReader(multi_part, "valid", 8)  # other splits are still readable on their own


def test_truncated_part_is_named(multi_part: Path) -> None:
    part = multi_part / "valid" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: not a readable Parquet file"):
        verify_dataset(multi_part)
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: not a readable Parquet file"):
        ParquetBatchReader(multi_part, "valid", 8)


def test_stray_or_swapped_part_is_named(multi_part: Path) -> None:
    train = multi_part / "train"
    shutil.copy(train / "part-00000.parquet", train / "part-00006.parquet")
    with pytest.raises(DataError, match=r"train/part-00006\.parquet: not recorded in dataset\.json"):
        verify_dataset(multi_part)
    (train / "part-00006.parquet").unlink()
    shutil.copy(train / "part-00005.parquet", train / "part-00001.parquet")  # 10 rows where 30 belong
    with pytest.raises(DataError, match=r"train/part-00001\.parquet: 10 rows, dataset\.json records 30"):
        verify_dataset(multi_part)


def test_a_parquet_file_that_is_no_part_is_named(multi_part: Path) -> None:
    # Beside the parts, a user's `extra.parquet` was never read: its rows left out of training, unsaid.
    train = multi_part / "train"
    shutil.copy(train / "part-00000.parquet", train / "extra.parquet")
    with pytest.raises(DataError, match=r"train/extra\.parquet: a Parquet file whose name is no part file's "
                                        r"\(part-\*\.parquet\), so its rows would not be read"):
        verify_dataset(multi_part)
    (train / "extra.parquet").rename(train / ".extra.parquet")  # hidden: an editor's, a tool's
    verify_dataset(multi_part)


def test_a_part_copied_over_another_of_as_many_rows_is_named(multi_part: Path) -> None:
    # Both carry the dataset's stamp and as many rows: the copy's rows were read twice without a word.
    train, kept = multi_part / "train", multi_part.parent / "kept.parquet"
    shutil.copy(train / "part-00001.parquet", kept)
    shutil.copy(train / "part-00000.parquet", train / "part-00001.parquet")
    with pytest.raises(DataError, match=r"train/part-00001\.parquet: written as this dataset's "
                                        r"train/part-00000\.parquet \(copied or renamed here\?\), so its rows "
                                        r"are not this part's"):
        ParquetBatchReader(multi_part, "train", 8)
    shutil.copy(kept, train / "part-00001.parquet")
    shutil.copy(multi_part / "valid" / "part-00000.parquet", multi_part / "test" / "part-00000.parquet")
    with pytest.raises(DataError, match=r"test/part-00000\.parquet: written as this dataset's "
                                        r"valid/part-00000\.parquet"):
        verify_dataset(multi_part)


def test_a_folder_or_a_broken_link_where_a_part_belongs_is_named(multi_part: Path) -> None:
    # Both were said to be "missing", while `ls` showed the part there.
    part = multi_part / "train" / "part-00002.parquet"
    part.unlink()
    part.mkdir()
    with pytest.raises(DataError, match=r"part-00002\.parquet: a folder, not a part file; dataset\.json records 6"):
        verify_dataset(multi_part)
    part.rmdir()
    part.symlink_to(part.name)
    with pytest.raises(DataError, match=r"part-00002\.parquet: a symbolic link to nothing \(or a loop of links\)"):
        verify_dataset(multi_part)


def test_a_dataset_json_whose_id_was_taken_out_is_refused(multi_part: Path) -> None:
    # A blank id is a dataset.json of before ids, which checks nothing: its stamped parts passed as anyone's.
    raw = json.loads((multi_part / SPEC_FILE).read_text())
    (multi_part / SPEC_FILE).write_text(json.dumps({**raw, "id": ""}))
    with pytest.raises(DataError, match=rf"train/part-00000\.parquet: written for the dataset with id {raw['id'][:8]}, "
                                        r"and dataset\.json has no id \(taken out by hand\?\)"):
        verify_dataset(multi_part)


def test_older_spec_without_part_counts_checks_split_rows(multi_part: Path) -> None:
    raw = json.loads((multi_part / SPEC_FILE).read_text())
    del raw["parts"]
    (multi_part / SPEC_FILE).write_text(json.dumps(raw))
    assert DatasetSpec.load(multi_part).parts == {}
    verify_dataset(multi_part)
    (multi_part / "train" / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"train: 130 rows in 5 part files, dataset\.json records 160"):
        verify_dataset(multi_part)
    with pytest.raises(DataError, match=r"train: 130 rows in 5 part files"):
        ParquetBatchReader(multi_part, "train", 8)


def test_missing_split_directory(multi_part: Path) -> None:
    shutil.rmtree(multi_part / "test")
    with pytest.raises(DataError, match=r"test: split directory not found"):
        verify_dataset(multi_part)


def test_the_driver_refuses_to_plan_over_a_missing_part(multi_part: Path, tmp_path: Path) -> None:
    from embshard.cluster.launch import plan_for_training
    from embshard.config import DataConfig, JobConfig

    (multi_part / "train" / "part-00004.parquet").unlink()
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(multi_part)))
    with pytest.raises(DataError, match=r"part-00004\.parquet: missing"):
        plan_for_training(cfg)
    assert not (tmp_path / "run" / "plan").exists()  # nothing planned, nothing written


def test_a_spec_of_the_wrong_shape_is_one_line(multi_part: Path) -> None:
    # Once an AttributeError ('list' object has no attribute 'get') and a TypeError in the planner.
    spec = json.loads((multi_part / SPEC_FILE).read_text())
    (multi_part / SPEC_FILE).write_text("[]")
    with pytest.raises(DataError, match=r"dataset\.json: version None, expected 1"):
        DatasetSpec.load(multi_part)
    # A FIFO where a JSON file is read (a sweep report, an export's manifest): the read blocked for good.
    from embshard.datasets.storage import read_json

    os.mkfifo(multi_part / "fifo.json")
    with pytest.raises(DataError, match=r"fifo\.json: not a regular file$"):
        read_json(multi_part / "fifo.json", DataError)
    (multi_part / "fifo.json").unlink()
    # A newer embshard's dataset read as a malformed one: "version 2, expected 1".
    (multi_part / SPEC_FILE).write_text(json.dumps({**spec, "version": 2}))
    with pytest.raises(DataError, match=r"dataset\.json: version 2, newer than this embshard reads \(1\): written by "
                                        r"a newer embshard; upgrade embshard where it is read$"):
        DatasetSpec.load(multi_part)
    spec["sparse"][0]["cardinality"] = "500"
    (multi_part / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"dataset\.json: sparse feature 'C1': cardinality '500' \(expected an "
                                        r"integer >= 1\)"):
        DatasetSpec.load(multi_part)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["rows"].update(train="x"), r"rows\.train: expected a row count of a split .*, got 'x'"),
    (lambda s: s.update(dense=None), r"dense: expected a list of column names, got None"),
    (lambda s: s["parts"].update(valid=[3, -1]), r"parts\.valid: expected the row counts of a split's part files"),
    (lambda s: s["sparse"][1].update(name="C1"), r"column name 'C1' given twice"),
    (lambda s: s["sparse"][0].update(name="../x"), r"column name '\.\./x': a column needs a name without"),
    (lambda s: s["sparse"][0].update(multi_hot="yes"), r"sparse feature 'C1': multi_hot 'yes' \(true or false\)"),
])
def test_a_spec_field_of_the_wrong_type_is_one_line_naming_it(multi_part: Path, change, message: str) -> None:
    # Each was a ValueError, TypeError or IndexError in the profile, the reader or the verifier;
    # a feature named '../x' was a count file written outside the dataset.
    spec = json.loads((multi_part / SPEC_FILE).read_text())
    change(spec)
    (multi_part / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"dataset\.json: " + message):
        DatasetSpec.load(multi_part)


def test_a_part_file_of_another_writing_is_refused(tmp_path: Path) -> None:
    # One of another dataset of as many rows was read as this one's: verified, trained on.
    for name, seed in (("a", 0), ("b", 1)):
        synthesize(tmp_path / name, rows=3000, seed=seed, max_cardinality=100)
    shutil.copy(tmp_path / "b" / "train" / "part-00000.parquet", tmp_path / "a" / "train" / "part-00000.parquet")
    written_for = DatasetSpec.load(tmp_path / "b").id[:8]
    with pytest.raises(DataError, match=rf"a/train/part-00000\.parquet: written for another dataset \(id "
                                        rf"{written_for}\) than dataset.json's"):
        verify_dataset(tmp_path / "a")
    with pytest.raises(DataError, match="written for another dataset"):
        ParquetBatchReader(tmp_path / "a", "train", 64)


def test_an_item_catalog_is_checked_with_the_dataset(tmp_path: Path) -> None:
    # A null in it was a NaN float every id check let pass (an IndexError at the first evaluation,
    # after training steps); a missing one was found only then too.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embshard.datasets.convert import convert
    from tests.movielens_fixture import write_ml1m_like

    data = tmp_path / "data"
    convert("movielens", write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5), data)
    verify_dataset(data)
    part = data / DatasetSpec.load(data).catalog.path
    table = pq.read_table(part)
    years = table["year"].to_pylist()
    years[3] = None
    pq.write_table(table.set_column(table.schema.get_field_index("year"), "year", pa.array(years, pa.int64())), part)
    with pytest.raises(DataError, match=r"items/part-00000\.parquet: column 'year', row 3: null value"):
        verify_dataset(data)
    # Spark writes a list's items as not null: such a catalog was refused as of another type.
    genres = table["genres"].cast(pa.list_(pa.field("element", pa.int64(), nullable=False)))
    pq.write_table(table.set_column(table.schema.get_field_index("genres"), "genres", genres), part)
    verify_dataset(data)
    part.unlink()
    with pytest.raises(DataError, match=r"items/part-00000\.parquet: missing \(dataset.json records an item catalog"):
        verify_dataset(data)
