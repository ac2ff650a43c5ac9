"""What a person reads on the console, and the run's log file that keeps everything else.

The console gets the plan, rank 0's progress bar and evaluation lines, the summary and one line
per error. Everything else a run prints -- Ray's own actors (train controller, placement-group
cleaner), library chatter in the workers (FBGEMM's loaded kernels, torch's FX warnings), worker
tracebacks -- goes to `<output_dir>/logs/embshard.log` (appended to, never replaced), and all of it
to the console as well with `--verbose`.

Workers cannot choose what Ray forwards: Ray sends every line a worker process writes to the
driver. So the training code's own console output is marked in the worker (`mark_console`: the
sys.stdout/sys.stderr that `print` and the progress bar write to) and the driver shows only
marked lines. Log handlers (Ray's look sys.stderr up when they emit) and C++ code writing to fd 2
stay unmarked.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from embshard.progress import RedrawsAsLines, is_terminal

LOG_FILE = Path("logs") / "embshard.log"
# Around every piece of text a worker means for the console (a line, a progress-bar redraw); the
# driver shows what is inside and drops the rest of the line: a log handler may write on the same
# line as a redraw that has no newline yet. Control characters around a name: nothing else a
# worker prints contains them.
START, END = "\x1eembshard:", ":embshard\x1f"
_MARKED = re.compile(re.escape(START) + "(.*?)" + re.escape(END), re.DOTALL)
_HANDLER_NAME = "embshard_console"

_verbose = False
_current_log: Path | None = None
_workers_muted = False  # their lines to the run's log only


class Crashed(Exception):
    """A failure that is not bad input (a worker died, a bug), already summed up in one line;
    the details are in the chained exception and in the run's log."""


def set_verbose(verbose: bool) -> None:
    """The CLI's --verbose, for every verb that runs on Ray (read when a run starts)."""
    global _verbose
    _verbose = verbose


