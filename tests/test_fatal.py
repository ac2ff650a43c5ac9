"""The record of bad input found inside a worker (cluster/fatal.py). That `embshard train` then ends
with its one line at once, even with unlimited worker-group restarts, is tested end to end in
tests/test_train_e2e.py."""

from __future__ import annotations

from pathlib import Path

from embshard.cluster import fatal
from embshard.errors import DataError, EmbshardError
from embshard.trainer.checkpoint import CheckpointError


def test_a_record_rebuilds_the_same_error_for_its_launch_only(tmp_path: Path) -> None:
    token = fatal.new_token()
    assert fatal.recorded(tmp_path, token) is None
    fatal.record(tmp_path, token, CheckpointError("step-000004: manifest missing"))
    fatal.record(tmp_path, token, DataError("a later rank's error"))  # the first record stays
    again = fatal.recorded(tmp_path, token)
    assert type(again) is CheckpointError and str(again) == "step-000004: manifest missing"
    assert "CheckpointError: step-000004: manifest missing" in (fatal.worker_traceback(tmp_path, token) or "")
    assert fatal.recorded(tmp_path, fatal.new_token()) is None  # an earlier launch's record
    assert [p.name for p in (tmp_path / fatal.FATAL_DIR).iterdir()] == [f"{token}.json"]  # no temp left


def test_a_record_naming_a_class_that_is_not_an_embshard_error_is_rebuilt_as_the_base(tmp_path: Path) -> None:
    token = fatal.new_token()
    fatal.record(tmp_path, token, DataError("bad row"))
    path = tmp_path / fatal.FATAL_DIR / f"{token}.json"
    path.write_text(path.read_text().replace('"DataError"', '"Path"').replace("embshard.errors", "pathlib"))
    again = fatal.recorded(tmp_path, token)
    assert type(again) is EmbshardError and str(again) == "bad row"
