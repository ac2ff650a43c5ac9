"""Progress bars in a log: whole lines now and then, never the "\r" redraws of a terminal."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from embshard import progress
from embshard.cluster import console
from embshard.datasets.convert import convert
from embshard.progress import progress_bar
from tests.movielens_fixture import write_ml1m_like


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(out: io.StringIO, message_at: int | None = None) -> None:
    bar = progress_bar(total=10, desc="reading", unit="rows", file=out, leave=False)
    for i in range(10):
        bar.update(1)
        if i == message_at:
            tqdm.write("warning: something", file=out)
    bar.close()


def test_short_work_writes_no_bar_to_a_log() -> None:
    out = io.StringIO()
    _run(out, message_at=4)
    # It wrote "\r reading:  40%|…" fragments around the message, all on one line.
    assert out.getvalue() == "warning: something\n"


def test_a_bar_in_a_log_is_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # every redraw is due
    out = io.StringIO()
    _run(out, message_at=4)
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and lines[-1] == ""  # and no blank line at the close
    assert all(line.startswith("reading:") for line in lines[:-1] if line != "warning: something")
    assert "warning: something" in lines and "10/10" in lines[-2]
    assert len(lines) - 1 == len(set(lines[:-1]))  # the close did not repeat the last state


def test_a_terminal_gets_tqdm_itself() -> None:
    bar = progress_bar(total=1, file=_Terminal())
    assert type(bar) is tqdm
    bar.close()


def test_the_drivers_log_gets_a_workers_bar_as_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # The training bar is drawn in a Ray worker and shown by the driver; `embshard train > log`
    # or a Ray job's log got every redraw.
    out = io.StringIO()
    for redraw in ("\r  0%|", "\r 40%|####", "\r 40%|####  "):
        console._show(redraw, out)
    console._show("step 4: valid AUC 0.51", out)
    console._end_progress_line()
    assert out.getvalue() == "step 4: valid AUC 0.51\n"  # shorter than a line's interval: no bar

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    out = io.StringIO()
    for redraw in ("\r  0%|", "\r 40%|####", "\r 40%|####  ", "\r 90%|#########"):
        console._show(redraw, out)
    console._show("step 9: valid AUC 0.52", out)
    console._show("\r100%|##########", out)
    console._end_progress_line()
    assert out.getvalue() == "40%|####\n90%|#########\nstep 9: valid AUC 0.52\n100%|##########\n"

    # A bar's state is written before a later line, not after it: the 100% line came after the
    # test split's result, as if training ended after the test.
    monkeypatch.setattr(progress, "LOG_INTERVAL", 30.0)
    clock = iter([0.0, 40.0, 50.0])
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    out = io.StringIO()
    for redraw in ("\r  0%|", "\r 80%|########", "\r100%|##########"):
        console._show(redraw, out)
    console._show("test: AUC 0.80", out)
    console._end_progress_line()
    assert out.getvalue() == "80%|########\n100%|##########\ntest: AUC 0.80\n"

    terminal = _Terminal()
    console._show("\r 40%|####", terminal)
    console._show("step 4: valid AUC 0.51", terminal)
    assert terminal.getvalue() == "\r 40%|####\nstep 4: valid AUC 0.51\n"  # redrawn in place


def test_a_conversion_logged_to_a_file_has_no_redraws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    convert("movielens", src, tmp_path / "out")
    said = capsys.readouterr()
    assert "\r" not in said.err + said.out and "ml-1m" in said.out
