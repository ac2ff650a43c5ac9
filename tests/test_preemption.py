"""Stop signals and requests: SIGTERM, Ctrl-C and the stop-request file raise one flag, and the
flag belongs to one run (a new guard in the same process starts unsignalled)."""

from __future__ import annotations

import os
import signal
import time

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
