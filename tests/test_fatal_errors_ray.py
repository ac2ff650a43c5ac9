"""Bad input found inside a Ray worker ends `embshard train` with its one line at once, even
with unlimited worker-group restarts (`cluster.max_failures: -1`); see cluster/fatal.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embshard.cluster import fatal
from embshard.datasets.schema import DatasetSpec, part_name, split_dir
from embshard.datasets.synth import synthesize
from embshard.datasets.writer import ROW_GROUP_ROWS
from embshard.errors import DataError, EmbshardError
from embshard.trainer.checkpoint import CheckpointError
from embshard.trainer.restarts import STARTS_FILE

BAD_ROW = 17000  # in the third row group: the reader reaches it after ~30 steps of 512 rows


def test_a_record_rebuilds_the_same_error_for_its_launch_only(tmp_path: Path) -> None:
    token = fatal.new_token()
    assert fatal.recorded(tmp_path, token) is None
    fatal.record(tmp_path, token, CheckpointError("step-000004: manifest missing"))
    fatal.record(tmp_path, token, DataError("a later rank's error"))  # the first record stays
    again = fatal.recorded(tmp_path, token)
    assert type(again) is CheckpointError and str(again) == "step-000004: manifest missing"
    assert fatal.recorded(tmp_path, fatal.new_token()) is None  # an earlier launch's record
    assert [p.name for p in (tmp_path / fatal.FATAL_DIR).iterdir()] == [f"{token}.json"]  # no temp left


def test_a_record_naming_a_class_that_is_not_an_embshard_error_is_rebuilt_as_the_base(tmp_path: Path) -> None:
    token = fatal.new_token()
    fatal.record(tmp_path, token, DataError("bad row"))
    path = tmp_path / fatal.FATAL_DIR / f"{token}.json"
    path.write_text(path.read_text().replace('"DataError"', '"Path"').replace("embshard.errors", "pathlib"))
    again = fatal.recorded(tmp_path, token)
    assert type(again) is EmbshardError and str(again) == "bad row"


def plant_bad_id(data: Path) -> tuple[Path, str, int]:
    """Sets feature C1 of train row BAD_ROW to its cardinality (one past the last id), keeping
    the part file's row groups; -> the part file, the column and the id."""
    spec = DatasetSpec.load(data)
    column = spec.sparse[0].name
    cardinality = spec.feature(column).cardinality
    part = split_dir(data, "train") / part_name(0)
    table = pq.read_table(part)
    ids = table[column].to_pylist()
    ids[BAD_ROW] = cardinality
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(ids, table.schema.field(index).type))
    pq.write_table(table, part, row_group_size=ROW_GROUP_ROWS)
    return part, column, cardinality


@pytest.mark.slow
def test_an_id_out_of_range_is_one_line_at_once_with_unlimited_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, rows=25000, max_cardinality=500)  # 20,000 train rows: row groups of 8192, 8192, 3616
    part, column, bad_id = plant_bad_id(data)
    run = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {run}\n"
                      f"data: {{path: {data}, batch_size: 512, eval_batch_size: 2048, prefetch: 1, shuffle: false}}\n"
                      f"train: {{progress: false, epochs: 1}}\ncluster: {{workers: 1, max_failures: -1}}\n"
                      f"checkpoint: {{enabled: false}}\n")
    embshard = Path(sys.executable).parent / "embshard"
    # Its own session: a run that never ends is killed with the Ray processes it started.
    with subprocess.Popen([str(embshard), "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=tmp_path, start_new_session=True) as train:
        try:
            _, err = train.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(train.pid, signal.SIGKILL)
            train.communicate()
            starts = (run / STARTS_FILE).read_text().strip()
            pytest.fail(f"embshard train still running after 150 s; the worker group started {starts} times")
    assert train.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"embshard: error: {part}: column {column!r}, row {BAD_ROW}: id {bad_id} outside [0, {bad_id})")
    assert err.count("embshard: error:") == 1
    assert (run / STARTS_FILE).read_text().strip() == "1"  # the restarted group did not train again
