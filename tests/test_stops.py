"""A stop held back during a step that must not stop halfway (embshard/stops.py)."""

from __future__ import annotations

import os
import signal

import pytest

from embshard.stops import stops_held


def test_a_stop_in_the_block_comes_after_it_and_sigterm_before_ctrl_c(python_ctrl_c: None) -> None:
    # Both pending: SIGINT was raised first and its KeyboardInterrupt dropped the SIGTERM, whose
    # handler (by default: the end of the process) then never ran.
    def terminated(signum: int, frame: object) -> None:
        raise SystemExit("terminated")

    previous = signal.signal(signal.SIGTERM, terminated)
    ran = []
    try:
        with pytest.raises(SystemExit, match="terminated"):
            with stops_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                ran.append("the whole block")
        assert ran == ["the whole block"]
        assert signal.getsignal(signal.SIGTERM) is terminated  # the handlers are back
        with pytest.raises(KeyboardInterrupt):
            with stops_held():
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