class _LevelFirst(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def log_to_console() -> None:
    """Outside a run (which logs to its file, `run_log`), the driver's log records as lines like
    its own: `warning: checkpoint …: skipped, …`. A library's import-time `logging.info`
    (FBGEMM's) gave the root logger basicConfig's handler, which printed
    `WARNING:embshard.trainer.checkpoint:…` above the one line that says the same."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setFormatter(_LevelFirst())


def is_verbose() -> bool:
    return _verbose


# Ray's log handlers in a worker write to whatever sys.stderr is when they emit: what a log
# handler writes is log, not console output.
_NOT_CONSOLE = {logging.__file__}


class _MarkedStream(io.TextIOBase):
    """Writes through to `inner`, each line or redraw between START and END, unless a log handler
    writes."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        if sys._getframe(1).f_code.co_filename in _NOT_CONSOLE:
            self.inner.write(text)
            return len(text)
        out = []
        # Ray forwards lines, and partial lines (a progress bar's "\r" redraws) as they come: no
        # marked piece may span a newline, and each redraw is a piece of its own.
        for piece in re.split(r"(?<=\n)|(?=\r)", text):
            body = piece.removesuffix("\n")
            if body:
                out.append(START + body + END)
            out.append(piece[len(body):])
        self.inner.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:  # tqdm asks for the terminal's width through it
        return self.inner.fileno()

    def isatty(self) -> bool:
        return False


def mark_console() -> None:
    """In a Ray worker process: from now on, what this process prints through sys.stdout and
    sys.stderr is console output. Idempotent (a restarted train function runs it again)."""
    if not isinstance(sys.stdout, _MarkedStream):
        sys.stdout = _MarkedStream(sys.stdout)
    if not isinstance(sys.stderr, _MarkedStream):
        sys.stderr = _MarkedStream(sys.stderr)


def _console_lines(lines: list[str]) -> list[str]:
    return ["".join(_MARKED.findall(line)) for line in lines if START in line]


def _unmarked(line: str) -> str:
    return line.replace(START, "").replace(END, "")


class _RayOutput:
    """The driver's handler for the lines Ray forwards from worker processes: all of them to the
    current run's log, the marked ones to the console (all of them with --verbose)."""

    def __init__(self, ray_print: Any) -> None:
        self.ray_print = ray_print  # Ray's own printer (prefixes, dedup), used with --verbose

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [_unmarked(line) for line in data.get("lines", [])]
        if _current_log is not None:
            who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
            _append(_current_log, "".join(f"{who} {line}\n" for line in lines))
        if _workers_muted:
            return
        if _verbose or _current_log is None:
            self.ray_print({**data, "lines": lines})
            return
        for line in _console_lines(data.get("lines", [])):
            _show(line, sys.stderr if data.get("is_err") else sys.stdout)


_bar_open: TextIO | None = None  # the terminal a progress bar is being redrawn on
_bar_lines: dict[TextIO, RedrawsAsLines] = {}  # where the bar is drawn in a log, not a terminal


def _show(line: str, sink: TextIO) -> None:
    """One forwarded console line. A progress bar's redraws ("\r...") stay on one line of a
    terminal: Ray hands each over as a line of its own, so the newline waits until something else
    is printed. In a log they become a line now and then (`RedrawsAsLines`)."""
    global _bar_open
    if line.startswith("\r") and not is_terminal(sink):
        _bar_lines.setdefault(sink, RedrawsAsLines(sink)).show(line)
        return
    for lines in _bar_lines.values():
        lines.flush()
    if _bar_open is not None and not line.startswith("\r"):
        _bar_open.write("\n")
        _bar_open.flush()
        _bar_open = None
    if line.startswith("\r"):
        sink.write(line)
        _bar_open = sink
    else:
        sink.write(line + "\n")
    sink.flush()


def _end_progress_line() -> None:
    """Ends a progress bar's line before the driver prints its own lines; in a log, writes the
    bar's last state."""
    global _bar_open
    if _bar_open is not None:
        _bar_open.write("\n")
        _bar_open.flush()
        _bar_open = None
    for lines in _bar_lines.values():
        lines.end()
    _bar_lines.clear()


class _RunLogHandler(logging.FileHandler):
    """The run log's handler. A record it cannot write (a full disk) is dropped: logging's
    default prints a traceback per record on stderr, a wall over the one line that says why."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextmanager
def run_log(output_dir: Path) -> Iterator[Path]:
    """Driver side, around a Ray run: Python logging (Ray's, Ray Train's, ours) goes to the run's
    log file, and to the console only with --verbose. Yields the log file's path."""
    global _current_log, _workers_muted
    path = output_dir / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    echo = None
    if _verbose:
        echo = logging.StreamHandler(sys.stderr)
        root.addHandler(echo)
    # Ray's loggers print to the console themselves, past the root logger: a failed Tune trial
    # was a wall of tracebacks above the one line that says what was wrong. They propagate to the
    # root logger for the run instead (its log, and the console with --verbose); ray.init, called
    # inside the run, clears their handlers, so a handler of ours on them would not stay.
    diverted = {name: _divert(logging.getLogger(name)) for name in _RAY_LOGGERS}
    # A library's import-time `logging.info` (FBGEMM's "Successfully loaded") gives the root logger
    # a stderr handler of basicConfig's; at the run's INFO level it printed Ray's INFO lines.
    root_console = [h for h in root.handlers
                    if h is not echo and getattr(h, "stream", None) in (sys.__stderr__, sys.__stdout__)]
    for h in root_console:
        root.removeHandler(h)
    _current_log = path
    _deaths.clear()  # an earlier run's in this process are not this one's
    _workers_muted = False
    try:
        yield path
    finally:
        _end_progress_line()
        for name, (own, propagate) in diverted.items():
            logger = logging.getLogger(name)
            logger.propagate = propagate
            for ray_handler in own:
                logger.addHandler(ray_handler)
        for ours in (handler, echo):
            if ours is not None:
                root.removeHandler(ours)
        for h in root_console:
            root.addHandler(h)
        handler.close()
        root.setLevel(old_level)


# Loggers of Ray that keep their own console handlers and do not propagate to the root logger.
_RAY_LOGGERS = ("ray", "ray.data")


def _divert(logger: logging.Logger) -> tuple[list[logging.Handler], bool]:
    """Takes `logger`'s console handlers off and lets it propagate; returns what to put back."""
    console: list[logging.Handler] = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                                      and not isinstance(h, logging.FileHandler)]
    for h in console:
        logger.removeHandler(h)
    propagate, logger.propagate = logger.propagate, True
    return console, propagate


