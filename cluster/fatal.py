"""Bad input found inside a worker ends the run at once instead of being retried.

Ray Train's failure policy restarts the worker group after any worker error, up to
`cluster.max_failures` times (-1: forever), and its public API has no way to mark an error as
not retryable (`UserCallback.after_exception` only observes). An EmbshardError would fire again
identically on every restart, so the worker that raises one records it on the launch's board; a
restarted worker that finds the record returns without training, and the driver re-raises the
recorded error as its one console line.

Any other error may be a lost worker's (a collective whose peer died), which a restart mends, or a
bug, which a restart repeats. So the first is retried, and a crash that comes back after a restart
with the same error raised at the same place is recorded as final, the same way (`crashed`).

The board is a small actor the driver starts for each launch (`launch_board`), not a file: the
records were files in the run folder, and on a full disk (the error itself, often) none could be
written, so under `max_failures: -1` Ray restarted the group for ever, without a word.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import secrets
import traceback
from collections.abc import Iterator

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from embshard.errors import EmbshardError, RepeatedCrash, first_line
from embshard.trainer.reference import raised_at, users_frame

log = logging.getLogger(__name__)
BOARD_TIMEOUT_S = 60  # a board that does not answer is no board: the worker's own error goes on

_RECORD = "record"


@ray.remote(num_cpus=0)
class _Board:
    """A launch's records: what its workers report, for its restarted workers and its driver."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def put(self, key: str, text: str, keep_first: bool) -> str | None:
        """`text` under `key` (not over an earlier one, with `keep_first`); -> the earlier one."""
        before = self.entries.get(key)
        if before is None or not keep_first:
            self.entries[key] = text
        return before

    def get(self, key: str) -> str | None:
        return self.entries.get(key)


@contextlib.contextmanager
def launch_board() -> Iterator[str]:
    """The board of one launch, alive for the block: -> its name, which the workers are given (a
    launch's name is new, so records of earlier launches are never read)."""
    name = f"embshard-fatal-{secrets.token_hex(8)}"
    # On the driver's node: on a worker's, it would go with the node whose loss the restarts mend.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = _Board.options(name=name, scheduling_strategy=here).remote()  # type: ignore[attr-defined]
    try:
        yield name
    finally:
        with contextlib.suppress(RayError):
            ray.kill(board)


def _call(board: str, method: str, *args: object) -> str | None:
    """A call to the board; None where it cannot be reached (its driver gone), said in the log:
    the error being recorded still ends its worker, and unrecorded, Ray may restart the group."""
    try:
        return ray.get(getattr(ray.get_actor(board), method).remote(*args), timeout=BOARD_TIMEOUT_S)
    except (RayError, ValueError) as e:  # ValueError: no actor of that name
        log.warning("the launch's board %s cannot be reached (%s)", board, first_line(e))
        return None


def record(board: str, error: EmbshardError) -> None:
    """Save `error` for this launch: its class (to re-raise the same one), message and traceback
    (for whoever debugs it; the driver's re-raised copy has none). The first rank's record stays."""
    cls = type(error)
    text = json.dumps({"module": cls.__module__, "class": cls.__qualname__, "message": str(error),
                       "traceback": "".join(traceback.format_exception(error))})
    _call(board, "put", _RECORD, text, True)


def crashed(board: str, rank: int, error: BaseException) -> None:
    """A crash that is not bad input, on `rank`: if this rank's previous worker group of this
    launch crashed with the same error raised at the same place, it is recorded as final (a
    `RepeatedCrash`); else it is kept for the next group to compare with. Only an error raised
    in a user's code (a model's forward, a method's callback) and outside torch.distributed and
    Ray is compared: a lost peer's echo in a collective ("Timed out waiting 1800000ms for recv")
    reads the same after every loss of a node, and a restart mends it."""
    frames = [(f.filename, f.lineno or 0) for f in traceback.extract_tb(error.__traceback__)]
    if isinstance(error, RayError) or not users_frame(frames) or any(
            "/torch/distributed/" in file for file, _ in frames):
        return
    signature = hashlib.sha256(repr((type(error).__qualname__, str(error), frames)).encode()).hexdigest()
    if _call(board, "put", f"crash-{rank}", signature, False) == signature:
        record(board, RepeatedCrash(f"rank {rank}: {first_line(error)}{raised_at(error)}; raised again the same way "
                                    "after Ray restarted the worker group, so it is not retried (a bug, not a lost "
                                    "worker)"))


def _saved(board: str) -> dict[str, str] | None:
    text = _call(board, "get", _RECORD)
    return json.loads(text) if text else None


def worker_traceback(board: str) -> str | None:
    """The recording worker's traceback, for the run's log (the console shows one line)."""
    saved = _saved(board)
    return saved["traceback"] if saved else None


def recorded(board: str) -> EmbshardError | None:
    """The error a worker of this launch recorded, rebuilt as the same EmbshardError subclass."""
    saved = _saved(board)
    if saved is None:
        return None
    cls = getattr(importlib.import_module(saved["module"]), saved["class"], None)
    # The record is only ever written from an EmbshardError; anything else is not ours to build.
    if not (isinstance(cls, type) and issubclass(cls, EmbshardError)):
        cls = EmbshardError
    return cls(saved["message"])
