"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class EmbshardError(Exception):
    """Base class: the message says what was wrong and where."""


class ConfigError(EmbshardError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


class DataError(EmbshardError):
    """Input data is missing or malformed; the message names the file, column and row."""


class StorageError(EmbshardError):
    """Object storage refused or could not be reached (missing bucket, credentials, endpoint);
    the message names the URI."""


class PlanError(EmbshardError):
    """A dimension or shard plan cannot be built (infeasible budget, topology too small, ...)."""


class EnvironmentProblem(EmbshardError):
    """Where files go failed on the machine (a full disk, a read-only mount, a permission): the
    user fixes it there; retrying the same run would fail the same way."""


# OSErrors about where files go, which the user fixes on the machine: printed as one line.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                                errno.EBUSY, errno.EXDEV, errno.ELOOP})


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_SYMLINK_LOOP = re.compile(r"Symlink loop from '(?P<path>.*)'")


def environment_problem(e: BaseException) -> EnvironmentProblem | None:
    """`e` as one line naming the file, when it is an OSError of the machine about a file, or
    the machine running out of memory (numpy's `_ArrayMemoryError` is a MemoryError)."""
    if isinstance(e, MemoryError):
        return EnvironmentProblem(f"out of memory ({first_line(e)}): a larger machine, or less at once "
                                  "(fewer rows or tables, a smaller batch)")
    loop = _SYMLINK_LOOP.fullmatch(str(e)) if isinstance(e, RuntimeError) else None
    if loop:  # pathlib's resolve() in Python 3.11 (an OSError, ELOOP, from 3.13)
        return EnvironmentProblem(f"{loop['path']}: a loop of symbolic links")
    if not isinstance(e, OSError):
        return None
    if e.errno is None and _SHORT_WRITE.fullmatch(str(e)):
        # numpy's file writer says only this when the disk fills under it.
        return EnvironmentProblem(f"a file was written short ({e}): is the disk full?")
    if e.filename is None:
        # pyarrow's writers name no file; of what they raise, only a full or read-only disk is
        # surely the machine's (a permission error without a file could be a store's, retried).
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return EnvironmentProblem(f"{os.strerror(e.errno)} ({first_line(e)})")
        return None
    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else e.filename
    return EnvironmentProblem(f"{where}: {e.strerror}")


FULL_BYTES = 1 << 20  # less free than this, and a write that failed ran out of room


def disk_full(path: Path) -> int | None:
    """The bytes free where the file system holding `path` has next to no room left (else None):
    what a writer that says only "unexpected pos 704 vs 598" (torch.save) ran into."""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path).free
        if free < FULL_BYTES:
            return free
    return None


class TrainingDiverged(EmbshardError):
    """The loss became NaN or infinite: the run stops before it checkpoints, evaluates or reports
    the broken weights (a restart from the last checkpoint would only diverge again)."""


class RepeatedCrash(EmbshardError):
    """A worker's crash that came back unchanged after Ray restarted the worker group: a bug (in a
    model's code, a method's, the data's), not a lost worker, so restarting again would only repeat
    it (forever, under `max_failures: -1`)."""


class Interrupted(Exception):
    """Ctrl-C stopped a job cleanly (a checkpoint was written): the CLI prints it and exits 130.
    Not an EmbshardError: nothing was wrong with the input."""


TRACEBACK = "Traceback (most recent call last):"


class _Entry(Protocol):
    def is_dir(self) -> bool: ...
    def exists(self) -> bool: ...


def no_file(path: _Entry, what: str) -> str:
    """Why `path` (a local path or a bucket's), which is no regular file, is no `what` (a config
    file, a remap file): a folder or another kind of entry there said "not found"."""
    if path.is_dir():
        return f"a directory, not a {what}"
    return "not a regular file" if path.exists() else f"{what} not found"


# Characters of an error line past which it is cut: a value echoed whole (a list of 200,000
# entries from a file) made a line of 600 KB that no one reads.
LINE_LIMIT = 2_000


def one_line(text: str) -> str:
    """`text` as one console line: a line break shown as \\n (a name read from a file with one in
    it started a line of its own, which could read like another of embshard's), a long text cut."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(text) > LINE_LIMIT:
        text = f"{text[:LINE_LIMIT]} ... ({len(text) - LINE_LIMIT:,} more characters)"
    return text


def version_mismatch(version: Any, expected: int) -> str | None:
    """Why a file of format `version` is not one of format `expected` (None when it is): a newer
    embshard's (a dataset converted, a plan made, by an upgraded image) said as such."""
    if isinstance(version, int) and not isinstance(version, bool):  # True == 1 in Python
        if version == expected:
            return None
        if version > expected:
            return (f"version {version}, newer than this embshard reads ({expected}): written by a newer embshard; "
                    "upgrade embshard where it is read")
    return f"version {version!r}, expected {expected}"


_ITEM_CHARS = 200  # torch's "Missing key(s) in state_dict: ..." names every key on one line


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`: enough to act on, short enough for a one-line error.

    A message that carries another process's traceback (a Ray job server's HTTP 500 reply) starts
    with "Traceback (most recent call last):", which says nothing: the traceback's last line, the
    exception raised over there, takes its place. One that introduces a list (torch's "Error(s)
    in loading state_dict for DLRM:") keeps the list's first item."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    head = lines[0] if lines else ""
    if TRACEBACK in head and len(lines) > 1:
        head = f"{head.replace(TRACEBACK, '').strip()} {lines[-1]}".strip()
    elif head.endswith(":") and len(lines) > 1:
        item = lines[1] if len(lines[1]) <= _ITEM_CHARS else lines[1][:_ITEM_CHARS] + "…"
        head = f"{head} {item}"
    return f"{type(e).__name__}: {head}"
