"""The record of bad input found inside a worker (cluster/fatal.py), on a launch's board (a Ray
actor: a local cluster of one CPU here). That `embshard train` then ends with its one line at
once, even with unlimited worker-group restarts and on a full disk, is tested end to end in
tests/test_train_e2e.py."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import ray

from embshard.cluster import fatal
from embshard.errors import DataError, EmbshardError, environment_problem
from embshard.trainer.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def ray_session():
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)


@pytest.mark.slow
def test_a_record_rebuilds_the_same_error_for_its_launch_only(ray_session) -> None:
    with fatal.launch_board() as board, fatal.launch_board() as other:
        assert fatal.recorded(board) is None
        fatal.record(board, CheckpointError("step-000004: manifest missing"))
        fatal.record(board, DataError("a later rank's error"))  # the first record stays
        again = fatal.recorded(board)
        assert type(again) is CheckpointError and str(again) == "step-000004: manifest missing"
        assert "CheckpointError: step-000004: manifest missing" in (fatal.worker_traceback(board) or "")
        assert fatal.recorded(other) is None  # another launch's board
    assert fatal.recorded(board) is None  # the launch over, its board is gone: nothing to raise again
    fatal.record(board, DataError("bad row"))  # and a worker left behind adds no error of its own


@pytest.mark.slow
def test_a_record_naming_a_class_that_is_not_an_embshard_error_is_rebuilt_as_the_base(ray_session) -> None:
    class NotOurs(DataError):
        pass

    NotOurs.__module__, NotOurs.__qualname__ = "pathlib", "Path"
    with fatal.launch_board() as board:
        fatal.record(board, NotOurs("bad row"))
        again = fatal.recorded(board)
    assert type(again) is EmbshardError and str(again) == "bad row"


def test_a_machine_that_cannot_take_the_log_adds_no_error_of_its_own(tmp_path: Path, capfd) -> None:
    # On a full disk the run log failed with the same ENOSPC, raised over the worker's error and
    # inside the CLI's handler: 128 lines on the console and no `embshard:` one.
    from embshard.cluster import console

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


@pytest.mark.slow
def test_a_crash_that_comes_back_after_a_restart_is_recorded_as_final(ray_session) -> None:
    # A bug in a forward was retried like a lost worker: under max_failures -1, for ever.
    from embshard.errors import RepeatedCrash

    with fatal.launch_board() as board, fatal.launch_board() as other:
        fatal.crashed(board, 1, _raised("bad operand"))  # the first group: kept, not final
        assert fatal.recorded(board) is None
        fatal.crashed(board, 0, _raised("bad operand"))  # another rank's first
        fatal.crashed(board, 1, _raised("lost peer [127.0.0.1]:4242"))  # rank 1, another error
        assert fatal.recorded(board) is None
        fatal.crashed(board, 1, _raised("lost peer [127.0.0.1]:4242"))  # the same, at the same line
        again = fatal.recorded(board)
        assert type(again) is RepeatedCrash
        line = _raised.__code__.co_firstlineno + 2
        assert str(again) == (f"rank 1: TypeError: lost peer [127.0.0.1]:4242 at {__file__}:{line}; "
                              "raised again the same way after Ray restarted the worker group, so it is not retried "
                              "(a bug, not a lost worker)")
        fatal.crashed(other, 1, _raised("lost peer [127.0.0.1]:4242"))  # another launch's groups start afresh
        assert fatal.recorded(other) is None
        # A collective's error reads the same after every loss of a node ("Timed out waiting
        # 1800000ms for recv"): a restart mends it, so it is never compared.
        timeout = _raised("Timed out waiting 1800000ms for recv operation to complete")
        timeout.__traceback__ = _through_torch_distributed(timeout)
        for _ in range(2):
            fatal.crashed(other, 0, timeout)
        assert fatal.recorded(other) is None


def _through_torch_distributed(error: BaseException):
    """`error`'s traceback with a frame of torch.distributed's innermost, as gloo's errors have."""
    import torch.distributed.distributed_c10d as c10d

    code = compile("raise error", c10d.__file__, "exec")
    try:
        exec(code, {"error": error})
    except type(error) as e:
        return e.__traceback__


@pytest.mark.slow
def test_the_placement_note_compares_the_group_with_the_cluster(ray_session):
    # What the note says while no worker starts: the resource the cluster lacks in all, or what
    # is free now (the rest held by other jobs).
    from embshard.cluster.launch import placement_wait
    from embshard.config import ClusterConfig, JobConfig

    cpus = ray.cluster_resources()["CPU"]
    too_many = JobConfig(cluster=ClusterConfig(workers=int(cpus) + 1))
    assert re.search(rf"cannot place {int(cpus) + 1} workers of CPU 1 each on this cluster \(CPU {cpus:g} in all\)",
                     placement_wait(too_many))
    assert re.search(r"Ray is placing 1 worker of CPU 1 each \(CPU [\d.]+ free now",
                     placement_wait(JobConfig(cluster=ClusterConfig(workers=1))))
