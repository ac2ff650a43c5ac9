"""The record of bad input found inside a worker (cluster/fatal.py). That `embshard train` then ends
with its one line at once, even with unlimited worker-group restarts, is tested end to end in
tests/test_train_e2e.py."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from embshard.cluster import fatal
from embshard.errors import DataError, EmbshardError, environment_problem
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


def test_a_machine_that_cannot_take_the_record_or_the_log_adds_no_error_of_its_own(tmp_path: Path, capfd) -> None:
    # On a full disk the record and the run log failed with the same ENOSPC, raised over the
    # worker's error and inside the CLI's handler: 128 lines on the console and no `embshard:` one.
    from embshard.cluster import console

    (tmp_path / fatal.FATAL_DIR).write_text("a file where the records' folder goes")
    fatal.record(tmp_path, fatal.new_token(), DataError("bad row"))  # no OSError
    log_dir = tmp_path / "run"
    with console.run_log(log_dir) as log:
        log.unlink()
        log.mkdir()  # the log cannot be appended to now
        assert console.record_error(RuntimeError("boom")) is None
        logging.getLogger("embshard.test").error("dropped, not a traceback on stderr")
    assert "Logging error" not in capfd.readouterr().err


def test_an_os_error_of_the_machine_is_one_line_naming_the_file() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/step-000060.tmp")
    assert str(environment_problem(full)) == "/data/run/checkpoints/step-000060.tmp: No space left on device"
    # pyarrow's writers name no file: still the machine's (a traceback before), said without one.
    assert str(environment_problem(OSError(errno.ENOSPC, "No space left on device"))) == \
        "No space left on device (OSError: [Errno 28] No space left on device)"
    assert environment_problem(OSError(errno.EACCES, "Permission denied")) is None  # no file: maybe a store's
    assert environment_problem(OSError(errno.ECONNRESET, "reset", "x")) is None  # not the machine's files


def _raised(message: str) -> BaseException:
    try:
        raise TypeError(message)
    except TypeError as e:
        return e


def test_a_crash_that_comes_back_after_a_restart_is_recorded_as_final(tmp_path: Path) -> None:
    # A bug in a forward was retried like a lost worker: under max_failures -1, for ever.
    from embshard.errors import RepeatedCrash

    token = fatal.new_token()
    fatal.crashed(tmp_path, token, 1, _raised("bad operand"))  # the first group: kept, not final
    assert fatal.recorded(tmp_path, token) is None
    fatal.crashed(tmp_path, token, 0, _raised("bad operand"))  # another rank's first
    fatal.crashed(tmp_path, token, 1, _raised("lost peer [127.0.0.1]:4242"))  # rank 1, another error
    assert fatal.recorded(tmp_path, token) is None
    fatal.crashed(tmp_path, token, 1, _raised("lost peer [127.0.0.1]:4242"))  # the same, at the same line
    again = fatal.recorded(tmp_path, token)
    assert type(again) is RepeatedCrash
    line = _raised.__code__.co_firstlineno + 2
    assert str(again) == (f"rank 1: TypeError: lost peer [127.0.0.1]:4242 at {__file__}:{line}; "
                          "raised again the same way after Ray restarted the worker group, so it is not retried "
                          "(a bug, not a lost worker)")
    assert fatal.recorded(tmp_path, fatal.new_token()) is None  # another launch's groups start afresh
