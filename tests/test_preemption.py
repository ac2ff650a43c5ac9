"""Stop signals and requests: SIGTERM, Ctrl-C and the stop-request file raise one flag, and the
flag belongs to one run (a new guard in the same process starts unsignalled)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from embshard.trainer.preemption import StopGuard


def test_a_new_run_forgets_an_earlier_runs_sigterm():
    first = StopGuard()
    assert first.install()
    os.kill(os.getpid(), signal.SIGTERM)  # caught by the guard's handler, not fatal
    deadline = time.monotonic() + 5
    while not first.signalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.signalled
    second = StopGuard()
    assert second.install() and not second.signalled


def test_ctrl_c_and_a_stop_request_stop_like_sigterm(tmp_path):
    guard = StopGuard(tmp_path / "stop-requested")
    assert guard.install() and not guard.signalled
    (tmp_path / "stop-requested").touch()  # what `embshard` writes on Ctrl-C
    assert guard.signalled
    (tmp_path / "stop-requested").unlink()
    assert StopGuard().install()
    os.kill(os.getpid(), signal.SIGINT)  # caught: no KeyboardInterrupt on the first one
    deadline = time.monotonic() + 5
    while not guard.signalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guard.signalled


def test_sigterm_to_the_driver_asks_the_workers_to_stop_as_ctrl_c_does(tmp_path, capsys):
    # `kill`, a pod's termination and `ray job stop` send SIGTERM: Ray's handler dumped a C++ stack
    # and aborted the driver, and the workers lost every step since their last checkpoint.
    from embshard.cluster.interrupt import run_with_graceful_ctrl_c

    request = tmp_path / "stop-requested"

    def fit() -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not request.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "fit returned" if request.exists() else "no request"

    before = signal.getsignal(signal.SIGTERM)
    assert run_with_graceful_ctrl_c(fit, request) == ("fit returned", True)
    assert "embshard: terminated: finishing the step and writing a checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before and not request.exists()


def test_a_stop_without_checkpoints_is_an_interrupt_not_ray_s_exit(tmp_path, python_ctrl_c):
    # checkpoint.enabled false (or on_sigterm false): the fit ran on the main thread, where Ray
    # Train's controller puts in a SIGINT handler of its own that exits 1, without a word.
    import sys
    import threading

    from embshard.cluster.interrupt import run_with_graceful_ctrl_c

    def fit() -> str:
        if threading.current_thread() is threading.main_thread():  # as Ray Train's controller does
            signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(1))
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
        return "fit returned"

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_with_graceful_ctrl_c(fit, tmp_path / "stop-requested", graceful=False)
    assert signal.getsignal(signal.SIGINT) == before and not (tmp_path / "stop-requested").exists()


def test_a_stop_before_any_worker_started_ends_at_once_and_a_slow_start_is_said(tmp_path, python_ctrl_c):
    # A group Ray could not place (more workers than the cluster's CPUs) waited for good without a
    # word, and the first SIGTERM said "finishing the step and writing a checkpoint" of a step no
    # worker would ever take: only a second one ended it.
    from embshard.cluster.interrupt import run_with_graceful_ctrl_c

    said: list[str] = []

    def fit() -> str:
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        return "fit returned"

    with pytest.raises(KeyboardInterrupt):
        run_with_graceful_ctrl_c(fit, tmp_path / "stop-requested", started=lambda: False,
                                 slow_start=(0.3, lambda: said.append("waiting")))
    assert said == ["waiting"] and not (tmp_path / "stop-requested").exists()


def test_a_resumed_run_s_progress_bar_ends_at_its_total():
    # It counted from 0 and ended at 90% (360/400) after a resume at step 360.
    from embshard.trainer.callbacks import ProgressBar, StepInfo

    bar = ProgressBar(world_size=1)
    bar.on_train_start(400)
    for step in range(360, 400):
        bar.on_step_start(step)
        bar.on_step(StepInfo(step + 1, 0, 8, 0.01, 0.0, None))
    assert bar.bar is not None and (bar.bar.n, bar.bar.total) == (400, 400)
    bar.on_train_end({})
