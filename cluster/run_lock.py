"""One embshard run per folder at a time.

Two runs on one output_dir (a command started twice, a rerun while the first still trains)
resumed from each other's checkpoints, pruned each other's saves in progress, set each other's
checkpoints aside as superseded, shared the stop-request file (a Ctrl-C of one stopped the
other) and printed each other's summary. So a run holds an exclusive lock on its output_dir,
and on its local checkpoint folder (another run may name it as its own), from its planning to
its end; a second run is refused with one line naming the first. A checkpoint folder in a bucket,
which has no lock, has a lease instead (run_lease.py).

The lock is one on a file in the folder (embshard/process_locks.py): a killed run leaves none
behind.

The workers outlive a driver killed with SIGKILL by a few seconds, long enough to publish a
checkpoint and prune older ones in a folder a rerun has already taken; so each worker checks
before it writes and before it publishes that the run it started under still holds the
locks and leases (`run_owner` on the driver, `owner_check` on the workers).

A run writes its plan, summary, checkpoints, logs and Ray storage into its output_dir under fixed
names, and replaced whatever held those names: a user's `plan/plan.json` beside their notes, in
a folder named by mistake, was gone without a word. So a run takes an output_dir that is new,
empty, or an embshard run's, and marks it (`RUN_MARKER`) as it starts (`claimed_run_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from embshard.cluster.run_lease import check_leases, held_leases, run_lease
from embshard.config import JobConfig, path_values
from embshard.datasets.outdir import writer_lock
from embshard.datasets.storage import RemotePath, location, nearest_existing
from embshard.errors import ConfigError, EmbshardError, EnvironmentProblem
from embshard.process_locks import holder_of, identity, locked, record_of
from embshard.sealed_folders import RUN_MARKER

LOCK_FILE = ".embshard-run.lock"
_MARKER_TEXT = "This folder is an embshard run's output_dir: its runs write and replace files here.\n"

# What embshard wrote into an output_dir before runs marked theirs: such a folder is taken as a
# run's, and marked. Frozen: the marker covers whatever a run writes now (`written_by_a_run`).
_UNMARKED_RUN_ENTRIES = frozenset({
    LOCK_FILE, "plan", "summary.json", "checkpoints", "logs", "ray", "worker_group_starts", "stop-requested",
    "crash-injected", "fatal", "pep", "decisions.json", "alpha_history.jsonl", "search", "sweep", "sweep-check",
    "sweeps", "file_sd.json", "lottery",
})


# Rank 0's word that the worker group is placed (`cluster.launch`).
WORKERS_PLACED_FILE = "workers_placed"


def written_by_a_run(cfg: JobConfig, path: Path) -> Path | None:
    """The file or folder of cfg's run (in its output_dir, or its checkpoint.dir) that holds
    `path`, or is it; None where the run writes nothing there."""
    path = path.resolve()
    folder = Path(cfg.output_dir).resolve()
    checkpoints = location(cfg.checkpoint_dir)
    if isinstance(checkpoints, Path) and path.is_relative_to(checkpoints.resolve()):
        return checkpoints.resolve()
    if path.is_relative_to(folder) and path != folder:
        entry = path.relative_to(folder).parts[0]
        if entry in _UNMARKED_RUN_ENTRIES | {RUN_MARKER, WORKERS_PLACED_FILE}:
            return folder / entry
    return None


class FolderInUse(ConfigError):
    """Another embshard process holds the folder's lock."""


class RunEnded(EmbshardError):
    """The run a worker started under no longer holds its folder."""


