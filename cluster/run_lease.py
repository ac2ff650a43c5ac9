"""One embshard run per object-store checkpoint folder at a time: a lease, where a bucket has no
lock to take.

Two runs naming one `checkpoint.dir` in a bucket (two clusters launched from one config, a rerun
on another machine while the first still trains) resumed from each other's checkpoints and pruned
each other's saves; only the output_dir, which is local to each driver, had kept runs apart. So a
run holds a lease on such a folder: an object, `.embshard-run.lease`, naming the run and renewed
every LEASE_BEAT_SECONDS by a thread of its driver.

A run that finds another's lease watches it for LAPSE_BEATS beats: renewed meanwhile, it is
refused with one line naming the holder; not renewed (its driver was killed), the lease has
lapsed and is taken. No clock is compared: machines' clocks may disagree, a renewal does not. Two
runs starting within a second of each other may both write a lease (a store has no atomic
read-and-write here); one of them then finds the other's record at a renewal or as its workers
check before each checkpoint they write, and ends there, writing nothing more (`check_leases`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from embshard.datasets.storage import RemotePath, StoragePath, location
from embshard.errors import ConfigError, EmbshardError
from embshard.process_locks import describe_holder, holder_record, record_of

LEASE_FILE = ".embshard-run.lease"
LEASE_BEAT_SECONDS = 10.0
# A lease not renewed for this many beats is a killed run's: well past a renewal's own retries of
# the store (storage.DEFAULT_RETRY_SECONDS, 30 s), so a live run in a network hiccup keeps it.
LAPSE_BEATS = 6
SETTLE_SECONDS = 1.0  # between writing a lease and reading it back: another start's write shows by then


class LeaseHeld(ConfigError):
    """Another run renews its lease on the folder."""


class LeaseLost(EmbshardError):
    """The run a worker started under no longer holds its folder's lease."""


@contextmanager
def run_lease(folder: RemotePath, identity: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The folder's lease for the whole of the block, renewed meanwhile; -> its record (`run` names
    this run). LeaseHeld when another run renews one there."""
    folder.check_bucket()  # a missing bucket named as the folder, not as the lease in it
    path = folder / LEASE_FILE
    _wait_for_lapse(folder, path)
    record = {**holder_record(), **identity, "run": uuid.uuid4().hex, "beat": 0}
    path.write_text(json.dumps(record))
    stop = threading.Event()
    renewing = threading.Thread(target=_renew, args=(path, dict(record), stop), name="embshard-lease", daemon=True)
    try:  # from here a Ctrl-C lets the lease go too, rather than leave the next run to wait it out
        time.sleep(SETTLE_SECONDS)
        if _read(path).get("run") != record["run"]:
            raise LeaseHeld(f"{folder}: another embshard run took it as this one started "
                            f"({describe_holder(_read(path))}); give this one another checkpoint.dir")
        renewing.start()
        yield record
    finally:
        stop.set()
        if renewing.is_alive():
            renewing.join()
        try:
            if _read(path).get("run") == record["run"]:
                path.unlink()
        except (OSError, EmbshardError):
            pass  # left to lapse (the next run waits LAPSE_BEATS beats for it); the run's own error stands


def held_leases(folders: list[RemotePath], identity: dict[str, Any]) -> dict[str, str]:
    """Of `folders`, those whose lease this process (`identity`) holds: folder URI -> its run id."""
    held = {}
    for folder in folders:
        record = _read(folder / LEASE_FILE)
        if record and all(record.get(k) == v for k, v in identity.items()):
            held[str(folder)] = record["run"]
    return held


def check_leases(held: dict[str, str]) -> None:
    """For a worker to call before it writes or publishes a checkpoint: LeaseLost once a lease of
    `held` (`held_leases` of its driver) names another run, or none."""
    for folder, run in held.items():
        now = _read(location(folder) / LEASE_FILE)
        if now.get("run") != run:
            taken = f"another holds it ({describe_holder(now)})" if now else "it was let go"
            raise LeaseLost(f"{folder}: the run this worker started under no longer holds its lease: {taken}; "
                            "nothing more is written")


def _wait_for_lapse(folder: RemotePath, path: RemotePath) -> None:
    first = _read(path)
    if not first:
        return
    wait = LEASE_BEAT_SECONDS * LAPSE_BEATS
    print(f"note: {folder}: another run's lease is there ({describe_holder(first)}); watching it for {wait:.0f} s "
          "to tell a live run from a killed one", file=sys.stderr)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(min(LEASE_BEAT_SECONDS / 2, max(deadline - time.monotonic(), 0)))
        now = _read(path)
        if not now:
            return  # let go meanwhile
        if (now.get("run"), now.get("beat")) != (first.get("run"), first.get("beat")):
            raise LeaseHeld(f"{folder}: another embshard run is using it ({describe_holder(now)}; its lease is renewed "
                            f"every {LEASE_BEAT_SECONDS:.0f} s); wait for it to end, or give this one another "
                            "checkpoint.dir")


def _renew(path: RemotePath, record: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(LEASE_BEAT_SECONDS):
        try:
            now = _read(path)
            if now and now.get("run") != record["run"]:
                # Taken by a run that started with this one: its workers stop at their next checkpoint.
                print(f"warning: {path.parent}: another run took this run's lease; this run ends at its next "
                      "checkpoint", file=sys.stderr)
                return
            record["beat"] += 1
            path.write_text(json.dumps(record))  # also where it was deleted meanwhile: it is still this run's
        except (OSError, EmbshardError):
            continue  # the store, for a moment: the lease lapses only after LAPSE_BEATS of these


def _read(path: StoragePath) -> dict[str, Any]:
    """A lease's record; {} for none (or a damaged one, which no live run renews)."""
    try:
        return record_of(path.read_bytes())
    except FileNotFoundError:
        return {}
