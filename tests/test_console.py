"""Console routing and worker-error unwrapping, in process: the marks a worker's console output
carries, and the error a user sees out of Ray Train's real exception wrappers."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from embshard.cluster.console import END, START, _console_lines, _MarkedStream
from embshard.errors import ConfigError, DataError


def test_marked_stream_marks_lines_and_progress_redraws():
    inner = io.StringIO()
    out = _MarkedStream(inner)
    out.write("\r  0%|")
    out.write("\r 50%|")
    out.write("\n")
    out.write("step 7: valid AUC 0.51\nresumed")
    out.write(" from step 3\n")
    text = inner.getvalue()
    # Ray forwards partial lines as they come: every write, and every redraw after \r, is marked
    # on its own.
    assert text.count(START) == text.count(END) == 5
    assert _console_lines(text.split("\n")) == ["\r  0%|\r 50%|", "step 7: valid AUC 0.51", "resumed from step 3"]
    # A log handler's writes (Ray's worker handler looks sys.stderr up when it emits) pass through
    # unmarked: they are log lines.
    handler = logging.StreamHandler(out)
    logging.getLogger("embshard.test").addHandler(handler)
    try:
        logging.getLogger("embshard.test").warning("Successfully loaded: 'fbgemm_gpu_py.so'")
    finally:
        logging.getLogger("embshard.test").removeHandler(handler)
    assert START not in inner.getvalue()[len(text):] and "fbgemm_gpu_py" in inner.getvalue()
    # what Ray's log monitor hands over when it splits the bar's redraws into separate reads
    assert _console_lines([START + "\r 50%|" + END, "Successfully loaded: 'fbgemm_gpu_py.so'"]) == ["\r 50%|"]
    # A log line written right after a redraw that had no newline yet shares its line: only the
    # redraw is shown.
    torch_warning = "[rank0]:W1202 torch/fx/_symbolic_trace.py:56] is_fx_tracing will return true"
    assert _console_lines([START + "\r  0%|" + END + torch_warning]) == ["\r  0%|"]


def _worker_group_error(failures: dict[int, BaseException]) -> BaseException:
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    wrapped = {}
    for rank, err in failures.items():
        try:
            raise err
        except BaseException as e:  # Ray wraps what the train function raised like this
            wrapped[rank] = RayTaskError("train_fn", "Traceback ...\n", e).as_instanceof_cause()
    return WorkerGroupError("Training failed due to worker errors", wrapped)


def test_worker_error_finds_the_input_error_inside_ray_wrappers():
    from ray.exceptions import RayError

    from embshard.cluster.launch import worker_error

    bad = DataError("part-0.parquet: column 'C2', row 123: id -7 outside [0, 583)")
    try:
        try:
            raise pa.ArrowInvalid("low-level")
        except pa.ArrowInvalid:
            # An input error raised while handling a library's error: the implicit chain is the case under test.
            raise bad  # noqa: B904
    except DataError:
        pass
    err = _worker_group_error({1: bad, 0: RuntimeError("collective aborted: peer 1 gone")})
    found = worker_error(err)
    assert found.error is bad and not isinstance(found.error, RayError) and found.rank == 1
    assert str(found.error) == "part-0.parquet: column 'C2', row 123: id -7 outside [0, 583)"


def test_worker_error_without_input_error_is_the_first_ranks_root_cause():
    from embshard.cluster.launch import worker_error

    try:
        try:
            raise OSError("disk full")
        except OSError as e:
            raise RuntimeError("checkpoint failed") from e
    except RuntimeError as e:
        crash = e
    found = worker_error(_worker_group_error({1: ValueError("later rank"), 0: crash}))
    assert isinstance(found.error, OSError) and found.summary() == "rank 0: OSError: disk full"


def test_worker_error_prefers_the_worker_that_died():
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from embshard.cluster.launch import worker_error

    # As Ray Train reports a killed worker: its health check failed with the actor's death, while
    # its peer's collective lost the connection.
    echo = _worker_group_error({0: RuntimeError("gloo: connection closed by peer")}).worker_failures[0]
    died = ActorDiedError()
    err = WorkerGroupError("Training failed due to worker errors",
                           {0: echo, 1: WorkerHealthCheckFailedError("health check failed", failure=died)})
    found = worker_error(err)
    assert found.error is died and found.rank == 1
    assert found.summary().startswith("rank 1: ActorDiedError: ")


@pytest.mark.parametrize("argv", [["train", "c.yaml", "--verbose"], ["prune", "pep", "c.yaml", "--verbose"],
                                  ["search", "autodim", "c.yaml", "--verbose"]], ids=lambda a: a[0])
def test_verbs_on_ray_take_verbose(argv):
    from embshard.cluster.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True


def test_ray_s_own_console_logging_goes_to_the_run_log(tmp_path, capfd):
    # A failed Tune trial was logged by Ray's logger straight to stderr: ~100 lines of tracebacks
    # above the one line that said what was wrong.
    import ray  # noqa: F401 - installs Ray's console handler on the "ray" logger

    from embshard.cluster import console

    tune_logger = logging.getLogger("ray.tune.execution.tune_controller")
    ray_logger = logging.getLogger("ray")
    handlers = list(ray_logger.handlers)
    assert any(isinstance(h, logging.StreamHandler) for h in handlers)
    with console.run_log(tmp_path) as log:
        tune_logger.error("before ray.init")
        ray_logger.handlers.clear()  # what ray.init(configure_logging=False) does, inside every run
        tune_logger.error("Trial task failed for trial run_trial_1\nTraceback (most recent call last): ...")
    err = capfd.readouterr().err
    assert "Trial task failed" not in err and "before ray.init" not in err
    assert "before ray.init" in log.read_text() and "Trial task failed for trial run_trial_1" in log.read_text()
    # Ray's console handlers are back after the run (ray.init in it may have cleared the rest, and
    # the clear above took a file handler an earlier Ray run in this process may have left).
    consoles = [h for h in handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert consoles and all(h in ray_logger.handlers for h in consoles)
    assert not ray_logger.propagate
    console.set_verbose(True)  # --verbose: on the console too, through the root logger's echo
    try:
        with console.run_log(tmp_path / "verbose"):
            tune_logger.error("shown with --verbose")
    finally:
        console.set_verbose(False)
    assert "shown with --verbose" in capfd.readouterr().err


def test_a_library_s_root_console_handler_prints_nothing_during_a_run(tmp_path):
    # FBGEMM's import calls logging.info, so basicConfig gave the root logger a stderr handler: at
    # the run's INFO level every local run printed "INFO:ray._private.worker:Started a local Ray
    # instance." above the progress bar.
    from embshard.cluster import console

    root = logging.getLogger()
    library = logging.StreamHandler(sys.__stderr__)
    root.addHandler(library)
    try:
        with console.run_log(tmp_path) as log:
            assert library not in root.handlers
            logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        assert library in root.handlers
        assert "Started a local Ray instance." in log.read_text()
    finally:
        root.removeHandler(library)


def test_the_raylet_s_worker_died_paragraph_goes_to_the_run_log(tmp_path, capsys):
    # Ray's error listener printed "(raylet) A worker died ..." (900 characters) on the console
    # above the run's one line for the same failure; its cause stays on the console, in a line.
    import ray._private.worker as ray_worker

    from embshard.cluster import console

    console.route_worker_output()
    console.route_worker_output()  # again, as a second run in the process does: Ray's printer stays its own
    died = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
            "the problem, check the logs for the dead worker. Worker PID: 24296 Worker exit type: SYSTEM_ERROR "
            "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some "
            "common causes include: (1) the process was killed by the OOM killer")
    message = {"lines": [died], "pid": "raylet", "is_err": False}
    lost = {"lines": ["The node with node id: abc has been marked dead because the detector has missed too many "
                      "heartbeats from it."], "pid": "raylet", "is_err": False}
    # A two-trial sweep's console ended in this (its trials ask for 0.01 CPU each, as planned).
    many = {"lines": ["WARNING: 10 PYTHON worker processes have been started on node: 7786 with address: 192.0.2.2, "
                      "which is 5x the maximum expected startup concurrency (2). This could be a result of using a "
                      "large number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU "
                      "requests (e.g., num_cpus=0.1) allowing high concurrency."], "pid": "raylet", "is_err": False}
    with console.run_log(tmp_path) as log:
        ray_worker.print_to_stdstream(message, ignore_prefix=False)  # as listen_error_messages calls it
        ray_worker.print_to_stdstream(lost, ignore_prefix=False)
        ray_worker.print_to_stdstream(many, ignore_prefix=False)
        # Its cause goes into the run's one line for the crash (a line of its own split the progress bar).
        assert console.worker_deaths() == (" (Ray: a worker process died: SYSTEM_ERROR: Worker unexpectedly exits "
                                           "with a connection error code 2.)")
    out, err = capsys.readouterr()
    assert "A worker died" not in out + err and err == ""
    assert f"(raylet) {died}" in log.read_text()
    assert "worker processes have been started" not in out + err and f"(raylet) {many['lines'][0]}" in log.read_text()
    assert "has been marked dead" in out  # another raylet message: printed as Ray prints it
    with console.run_log(tmp_path / "next"):
        assert console.worker_deaths() == ""  # the next run's line does not carry this one's
    console.set_verbose(True)
    try:
        with console.run_log(tmp_path / "verbose"):
            ray_worker.print_to_stdstream(message, ignore_prefix=False)
    finally:
        console.set_verbose(False)
    assert "A worker died or was killed" in capsys.readouterr().out  # Ray's own printer, with --verbose


def test_workers_lines_after_an_abort_go_to_the_log_alone(tmp_path, capsys):
    # Ctrl-C with checkpoints off: "embshard: interrupted", then a worker's evaluation line.
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from embshard.cluster import console

    console.route_worker_output()

    def worker_says(line: str) -> None:
        dispatcher.emit({"lines": [f"{START}{line}{END}"], "pid": 7, "is_err": False})

    with console.run_log(tmp_path / "run") as log:
        worker_says("step 62: valid AUC 0.7408")
        console.mute_workers()
        worker_says("step 93: valid AUC 0.7268")
    assert capsys.readouterr().out == "step 62: valid AUC 0.7408\n"
    assert "step 93: valid AUC 0.7268" in log.read_text()
    with console.run_log(tmp_path / "next"):
        worker_says("step 1: valid AUC 0.5")  # the next run in this process is heard again
    assert capsys.readouterr().out == "step 1: valid AUC 0.5\n"


def test_a_workers_crash_says_where_in_the_users_code_it_was_raised():
    # "crashed: rank 0: RuntimeError: callback on_step boom", naming neither the hook nor the file:
    # the worker's traceback reaches the driver as text, with the user's frame in it.
    import torch
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from embshard.cluster.launch import worker_error

    frames = (f'  File "{__file__}", line 12, in on_step\n'
              f'  File "{Path(torch.__file__).parent / "nn" / "modules" / "module.py"}", line 1751, in _call_impl\n')
    boom = RuntimeError("callback on_step boom")
    wrapped = RayTaskError("train_fn", "Traceback (most recent call last):\n" + frames, boom).as_instanceof_cause()
    found = worker_error(WorkerGroupError("Training failed due to worker errors", {0: wrapped}))
    assert found.summary() == f"rank 0: RuntimeError: callback on_step boom at {__file__}:12"
    # Frames of embshard's own, Python's and the installed packages' are nobody's to fix: not named.
    from embshard.trainer import loop

    ours = RayTaskError("train_fn", f'  File "{loop.__file__}", line 3, in run_worker\n', boom).as_instanceof_cause()
    said = worker_error(WorkerGroupError("failed", {0: ours})).summary()
    assert said == "rank 0: RuntimeError: callback on_step boom"


def test_a_crash_as_ray_train_reports_it_names_the_users_line():
    # Ray 2.60 hands the driver each rank's bare exception; its traceback lives on only in the
    # worker-group error's message, so the README's "at file:line" was never said in a real run.
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

    from embshard.cluster.launch import worker_error

    def raised(line: int, message: str) -> UserExceptionWithTraceback:
        text = (f'Traceback (most recent call last):\n  File "{__file__}", line {line}, in forward\n'
                f"ValueError: {message}\n")
        return UserExceptionWithTraceback(ValueError(message), text)

    statuses = {0: WorkerStatus(running=False, error=raised(11, "boom in my forward")),
                1: WorkerStatus(running=False, error=raised(40, "another bug"))}
    error = WorkerGroupPollStatus(statuses).get_worker_group_error()
    assert worker_error(error).summary() == f"rank 0: ValueError: boom in my forward at {__file__}:11"
    error = WorkerGroupPollStatus({1: statuses[1]}).get_worker_group_error()
    assert worker_error(error).summary() == f"rank 1: ValueError: another bug at {__file__}:40"


def test_a_users_module_failing_as_it_imports_is_named_at_its_own_line(tmp_path, monkeypatch):
    # Its register_method("uniform", ...) raised inside embshard, and the line named
    # trainer/method.py instead of the user's file.
    from embshard.trainer.reference import import_reference

    (tmp_path / "mine.py").write_text("from embshard.trainer.method import EmbeddingMethod, register_method\n\n"
                                      "register_method('uniform', EmbeddingMethod())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"has that name at {re.escape(str(tmp_path))}/mine\.py:3$"):
        import_reference("mine:thing", "embeddings.method")


def test_a_users_module_missing_a_dependency_is_not_said_to_be_missing_itself(tmp_path, monkeypatch):
    # "cannot import module 'mine' (ModuleNotFoundError: No module named 'not_installed')" read as
    # if the user's own module were not on the path.
    from embshard.trainer.reference import import_reference

    (tmp_path / "mine.py").write_text("import json\nimport not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^model\.arch: importing module 'mine' failed: ModuleNotFoundError: No "
                                          r"module named 'not_installed_anywhere' at "
                                          rf"{re.escape(str(tmp_path))}/mine\.py:2$"):
        import_reference("mine:build", "model.arch")
    with pytest.raises(ConfigError, match=r"^model\.arch: cannot import module 'nowhere\.mine' \(ModuleNotFound"):
        import_reference("nowhere.mine:build", "model.arch")


def test_a_users_package_installed_among_the_libraries_is_named_where_it_failed(tmp_path, monkeypatch):
    # Frames in an installed package are nobody's to fix, so a user's package that pip installed
    # was never named: the line pointed nowhere. A package a config names is the user's wherever
    # it lives. (tmp_path stands in for site-packages.)
    from embshard.trainer import reference

    package = tmp_path / "users_installed_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("")
    (package / "layers.py").write_text("def width():\n    raise ValueError('no width')\n")
    (package / "models" / "arch.py").write_text("from users_installed_pkg.layers import width\n\n\n"
                                                "def build():\n    return width()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reference, "_LIBRARIES", reference._LIBRARIES | {tmp_path})
    build = reference.import_reference("users_installed_pkg.models.arch:build", "model.arch")
    with pytest.raises(ConfigError, match=r"^model\.arch 'x': its build raised ValueError: no width at "
                                          rf"{re.escape(str(package))}/layers\.py:2$"):
        with reference.users_code("model.arch 'x': its build"):
            build()
    # A reference into a library the process had loaded does not make the library the user's:
    # `torch.nn:Linear` named torch's own frames as the place to look.
    import torch

    reference.import_reference("torch.nn:Linear", "model.arch")
    assert not any(Path(torch.__file__).parent.is_relative_to(p) for p in reference._USERS_PACKAGES)


def test_a_rank_that_lost_its_peer_is_not_named_as_the_cause():
    # Rank 0's collective read "Connection reset by peer" when rank 1 failed: the line named rank
    # 0's echo, the lowest rank, over rank 1's own error.
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from embshard.cluster.launch import lost_a_peer, worker_error

    echo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:42726: Connection reset by peer")
    bug = ValueError("a bug on rank 1")
    failures = {rank: RayTaskError("train_fn", "Traceback (most recent call last):\n", err).as_instanceof_cause()
                for rank, err in ((0, echo), (1, bug))}
    found = worker_error(WorkerGroupError("Training failed", failures))
    assert found.summary() == "rank 1: ValueError: a bug on rank 1"
    # Alone, the echo is all there is to say.
    alone = worker_error(WorkerGroupError("Training failed", {0: failures[0]})).summary()
    assert alone.startswith("rank 0: RuntimeError: ") and alone.endswith("Connection reset by peer")
    assert lost_a_peer(echo) and not lost_a_peer(bug)
    # A data source's own reset is a cause, not a collective's echo.
    assert not lost_a_peer(ConnectionResetError(104, "Connection reset by peer"))
    assert not lost_a_peer(RuntimeError("reading s3://bucket/part-0.parquet: Connection reset by peer"))