@contextmanager
def run_lock(cfg: JobConfig, also: list[Path] | None = None) -> Iterator[None]:
    """The run's folders locked for the whole of the block (see the module docstring): its
    output_dir, its checkpoint folder, which another run may name as its own (in a bucket: its
    lease), `also`, and the Prometheus target list it writes (metrics.file_sd)."""
    folders = [Path(cfg.output_dir), *(also or [])]
    if cfg.checkpoint.enabled and isinstance(cfg.checkpoint_dir, Path):
        folders.append(cfg.checkpoint_dir)
    with ExitStack() as stack:
        output, *others = dict.fromkeys(f.resolve() for f in folders)  # one folder by two names, once
        stack.enter_context(folder_lock(output))
        # Let go after the folders inside it (the checkpoints'), so an unused marker can go too.
        stack.enter_context(claimed_run_folder(cfg, output))
        for folder in others:
            stack.enter_context(folder_lock(folder))
        if cfg.metrics.enabled and cfg.metrics.file_sd:
            # One run's list: a second run there replaced the first's targets, then removed the file
            # as it ended while the first still served, unscraped for the rest of its run.
            try:
                stack.enter_context(file_lock(Path(cfg.metrics.file_sd)))
            except FolderInUse as e:
                raise FolderInUse(f"metrics.file_sd {e} (a Prometheus target list is one run's)") from None
            except (OSError, EnvironmentProblem):
                # A Ray Client driver's list is a path on the cluster's machines, where rank 0 writes
                # it: not this machine's to lock. Any other run's is refused here, before Ray starts.
                if not (cfg.cluster.address or "").startswith("ray://"):
                    raise
        if cfg.checkpoint.enabled and isinstance(cfg.checkpoint_dir, RemotePath):
            # torch: only for a run that checkpoints to a bucket.
            from embshard.trainer.checkpoint_integrity import check_checkpoint_io

            check_checkpoint_io(cfg.checkpoint_dir, "checkpoint.dir")  # a store no client reaches, said as such
            stack.enter_context(run_lease(cfg.checkpoint_dir, identity()))
        yield


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (created if missing, and removed again if the block left it
    empty), or FolderInUse naming the process that holds it."""
    folder = folder.absolute()
    with _made(folder), locked(folder / LOCK_FILE, _in_use(folder)):
        yield


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """`path`, a file a run writes outside its output_dir, locked against a second writer as every
    command's --out is (`writer_lock`); its folder created if missing, and removed again if the
    block left it empty. Locking the folder kept out a second run writing another file there."""
    path = path.absolute()
    with _made(path.parent), writer_lock(path, FolderInUse):
        yield


@contextmanager
def _made(folder: Path) -> Iterator[None]:
    """`folder` created if missing for the block, and removed again (with the parents it made)
    if the block left it empty."""
    created = _make(folder)
    try:
        yield
    finally:
        for made in created:
            try:
                made.rmdir()  # only where the block wrote nothing
            except OSError:
                break


def _in_use(folder: Path) -> Callable[[str], FolderInUse]:
    return lambda holder: FolderInUse(f"{folder}: another embshard run is using it ({holder}); wait for it to "
                                      "end, or give this one another folder")


def run_folder_holding(path: Path) -> Path | None:
    """The nearest folder at or above `path` that a run marked as its output_dir; None if none."""
    path = path.resolve()  # `..` walked by text named the folder the command ran in
    return next((folder for folder in (path, *path.parents) if (folder / RUN_MARKER).is_file()), None)


@contextmanager
def claimed_run_folder(cfg: JobConfig, folder: Path) -> Iterator[None]:
    """`folder` (cfg's output_dir, locked by this run) marked as a run's for the block; ConfigError
    when it holds what no run wrote. A block that wrote nothing there leaves it as it found it."""
    marker = folder / RUN_MARKER
    # A file where a run's folder goes was "File exists" (plan, logs) or a crash in Ray's
    # controller (ray), after the plan; checkpoints/ is said so as the lock makes it.
    for name in ("plan", "logs", *(() if cfg.cluster.storage else ("ray",))):
        if ((folder / name).exists() or (folder / name).is_symlink()) and not (folder / name).is_dir():
            raise ConfigError(f"{folder / name}: a file is there, not a folder; a run writes its {name} folder "
                              "there: move the file away, or give the run another output_dir")
    if not marker.exists():
        foreign = _not_a_runs(cfg, folder)
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise ConfigError(
                f"output_dir: {folder} holds files that are not an embshard run's ({shown}); a run writes its "
                "plan, checkpoints and logs there under fixed names: give it a new or empty folder (or, if an "
                f"embshard run wrote them, create {marker} to say so)")
        marker.write_text(_MARKER_TEXT)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if {p.name for p in folder.iterdir()} <= {RUN_MARKER, LOCK_FILE}:
                marker.unlink()


def _not_a_runs(cfg: JobConfig, folder: Path) -> list[str]:
    """The entries of an unmarked `folder` that no run wrote, sorted; none for a run folder of an
    embshard from before the marker (its plan beside its log or summary: other runs' folders it
    held, as a PEP retrain's, were the user's choice). Hidden entries (an interrupted write's
    staging file, NFS's .nfs*, rsync's) and what cfg's own paths name there (a plan file, a
    checkpoint folder) are not counted."""
    names = {p.name for p in folder.iterdir()}
    if (folder / "plan" / "plan.json").is_file() and ({"logs", "summary.json"} & names):
        return []
    inputs = set()
    for value in path_values(cfg):
        path = location(value)
        if isinstance(path, Path) and path.resolve().is_relative_to(folder) and path.resolve() != folder:
            inputs.add(path.resolve().relative_to(folder).parts[0])
    return sorted(n for n in names if not n.startswith(".") and n not in _UNMARKED_RUN_ENTRIES and n not in inputs)


def _make(folder: Path) -> list[Path]:
    """Creates `folder` and any missing parents; -> those it created, deepest first."""
    existing = nearest_existing(folder)
    missing = [at for at in [folder, *folder.parents] if at.is_relative_to(existing) and at != existing]
    if not existing.is_dir():
        # mkdir's own word was "File exists" of the very folder named, or "Not a directory".
        below = f" (so {folder} cannot be made)" if existing != folder else ""
        raise ConfigError(f"{existing}: a file is there, not a folder{below}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as e:  # its parents are there: the file system takes no folder here (/proc)
        raise EnvironmentProblem(f"{folder}: no folder can be created there ({e.strerror})") from None
    return missing


def run_owner(folders: list[Path | RemotePath]) -> dict[str, Any] | None:
    """The locks (and, of folders in a bucket, the leases) this process holds on `folders`, as
    their records say (a folder on a file system without locks has none), for its workers'
    `owner_check`; None for none."""
    me = identity()
    held = {}
    for folder in (f for f in folders if isinstance(f, Path)):
        try:
            record = record_of((folder / LOCK_FILE).read_bytes())
        except OSError:
            continue
        if _same(record, me, ("pid", "host", "boot")):
            held[str(folder.absolute())] = record
    leases = held_leases([f for f in folders if isinstance(f, RemotePath)], me)
    return {"folders": held, "leases": leases} if held or leases else None


def owner_check(owner: dict[str, Any] | None) -> Callable[[], None] | None:
    """For a worker to call before it writes or publishes a checkpoint: raises RunEnded once the
    run `owner` (its driver's `run_owner`) has let a folder go, died, or given it to a rerun."""
    if not owner:
        return None

    def check() -> None:
        check_leases(owner.get("leases", {}))
        for folder, record in owner["folders"].items():
            try:
                fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
            except FileNotFoundError:
                raise RunEnded(f"{folder}: the run this worker started under has ended; nothing more is "
                               "written") from None
            try:
                _check_held(Path(folder), fd, record)
            finally:
                os.close(fd)

    return check


def _check_held(folder: Path, fd: int, record: dict[str, Any]) -> None:
    # The lock taken anew (a rerun, even by the same process) has another record.
    if not _same(record_of(os.pread(fd, 65536, 0)), record, ("pid", "host", "boot", "since")):
        raise RunEnded(f"{folder}: the run this worker started under has ended, and another holds it "
                       f"({holder_of(fd)}); nothing more is written")
    if not _same(record, identity(), ("host", "boot")):
        # A worker on another machine: some mounts lock only within one (NFS with
        # local_lock=flock, Lustre's localflock), where a free lock says nothing of the driver's.
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return  # held, by the process its record names (or there is no telling: go on)
    fcntl.flock(fd, fcntl.LOCK_UN)
    raise RunEnded(f"{folder}: the run this worker started under was killed (its lock is free); nothing more "
                   "is written")


def _same(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return all(a.get(k) == b.get(k) for k in keys)
