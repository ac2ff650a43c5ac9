"""An exclusive lock on a file that names the process holding it.

flock(2): the system lets the lock go when its process ends, so a killed process leaves no lock
behind (on NFSv4, once the server's lease on a lost client ends). The locked file holds its
holder's record (pid, host, boot, since, command), so whoever is refused can be told who holds it.
A file system that takes no locks is said, and the work goes on as before the locks.

Torch-, Ray- and config-free: run folders (cluster/run_lock.py) and every command's output
(datasets/outdir.py) lock with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embshard.errors import EmbshardError, EnvironmentProblem

COMMAND_SHOWN = 160

# Refused: the description of the holder -> the error to raise.
Busy = Callable[[str], EmbshardError]


def identity() -> dict[str, Any]:
    """This process, and the boot of its machine: two machines may share one host name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot": boot}


def holder_record() -> dict[str, Any]:
    """What a lock (or lease) taken now says of its holder."""
    return {**identity(), "since": time.time(), "command": " ".join(sys.argv)}


def record_of(raw: bytes) -> dict[str, Any]:
    """A lock's or lease's record; {} for one not yet written, or not JSON."""
    try:
        record = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict[str, Any]) -> str:
    """Who holds a lock or lease, as its record says."""
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["since"])))
        command = str(record["command"])
        # A Ray worker's command line is a thousand characters of flags.
        command = command if len(command) <= COMMAND_SHOWN else command[:COMMAND_SHOWN] + " ..."
        return f"pid {record['pid']} on {record['host']} since {since}: {command}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not said which yet"


def holder_of(fd: int) -> str:
    """Who holds the lock on the open file `fd`, as its record says."""
    return describe_holder(record_of(os.pread(fd, 65536, 0)))


@contextmanager
def locked(path: Path, busy: Busy, grace: float = 0.0) -> Iterator[None]:
    """The lock on the file `path` (created if missing) for the whole of the block, or busy(holder)
    raised once it has been held for `grace` seconds more; the file goes when the block ends."""
    fd = _take(path, busy, time.monotonic() + grace)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder_record()).encode())
        yield
    finally:
        if fd is not None:
            # Removed while still held: a process that opened the old file finds, once it has
            # the lock, that the path no longer names it, and tries again (`_take`). A folder
            # made read-only meanwhile keeps it: an unlocked file locks nothing, and the
            # unlink's error took the place of the block's own (a checkpoint's "Permission denied").
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            os.close(fd)


@contextmanager
def locked_folder(folder: Path, busy: Busy, grace: float = 0.0) -> Iterator[None]:
    """The lock on the folder itself for the whole of the block, or busy(holder) raised once it
    has been held for `grace` seconds more: where no file can be made beside it to hold a record
    of its holder (a mount point under a read-only root), so the holder goes unnamed."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            _flock(fd, time.monotonic() + grace)
        except BlockingIOError:
            raise busy("a process that a folder's lock cannot name") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def _flock(fd: int, deadline: float) -> None:
    """An exclusive lock on `fd`, waiting for its holder until `deadline` (time.monotonic());
    BlockingIOError once that has passed."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_SECONDS)


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_RETRY_SECONDS = 0.02
_said_no_locks: set[Path] = set()


def _take(path: Path, busy: Busy, deadline: float) -> int | None:
    """The locked file's descriptor (waiting for a holder until `deadline`, by time.monotonic());
    None where the file system has no locks to take."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file system that takes no files (/proc): a traceback
            raise EnvironmentProblem(f"{path.parent}: no file can be created there ({e.strerror})") from None
        try:
            _flock(fd, deadline)
        except BlockingIOError:
            holder = holder_of(fd)
            os.close(fd)
            raise busy(holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            # NFSv3 without a lock daemon, some FUSE mounts: the work went on there before the locks.
            path.unlink(missing_ok=True)
            if path.parent not in _said_no_locks:  # a command locks some folders twice (a check, then its work)
                _said_no_locks.add(path.parent)
                print(f"warning: {path.parent}: its file system takes no locks ({e.strerror}); nothing keeps a "
                      "second embshard process out of it", file=sys.stderr)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as it let go: lock the new one