def mute_workers() -> None:
    """The workers' lines go to the run's log alone from now on: the run has said its last line
    (an abort), and those that still arrive (an evaluation after "interrupted") would follow it."""
    global _workers_muted
    _workers_muted = True


def route_worker_output() -> None:
    """Driver side, after ray.init(log_to_driver=True): Ray's forwarded worker lines go through
    `_RayOutput` instead of straight to the console. Stays for the process' life, so lines that
    arrive after a run ended still reach its log."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    ray_print = getattr(ray_worker.print_to_stdstream, "ray_print", ray_worker.print_to_stdstream)
    output = _RayOutput(functools.partial(ray_print, ignore_prefix=False))
    # Ray registers its printer under this name; ours wraps it.
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(_HANDLER_NAME)
    dispatcher.add_handler(_HANDLER_NAME, output)

    # Ray's error listener thread prints the raylet's messages to the driver with
    # print_to_stdstream itself, past the dispatcher. One of them, "A worker died or was killed
    # ...", put 900 characters above the run's one line for that death: it goes to the log, and
    # its cause into that line (`worker_deaths`). Its note that more worker processes started
    # than it expects goes to the log alone. The others (a node lost, a task no node can take)
    # are printed as Ray prints them.
    def raylet_messages(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = data.get("lines", [])
        try:
            if not (_verbose or _current_log is None) and any(line.startswith(_WORKER_DIED) for line in lines):
                _worker_died(lines, _current_log)
                return
            if not (_verbose or _current_log is None) and any(_MANY_WORKERS in line for line in lines):
                _append(_current_log, "".join(f"(raylet) {line}\n" for line in lines))
                return
        except Exception:
            pass  # an error raised here would end Ray's listener thread: Ray's printer has it instead
        ray_print(data, *args, **kwargs)

    raylet_messages.ray_print = ray_print  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = raylet_messages


_WORKER_DIED = "A worker died or was killed"
# "WARNING: 10 PYTHON worker processes have been started on node ... This could be a result of
# ... fractional CPU requests": a sweep's, whose trials ask for a hundredth of a CPU each
# (sweep_run.TRIAL_CPU) and start a worker group each, as planned; a warning of nothing to mend.
_MANY_WORKERS = "worker processes have been started on node"
_EXIT = re.compile(r"Worker exit type: (?P<type>\S+) Worker exit detail: (?P<detail>.+?\.)(?: |$)")


_deaths: list[str] = []  # the causes Ray gave of the worker processes that died in the current run


def _worker_died(lines: list[str], log: Path) -> None:
    _append(log, "".join(f"(raylet) {line}\n" for line in lines))
    for line in (line for line in lines if line.startswith(_WORKER_DIED)):
        exit_ = _EXIT.search(line)
        _deaths.append(f"{exit_['type']}: {exit_['detail']}" if exit_ else "no cause given")


def worker_deaths() -> str:
    """For the run's one line of a crash: ' (Ray: a worker process died: CAUSE)' when Ray has said
    so by now (its message comes on a thread of its own, often before the failure, not always)."""
    return f" (Ray: a worker process died: {'; '.join(dict.fromkeys(_deaths))})" if _deaths else ""


def record_error(error: BaseException, worker_traceback: str | None = None) -> Path | None:
    """Appends the error's full traceback (or the worker's, where it was raised in another
    process) to the current run's log; returns the log (None when no run has a log yet)."""
    if _current_log is None:
        return None
    text = worker_traceback or "".join(traceback.format_exception(error))
    if not _append(_current_log, f"embshard: the run failed ({type(error).__name__}):\n{text}"):
        return None  # no log to point at: the caller shows the traceback itself
    return _current_log


def _append(log: Path, text: str) -> bool:
    """Appends to the run's log; False where the machine refused (a full disk, often the very
    error being logged), which must not raise on top of what is being reported."""
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        return False
    return True
