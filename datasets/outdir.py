"""Replacing a dataset folder all at once.

A dataset is written into a staging folder beside its destination (same parent, so the final
rename stays on one file system and is atomic) and renamed into place only once it is complete,
profile included. A failed run removes its staging folder and leaves the destination as it was.

An object-store destination (`s3://bucket/prefix`) has no rename: the dataset is staged in a
local temporary folder, uploaded when complete to a staging prefix beside the destination, and
copied into place inside the store, dataset.json last each time, so a prefix holds a dataset.json
only once every part file is in place (readers refuse a prefix without one). An earlier dataset
there (with --overwrite) is removed only once the new one is complete in the store, dataset.json
first; if the final copy fails, the staging prefix still holds the complete new dataset.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs

from embshard.datasets.schema import (
    ITEMS_DIR,
    PART_PATTERN,
    PROFILE_DIR,
    PROFILE_FILE,
    SPEC_FILE,
    SPLITS,
    VOCAB_DIR,
    DatasetSpec,
    is_vocabulary_entry,
)
from embshard.datasets.storage import (
    RemotePath,
    StoragePath,
    check_writable,
    left_by_the_dead,
    nearest_existing,
    read_json_object,
    rmtree,
    sibling,
    sibling_pid,
    sibling_prefix,
    upload,
)
from embshard.errors import DataError, EmbshardError, EnvironmentProblem, Interrupted
from embshard.process_locks import locked, locked_folder
from embshard.sealed_folders import (
    CHECKPOINT_KEYS,
    CHECKPOINT_MANIFEST,
    RUN_MARKER,
    RUN_PLAN_DIR,
    SERVING_KEYS,
    SERVING_MANIFEST,
    is_step_name,
)
from embshard.stops import stops_held


@dataclass(frozen=True)
class Replaceable:
    """What --overwrite may replace: a folder that holds one of these and nothing else. An
    --overwrite pointed at the wrong folder (a home directory, a checkout, another tool's folder
    with a file of the same name) must not wipe it."""

    what: str  # "dataset"
    marker: str  # the file that makes a folder one, written last
    # Whether an entry of the folder, as the names of its path within it (("train",
    # "part-00000.parquet")), is part of one, given what `read` made of its marker: a user's file
    # anywhere inside is never replaced.
    holds: Callable[[tuple[str, ...], Any], bool]
    read: Callable[[StoragePath], object]  # reads the marker; an EmbshardError if it is none
    error: type[EmbshardError] = DataError  # what a refusal raises


# What a `data profile` killed mid-swap (or mid-write: its lock file) leaves in a dataset folder.
_PROFILE_LEFTOVERS = (f".{PROFILE_DIR}.partial-", f".{PROFILE_DIR}.old-", f".{PROFILE_DIR}.lock")


def dataset_holds(parts: tuple[str, ...], spec: object = None) -> bool:
    """What a dataset folder holds: dataset.json, part files in its splits and item catalog, a
    converter's vocabularies, and count files in its profile (or in what a killed `data profile`
    left)."""
    top, rest = parts[0], parts[1:]
    if top == SPEC_FILE:
        return not rest
    if top in (*SPLITS, ITEMS_DIR):
        return not rest or (len(rest) == 1 and fnmatch.fnmatchcase(rest[0], PART_PATTERN))
    if top == VOCAB_DIR:
        return is_vocabulary_entry(parts)
    if top == PROFILE_DIR or top.startswith(_PROFILE_LEFTOVERS):
        return not rest or (len(rest) == 1 and (rest[0] == PROFILE_FILE or rest[0].endswith(".npy")))
    return False


DATASET = Replaceable("dataset", SPEC_FILE, dataset_holds, DatasetSpec.load)


def check_not_in_sealed(out: StoragePath, what: str, error: type[EmbshardError] = DataError,
                        itself: bool = False, plan_file: bool = False) -> None:
    """Raises when `out` lies inside a folder that holds its writer's files alone (or, with
    `itself`, is one): a dataset, a checkpoint's step, an export, a run's plan folder (unless `out`
    is a `plan_file`, which is the plan folder's own). In a dataset a folder is no part
    of it, which `--overwrite` then never replaces ('holds 'sub', which no dataset holds'), and
    inside a split it sits among the part files; a plan written into a checkpoint's step replaced
    its plan.json, and the step never verified again; an export in a run's plan folder was copied
    into each of its checkpoints."""
    folders: list[StoragePath] = []
    if isinstance(out, RemotePath):
        prefix = out if itself else out.parent
        while "/" in prefix.path:  # up to the bucket's top level
            folders.append(prefix)
            prefix = prefix.parent
    else:
        # Resolved too: through a link into a dataset, a folder landed inside it all the same.
        # Normalised: `export/../new` was "inside the export".
        for path in dict.fromkeys([Path(os.path.normpath(out.absolute())), out.resolve()]):
            folders += [path, *path.parents] if itself else list(path.parents)
    for folder in folders:
        sealed = _sealed_as(folder, plan_file)
        if sealed:
            where = out.absolute() if isinstance(out, Path) else out
            raise error(f"{what} {where}: inside the {sealed} {folder}, which holds its own files alone; "
                        "write it elsewhere")


def _check_not_a_step(out: StoragePath, error: type[EmbshardError]) -> None:
    """Raises when `out` is named as a step among the steps of a checkpoint directory: the run
    saving there took an export written as `ckpt/step-000099` for one of its steps, and its
    pruning deleted it. Exports named by their steps in a folder of exports are no steps."""
    if not is_step_name(out.name) or not out.parent.is_dir():
        return
    steps = sorted(e.name for e in out.parent.iterdir() if is_step_name(e.name) and e.name != out.name
                   and (e / CHECKPOINT_MANIFEST).is_file())
    if steps:
        raise error(f"{out}: named as a checkpoint's step, among the steps of {out.parent} ({steps[0]}): a run "
                    "saving there would take it for one and delete it; name it otherwise or write it elsewhere")


def _sealed_as(folder: StoragePath, plan_file: bool = False) -> str | None:
    """What `folder` is, if it holds its writer's files alone: a step by its name, or by its
    manifest where it was copied out of its run; a run's plan folder, except to a `plan_file`.
    Another tool's dataset.json, manifest.json or serving.json, or a damaged one, is not ours to
    keep whole."""
    if is_step_name(folder.name):
        return "checkpoint step"
    if not plan_file and folder.name == RUN_PLAN_DIR and (folder.parent / RUN_MARKER).is_file():
        return "plan folder of a run (every checkpoint of that run copies it)"
    for marker, what, read in ((SPEC_FILE, "dataset", DatasetSpec.load),
                               (CHECKPOINT_MANIFEST, "checkpoint step", lambda f: read_json_object(
                                   f / CHECKPOINT_MANIFEST, CHECKPOINT_KEYS, DataError)),
                               (SERVING_MANIFEST, "export", lambda f: read_json_object(
                                   f / SERVING_MANIFEST, SERVING_KEYS, DataError))):
        if (folder / marker).is_file():
            try:
                read(folder)
            except EmbshardError:
                continue
            return what
    return None


def check_output(out: StoragePath, overwrite: bool, kind: Replaceable = DATASET, staging: Path | None = None) -> None:
    """Raises unless `out` is absent, empty, or (with overwrite) an earlier `kind`, and outside
    any dataset, checkpoint step or export (`check_not_in_sealed`). `staging`: the writer's own
    staging folder, which `make_staging` may have put inside `out`, and which counts for nothing."""
    if isinstance(out, RemotePath):
        if staging is None:  # else this process holds the lock; first, as the local check says it
            _check_no_other_writer(out, kind.error)
        _check_remote_output(out, overwrite, kind)
        return
    check_not_in_sealed(out, "--out", kind.error)
    _check_not_a_step(out, kind.error)
    for i, part in enumerate(out.parts):
        # `new/..`: checked as a folder that does not exist, then, once `new` was made for the
        # staging folder, replaced as the one above it (refused only after the work).
        if part == ".." and not Path(*out.parts[:i]).is_dir():
            raise kind.error(f"{out}: goes up ('..') from {Path(*out.parts[:i])}, which does not exist; name the "
                             "folder without '..'")
    if out.name == "..":
        # Its staging folder and lock go beside it by name: `d/train/..` put them inside `d/train`,
        # and the dataset `d` was then refused as holding a '....lock' of no dataset's.
        raise kind.error(f"{out}: ends in '..'; name the folder itself ({os.path.normpath(out.absolute())})")
    if out.is_symlink():
        # Renaming would move the link, not the dataset it points to.
        raise kind.error(f"{out}: a symbolic link; give the folder it points to ({out.resolve()})")
    if staging is None:  # else this process holds the lock
        _check_no_other_writer(out.absolute(), kind.error)
    if not out.exists():
        _check_creatable(out, kind.error)
        return
    if not out.is_dir():
        raise kind.error(f"{out}: exists and is not a directory")
    # Absolute: a relative --out listed relative entries, and the writer's own staging folder
    # inside it, absolute, was then a leftover ("holds only .e1.partial-..." after the work).
    folder = out.absolute()
    in_place = staging is not None and staging.parent == folder or _fills_in_place(folder)
    if not in_place and not os.access(folder.parent, os.W_OK | os.X_OK):
        # It is replaced by renaming a staging folder beside it: said now, not after the work.
        raise kind.error(f"{out}: cannot be replaced: no permission to write in {folder.parent}")
    cwd, real = Path.cwd(), out.resolve()
    if cwd.is_relative_to(real) and not (in_place and cwd == real):
        # Renamed away, or (filled in place) the folder within it moved aside and deleted: this
        # shell would be left in a deleted folder.
        raise kind.error(f"{out}: holds the current directory; run from outside it or name a new folder")
    entries = [e for e in folder.iterdir() if e != staging]
    if not entries:
        return
    _check_left_inside(folder, entries, kind)
    _check_replaceable(folder, overwrite, kind, staging)  # absolute: `_foreign` of `.` cut names short


def _check_no_other_writer(out: StoragePath, error: type[EmbshardError]) -> None:
    """`error` when another process writes `out` now: said before the work, not once it is
    done, and not as "holds no dataset.json" of a folder that holds that writer's staging folder.
    Where no lock can be taken yet (no folder above), the checks that follow say why."""
    if isinstance(out, RemotePath) or out.parent.is_dir():
        with contextlib.suppress(EnvironmentProblem, OSError), writer_lock(out, error):
            pass


def _check_left_inside(out: Path, entries: list[Path], kind: Replaceable) -> None:
    """Refuses `out` where a fill in place (`_fill_in_place`) left its hidden folders, naming them
    and what to do: refused as "not empty" or as holding a file no dataset holds, it looked empty,
    or lost, with nothing named."""
    def named(kind_of: str) -> list[Path]:
        return [e for e in entries if sibling_pid(e.name, out, kind_of) is not None and e.is_dir()]

    staged, before = named("partial"), named("old")
    if staged and len(staged) == len(entries):
        raise kind.error(f"{out}: holds only {staged[0].name}, what a write to it left (interrupted, or still "
                         f"running); once none runs, delete it (rm -r {staged[0]}) and run again")
    if before and not staged and (out / kind.marker).is_file():
        # Killed while it deleted what it had moved aside: the new one is whole in place.
        raise kind.error(f"{out}: holds {before[0].name}, what it held before a replace whose clean-up was cut short; "
                         f"delete it (rm -r {before[0]}) and run again")
    if before and staged:
        # Killed while it moved entries: each is in one of the two, or in place, nothing lost;
        # which of those in place are whose, only the order of the moves knows.
        raise kind.error(f"{out}: a replace of it was cut short, nothing deleted: {before[0].name} holds entries of "
                         f"the {kind.what} it held before, moved aside, {staged[0].name} entries of the new one not "
                         f"yet moved in; move the entries of the one to keep into {out}, then run again")


def _check_creatable(out: Path, error: type[EmbshardError]) -> None:
    """Said before a long conversion, not as an OSError once it is done: the nearest existing
    folder above `out` must be a folder this process may write in."""
    parent = nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise error(f"{out}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{out}: cannot be created: no permission to write in {parent}")


def check_file_output(path: Path, overwrite: bool, what: str, read: Callable[[Path], object],
                      error: type[EmbshardError] = DataError, ours: Callable[[object], bool] | None = None,
                      plan_file: bool = False) -> None:
    """Before a run that ends by writing the file `path` (a plan, a decisions file): it must be
    absent, or (with overwrite, or where `ours` says of what `read` returned that this very run
    wrote it) a `what` already, which `read` checks. A file of another kind is never replaced.
    `plan_file`: a plan's, which a run's plan folder takes."""
    if path.is_dir():
        raise error(f"{path}: a directory; give the path of a file to write the {what} to")
    check_not_in_sealed(path, what, error, plan_file=plan_file)
    if path.is_symlink():
        # Renamed over, the link became a file of its own (a dangling one without --overwrite).
        raise error(f"{path}: a symbolic link; give the file it points to ({path.resolve()})")
    if not path.exists():
        _check_creatable(path, error)
        return
    if not path.is_file():  # a FIFO held the check's read open for good; a socket's read was a traceback
        raise error(f"{path}: exists and is no {what} (not a regular file); refusing to replace it, even with "
                    "--overwrite")
    try:
        record = read(path)
    except EmbshardError as e:
        raise error(f"{path}: exists and is no {what} ({e}); refusing to replace it, even with --overwrite") from None
    if not overwrite and not (ours is not None and ours(record)):
        raise error(f"{path}: a {what} is there already; pass --overwrite to replace it")


def check_not_inside(out: StoragePath, sources: list[Path]) -> None:
    """Refuses an input inside the output folder: replacing the folder would delete the input."""
    if isinstance(out, RemotePath):
        return
    target = out.resolve()
    for src in sources:
        if src.resolve().is_relative_to(target):
            raise DataError(f"{src}: an input inside --out {out}; replacing {out} would delete it. "
                            f"Move the input or choose another --out")


def _check_remote_output(out: RemotePath, overwrite: bool, kind: Replaceable) -> None:
    if "/" not in out.path:
        # A folder is staged beside its destination, and a bucket has nothing beside it.
        raise kind.error(f"{out}: a bucket itself; give a prefix in it, e.g. {out}/{kind.what}")
    check_writable(out, "--out")
    check_not_in_sealed(out, "--out", kind.error)
    _check_not_a_step(out, kind.error)
    if any(out.iterdir()):
        if not (out / kind.marker).is_file():
            _say_a_whole_copy(out, kind)
        _check_replaceable(out, overwrite, kind)


def _say_a_whole_copy(out: RemotePath, kind: Replaceable) -> None:
    """Refuses `out`, which has no marker, naming the complete `kind` beside it that a replace cut
    short left (killed, or the store failing, while it was copied into place): refused alone, the
    folder could be neither read nor replaced, and nothing said where the new one was."""
    prefix = sibling_prefix(out, "partial")
    for staged in out.parent.iterdir():
        if staged.name.startswith(prefix) and (staged / kind.marker).is_file():
            raise kind.error(f"{out}: holds no {kind.marker}, and {staged} holds the complete {kind.what} a replace "
                             "was copying there (cut short, or still running); once no replace runs, copy that "
                             "into place, or delete both")


def _check_replaceable(out: StoragePath, overwrite: bool, kind: Replaceable, staging: Path | None = None) -> None:
    # What --overwrite could not replace either is said as such: advised to pass it, the user
    # was then refused again.
    refusing = "refusing to replace it" + (", even with --overwrite" if overwrite else "")
    if not (out / kind.marker).is_file():
        raise kind.error(f"{out}: not empty and holds no {kind.marker}, so it is no {kind.what}; {refusing}")
    try:
        marker = kind.read(out)
    except EmbshardError as e:
        raise kind.error(f"{out}: not an embshard {kind.what} ({e}); {refusing}") from None
    ours = staging.name if staging is not None else None
    foreign = _foreign(out, lambda entry: kind.holds(entry, marker) or entry[0] == ours)
    if foreign:
        raise kind.error(f"{out}: holds {foreign[0]!r}, which no {kind.what} holds"
                        + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
                        + f"; {refusing}. Move it out or choose another --out")
    if not overwrite:
        raise kind.error(f"{out}: not empty; pass --overwrite to replace the {kind.what} there")


def _foreign(folder: StoragePath, holds: Callable[[tuple[str, ...]], bool]) -> list[str]:
    """The entries under `folder`, at any depth, that `holds` disowns, as paths within it; what is
    inside a disowned folder is not named again. One listing (on object storage, one request)."""
    found: dict[tuple[str, ...], None] = {}  # in listing order
    entries = (e.relative_to(folder).parts for e in folder.rglob("*"))  # type: ignore[arg-type]
    for entry in sorted(entries, key="/".join):
        if not holds(entry) and not any(entry[:i] in found for i in range(1, len(entry))):
            found[entry] = None
    return ["/".join(entry) for entry in found]


def make_staging(out: StoragePath, in_place: bool = True, kind: Replaceable = DATASET) -> Path:
    """Where to write what `publish` puts at `out`: beside it, so that a rename puts it in place;
    inside it where `out` is a folder that stays (`_fills_in_place`), unless `in_place` is False
    (a folder of embshard's own inside another, a dataset's profile: what a killed fill leaves
    inside it, no dataset holds). `out` is locked from here until the write is published or
    dropped (`writer_lock`)."""
    if isinstance(out, RemotePath):
        with ExitStack() as remote:  # let go here only if the staging fails
            remote.enter_context(writer_lock(out, kind.error))
            _say_leftovers(out)
            staging = Path(tempfile.mkdtemp(prefix="embshard-upload-"))
            _held[staging] = remote.pop_all()
        return staging
    out = out.absolute()  # `--out .` has no name and its parent is itself
    staging = out / sibling(out, "partial").name if in_place and _fills_in_place(out) else sibling(out, "partial")
    above = nearest_existing(out.parent)
    held = ExitStack()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(writer_lock(out, kind.error))
        _say_leftovers(out)
        # os.mkdir (not tempfile.mkdtemp) so the published folder gets the usual umask permissions.
        staging.mkdir()
    except BaseException as e:
        held.close()
        # Any reason, not only those environment_problem knows: `--out /proc/x` was a traceback.
        if isinstance(e, OSError):
            raise EnvironmentProblem(f"{out}: cannot be written ({e.filename or staging}: {e.strerror or e})") from None
        if isinstance(e, EnvironmentProblem):  # of the lock's file
            raise EnvironmentProblem(f"{out}: cannot be written ({e})") from None
        raise
    _held[staging] = held
    if above != out.parent:
        _made_above[staging] = above / out.parent.relative_to(above).parts[0]
    return staging


@contextlib.contextmanager
def writing(out: StoragePath, kind: Replaceable = DATASET) -> Iterator[None]:
    """`out` locked for this process's write (`writer_lock`) from its first check to its end. Locked
    only from the staging folder on, a second `--overwrite` writer that started during the first
    one's reading was let through by both checks: both said they wrote `out`, and it held one's.
    The folders above `out` that the lock's file needs are made for it, and removed at the end
    unless the write put something there. Where no lock can be taken, the checks and the staging
    that follow say why."""
    if isinstance(out, RemotePath):
        with ExitStack() as held:
            with contextlib.suppress(EnvironmentProblem):  # no lock to take: the staging says why
                held.enter_context(_claim(out, kind))
            yield
        return
    path = out.absolute()
    # `new/..` is refused by check_output while `new` does not exist: not made here.
    if _claimed_here(path) or ".." in path.parts:
        yield
        return
    above = nearest_existing(path.parent)
    if above != path.parent:  # no folder is made inside a dataset, checkpoint or export
        check_not_in_sealed(path, "--out", kind.error)
    try:
        with ExitStack() as held:
            with contextlib.suppress(EnvironmentProblem, OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(_claim(path, kind))
            yield
    finally:
        _remove_empty(path.parent, above)


@contextlib.contextmanager
def _claim(out: StoragePath, kind: Replaceable) -> Iterator[None]:
    """`out`'s writer lock, held by this thread for the block (unless it holds it already)."""
    if _claimed_here(out):
        yield
        return
    with writer_lock(out, kind.error):
        try:  # the release set up before the claim: a stop between them left a stale one
            _claimed[out] = threading.get_ident()
            yield
        finally:
            _claimed.pop(out, None)


# The outputs locked for a write (`writing`), by the thread that writes each: its own checks and
# staging take that lock as theirs; another thread's are refused as another process's are.
_claimed: dict[StoragePath, int] = {}


def _claimed_here(out: StoragePath) -> bool:
    return _claimed.get(out) == threading.get_ident()


def writer_lock(out: StoragePath, error: type[EmbshardError] = DataError) -> AbstractContextManager[None]:
    """`out` locked against a second writer, on `.NAME.lock` beside it (`_lock_file`), or `error`
    naming the one that holds it. Two commands writing one --out at once both said they wrote it,
    and it held the last one's; a fill in place moved the other's staging folder aside with what it
    replaced, and deleted it under that writer."""
    if _claimed_here(out):
        return contextlib.nullcontext()

    def busy(holder: str) -> EmbshardError:
        return error(f"{out}: another embshard process is writing it ({holder}); wait for it to end, "
                     "or write elsewhere")

    if isinstance(out, Path) and out.is_dir() and not os.access(out.parent, os.W_OK | os.X_OK):
        return locked_folder(out, busy, PROBE_SECONDS)  # a mount point under a read-only root, filled in place
    return locked(_lock_file(out), busy, PROBE_SECONDS)


# How long a writer waits for the lock before it is refused: another's check of --out
# (`_check_no_other_writer`) holds it for a moment. Every rank of a live model's export checks
# --out at once, and all but one were refused "another embshard process is writing it".
PROBE_SECONDS = 2.0


def _lock_file(out: StoragePath) -> Path:
    """The file a writer of `out` locks: `.NAME.lock` beside a folder; for a prefix in object
    storage, which has no locks, one on this machine named by its URI. Writers on other machines
    are not kept out by it (see the README)."""
    if isinstance(out, Path):
        return out.with_name(sibling_prefix(out, "lock").removesuffix("-"))
    folder = Path(tempfile.gettempdir()) / f"embshard-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError as e:
        raise EnvironmentProblem(f"{folder}: no folder for the locks of object-store writes ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        # Another user's, or open to them: a link planted there would have this process truncate
        # and write the file it points to.
        raise EnvironmentProblem(f"{folder}: the folder for the locks of object-store writes is not this user's "
                                 "alone (another owner, or open to others); remove it, or set TMPDIR elsewhere")
    # One prefix, however its URI is spelt: `%7E` and `~` alike, its pyarrow options aside.
    return folder / f"{hashlib.sha256(unquote(out.uri).encode()).hexdigest()[:32]}.lock"


def _let_go(staging: Path) -> None:
    """The lock `make_staging` took for `staging`'s write, let go."""
    _held.pop(staging, ExitStack()).close()


# The lock of each staging folder's write (`writer_lock`), let go once it is published or dropped.
_held: dict[Path, ExitStack] = {}

# The first folder `make_staging` created above each staging folder: a failed write removes those
# folders with it (`drop_staging`), where `--out new/a/b` left `new/a` behind for good.
_made_above: dict[Path, Path] = {}


def drop_staging(staging: Path) -> None:
    """Removes the staging folder of a write that failed, and the empty folders made for it."""
    shutil.rmtree(staging, ignore_errors=True)
    _let_go(staging)
    top = _made_above.pop(staging, None)
    if top is not None:
        _remove_empty(staging.parent, top.parent)


def _remove_empty(folder: Path, above: Path) -> None:
    """`folder` and the folders over it, up to `above` (kept), removed while they are empty."""
    while folder != above and folder.is_relative_to(above):
        try:
            folder.rmdir()
        except OSError:  # not empty: the write's, another writer's since, or the user's
            return
        folder = folder.parent


def _say_leftovers(out: StoragePath) -> None:
    """A warning for each staging folder of `out`, and each old one it replaced, that a killed
    writer left (SIGKILL, a power cut: nothing of it could clean up), which would otherwise sit
    there for good unnoticed. Only those whose process has ended on this host: a live one may be
    a writer at work. (A write to object storage replaces by copying: it leaves no old folder.)"""
    for leftover, pid in left_by_the_dead(out, "partial"):
        print(f"warning: {leftover}: left by an interrupted write to {out} (its process {pid} is not "
              "running on this host); delete it unless a process on another host is writing there", file=sys.stderr)
    if isinstance(out, RemotePath):
        return
    for leftover, pid in left_by_the_dead(out, "old"):
        if out.exists():
            print(f"warning: {leftover}: what {out} held before it was replaced (the removal by process {pid} was "
                  f"interrupted); delete it once {out} is checked", file=sys.stderr)
        else:
            print(f"warning: {leftover}: what {out} held before an interrupted replace, and {out} is missing; "
                  f"move it back (mv {leftover} {out})", file=sys.stderr)


def publish(staging: Path, out: StoragePath, overwrite: bool, kind: Replaceable = DATASET) -> None:
    """Renames the complete `staging` folder to `out`; an earlier `kind` there goes only after that."""
    check_output(out, overwrite, kind, staging)  # again: `out` may have changed during a long conversion
    replace_folder(staging, out, kind.marker)


def _fills_in_place(out: Path) -> bool:
    """Whether `out` is a folder that stays, its contents replaced: an empty one (a user's, with
    its own mode, owner and group: renamed over, a private folder came back world-readable) or a
    mount point (`docker run -v host:/out`: no rename replaces it, and the conversion failed at
    its end, 'Device or resource busy'). Only where this process may write in it: one it may not,
    replaced by a rename beside it as before, was refused."""
    return (out.is_dir() and not out.is_symlink() and os.access(out, os.W_OK | os.X_OK)
            and (os.path.ismount(out) or not any(out.iterdir())))


def check_folder_or_absent(out: StoragePath) -> None:
    """DataError when `out`, which a folder is to replace, is a file: moved aside for a swap, it
    could not be removed and stayed behind as `.NAME.old-*`; it is not ours to remove either."""
    if not isinstance(out, RemotePath) and out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file where a folder goes; refusing to replace it (move it away)")


def check_profile_replaceable(directory: StoragePath) -> None:
    """DataError unless a dataset's profile folder is absent or holds a profile's files alone:
    `data profile` replaces it whole, which deleted a user's file there."""
    if isinstance(directory, Path) and directory.is_symlink():
        # Swapped out, the link was left beside the dataset as a staging folder to delete, which
        # a `rm -rf` of it would have done inside the folder it points to.
        raise DataError(f"{directory}: a symbolic link ({directory.resolve()}); refusing to replace it: move that "
                        "folder into the dataset, or remove the link")
    check_folder_or_absent(directory)
    if directory.is_dir():
        foreign = _foreign(directory, lambda parts: dataset_holds((PROFILE_DIR, *parts)))
        if foreign:
            raise DataError(f"{directory}: holds {foreign[0]!r}, which no profile holds; refusing to replace it. "
                            "Move it out")


def replace_folder(staging: Path, out: StoragePath, marker: str) -> None:
    """Puts the complete local folder `staging` at `out`, replacing what is there only once the new
    folder is in place; `marker` is the file an object-store reader looks for (written last)."""
    try:
        _replace_folder(staging, out, marker)
    finally:
        _let_go(staging)


def _replace_folder(staging: Path, out: StoragePath, marker: str) -> None:
    _made_above.pop(staging, None)
    if isinstance(out, RemotePath):
        _upload(staging, out, marker)
        shutil.rmtree(staging, ignore_errors=True)
        return
    out = out.absolute()
    check_folder_or_absent(out)
    if staging.parent == out:
        _fill_in_place(staging, out, marker)
        return
    if not out.exists():
        def rename() -> None:
            staging.rename(out)

        _held_replace(out, rename)
        return
    _take_over_mode(out, staging)

    def swap() -> Path:
        old = sibling(out, "old")
        if _exchange(staging, out):
            return staging  # killed during its removal, the next writer says it is to be deleted
        try:
            out.rename(old)
            staging.rename(out)
        except BaseException:  # a failure between the renames must not leave `out` missing
            if old.exists() and not out.exists():
                old.rename(out)
            raise
        return old

    _held_replace(out, swap)


@contextlib.contextmanager
def written_whole_by_its_end(out: StoragePath) -> Iterator[None]:
    """A stop (Ctrl-C, SIGTERM) during the block is held until it ends, which leaves `out` written
    whole, and is then said as that (Interrupted, exit 130): "interrupted" alone was said of a
    dataset or export in place, and a user took it for lost."""
    try:
        with stops_held():
            yield
    except KeyboardInterrupt:  # the held stop
        raise Interrupted(f"stopped once {out} was written whole") from None


def _held_replace(out: Path, move: Callable[[], Path | None]) -> None:
    """Runs `move`, which puts the new contents at `out` and returns the folder of what `out` held
    before (None: nothing), then removes that folder. A stop during either waits for them: one in
    the removal left half of the old folder behind, unsaid (a removal takes seconds, even of a
    large dataset), and one as a new folder was renamed into place said "interrupted" of it."""
    with written_whole_by_its_end(out):
        old = move()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if old is not None and old.exists():
        print(f"warning: {old}: could not remove what {out} held before; delete it by hand", file=sys.stderr)


def _fill_in_place(staging: Path, out: Path, marker: str) -> None:
    """Moves what `staging`, inside `out`, holds into `out`, after moving what `out` held aside;
    each marker goes first out and last in, so a reader in between finds no `marker` and refuses
    the folder rather than reading a mix of old and new."""
    def fill() -> Path:
        earlier = [e for e in out.iterdir() if e != staging]
        aside = out / sibling(out, "old").name
        if earlier:
            aside.mkdir()
            for entry in sorted(earlier, key=lambda e: e.name != marker):
                entry.rename(aside / entry.name)
        for entry in sorted(staging.iterdir(), key=lambda e: e.name == marker):
            entry.rename(out / entry.name)
        staging.rmdir()
        return aside

    _held_replace(out, fill)


def _take_over_mode(out: Path, staging: Path) -> None:
    """The replaced folder's permissions, owner and group for the new one that takes its place."""
    st = out.stat()
    try:
        os.chown(staging, st.st_uid, st.st_gid)
    except OSError:  # another owner needs privileges; its group may still be ours to give
        with contextlib.suppress(OSError):
            os.chown(staging, -1, st.st_gid)
    with contextlib.suppress(OSError):  # after chown, which clears the setgid bit
        os.chmod(staging, st.st_mode & 0o7777)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the entries `a` and `b` in one step (Linux's renameat2): a process killed between
    two renames left the destination missing, its old folder and its new one both hidden under
    dot names. False where the system or the file system has no such swap."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: the paths are absolute
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _upload(staging: Path, out: RemotePath, marker: str) -> None:
    """Upload the complete local folder `staging` and copy it into `out` (see the module doc)."""
    uploaded = sibling(out, "partial")
    try:
        upload(staging, uploaded, marker=marker)
    except BaseException:
        # The store keeps a deleted object's "folder" as an empty marker: the prefix is ours alone.
        with contextlib.suppress(Exception):
            uploaded.fs.delete_dir(uploaded.path)
        raise
    done = False
    try:
        # A store has no rename that swaps two prefixes in one step: a stop between the old
        # folder's removal and the end of the new one's copy left neither readable at `out`.
        with stops_held():
            if (out / marker).exists():
                # What is there goes, marker first, so that a failure below leaves a prefix readers
                # refuse rather than a mix of old and new files.
                (out / marker).unlink()
                rmtree(out)
            uploaded.rename(out, marker=marker)
            done = True
    except BaseException as e:
        if done and isinstance(e, KeyboardInterrupt):  # the held stop, once the copy is whole
            raise Interrupted(f"stopped once {out} was written whole") from None
        # The copy moves the marker last and deletes the source's first: one of them holds it.
        if _store_has(uploaded / marker):
            print(f"warning: the complete new folder is at {uploaded}", file=sys.stderr)
        raise


def _store_has(path: RemotePath) -> bool:
    """Whether the store says `path` is there, asked once: it has just failed, and retried, the
    warning would wait for as long as the store stays away. False when it does not answer."""
    try:
        return bool(path.fs.get_file_info(path.path).type == pafs.FileType.File)
    except Exception:  # noqa: BLE001 - any failure to answer is a no
        return False
