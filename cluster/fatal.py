"""Bad input found inside a worker ends the run at once instead of being retried.

Ray Train's failure policy restarts the worker group after any worker error, up to
`cluster.max_failures` times (-1: forever), and its public API has no way to mark an error as
not retryable (`UserCallback.after_exception` only observes). An EmbshardError would fire again
identically on every restart, so the worker that raises one records it under the run folder,
keyed by a token the driver makes per launch; a restarted worker that finds the record returns
without training, and the driver re-raises the recorded error as its one console line.

Any other error may be a lost worker's (a collective whose peer died), which a restart mends, or a
bug, which a restart repeats. So the first is retried, and a crash that comes back after a restart
with the same error raised at the same place is recorded as final, the same way (`crashed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import secrets
import traceback
from pathlib import Path

from embshard.errors import EmbshardError, RepeatedCrash, first_line
from embshard.trainer.reference import raised_at

FATAL_DIR = "fatal"  # under the run's output_dir, which every worker shares (the plan is there)


def new_token() -> str:
    """A launch's key: records of earlier launches into the same folder never match it."""
    return secrets.token_hex(8)


def _path(output_dir: Path, token: str) -> Path:
    return output_dir / FATAL_DIR / f"{token}.json"


def record(output_dir: Path, token: str, error: EmbshardError) -> None:
    """Save `error` for this launch: its class (to re-raise the same one), message and traceback
    (for whoever debugs it; the driver's re-raised copy has none). The first rank's record stays."""
    path = _path(output_dir, token)
    if path.is_file():
        return
    cls = type(error)
    text = json.dumps({"module": cls.__module__, "class": cls.__qualname__, "message": str(error),
                       "traceback": "".join(traceback.format_exception(error))})
    _write(path, text)


def _write(path: Path, text: str) -> None:
    # Ranks may record at once: each writes its own temporary file, and the rename is atomic.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        # The run folder cannot take it (a full disk, the error itself, often): the error still
        # ends this worker; unrecorded, Ray may restart the group, which fails the same way.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def crashed(output_dir: Path, token: str, rank: int, error: BaseException) -> None:
    """A crash that is not bad input, on `rank`: if this rank's previous worker group of this
    launch crashed with the same error raised at the same place, it is recorded as final (a
    `RepeatedCrash`); else it is kept for the next group to compare with. A lost peer's echo
    (a collective's error) names addresses and ports that differ between groups."""
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
    signature = hashlib.sha256(repr((type(error).__qualname__, str(error), frames)).encode()).hexdigest()
    path = output_dir / FATAL_DIR / f"{token}.rank{rank}.crash"
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == signature:
            record(output_dir, token, RepeatedCrash(
                f"rank {rank}: {first_line(error)}{raised_at(error)}; raised again the same way after Ray "
                "restarted the worker group, so it is not retried (a bug, not a lost worker)"))
            return
    _write(path, signature)


def _saved(output_dir: Path, token: str) -> dict[str, str] | None:
    path = _path(output_dir, token)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def worker_traceback(output_dir: Path, token: str) -> str | None:
    """The recording worker's traceback, for the run's log (the console shows one line)."""
    saved = _saved(output_dir, token)
    return saved["traceback"] if saved else None


def recorded(output_dir: Path, token: str) -> EmbshardError | None:
    """The error a worker of this launch recorded, rebuilt as the same EmbshardError subclass."""
    saved = _saved(output_dir, token)
    if saved is None:
        return None
    cls = getattr(importlib.import_module(saved["module"]), saved["class"], None)
    # The record is only ever written from an EmbshardError; anything else is not ours to build.
    if not (isinstance(cls, type) and issubclass(cls, EmbshardError)):
        cls = EmbshardError
    return cls(saved["message"])
