"""The SIGTERM flag belongs to one run: a new guard in the same process starts unsignalled."""

from __future__ import annotations

import os
import signal
import time

from embshard.trainer.preemption import SigtermGuard


def test_a_new_run_forgets_an_earlier_runs_sigterm():
    first = SigtermGuard()
    assert first.install()
    os.kill(os.getpid(), signal.SIGTERM)  # caught by the guard's handler, not fatal
    deadline = time.monotonic() + 5
    while not first.signalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.signalled
    second = SigtermGuard()
    assert second.install() and not second.signalled
