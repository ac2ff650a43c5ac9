"""What makes a checkpoint folder trustworthy enough to read: its manifest, content hashes, and a
metadata reader that cannot run code.

A checkpoint holds two kinds of files that are unpickled on load: DCP's `.metadata` (a plain
pickle in torch's `FileSystemReader`) and the per-rank RNG files. Unpickling can run arbitrary
code, so the order on load is fixed: the manifest (JSON) is read, every file's SHA-256 is checked
against it, and only then is anything unpickled — the RNG files with `torch.load(weights_only=True)`,
DCP's metadata through `SafeFileSystemReader`, whose unpickler admits only the classes DCP's
metadata is made of. The hashes catch damaged or substituted files; the restricted unpickler
also holds when someone rewrote the manifest too.

Hashing is split across ranks (file i is hashed by rank i mod world), so verifying a checkpoint
of N bytes costs each rank N / world of reading, on save and on resume alike.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from embshard.datasets.storage import StoragePath, is_count, relative, storage_failure
from embshard.errors import EmbshardError, EnvironmentProblem, StorageError, first_line, version_mismatch
from embshard.sealed_folders import CHECKPOINT_MANIFEST, STEP_FOLDER

MANIFEST = CHECKPOINT_MANIFEST
PROGRESS = "progress.json"  # the step's Progress (trainer/checkpoint.py)
# 1: sizes only (older checkpoints; accepted, verified by size); 2: sizes and SHA-256.
MANIFEST_VERSION = 2
_CHUNK = 1 << 20  # bytes read per hashing call: large enough to be I/O bound, small in memory


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str | None  # None in version-1 manifests


def sha256_file(path: StoragePath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: StoragePath) -> dict[str, Any]:
    """A file as a manifest lists it (a checkpoint's, an export's serving.json)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _my_share(names: list[str]) -> list[str]:
    """This rank's part of a sorted list of files (all of it outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(local: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


@dataclass(frozen=True)
class RankFailure:
    """One rank's failure as every rank can rebuild it (a library's exception may not pickle)."""

    rank: int
    message: str
    storage: bool  # the store failed (a StorageError), not the checkpoint or the code
    # Written by a newer embshard: whole, not damaged (NewerCheckpoint), and so on every rank.
    newer: bool = False

    @staticmethod
    def of(error: BaseException, where: StoragePath) -> "RankFailure":
        # DCP raises its ranks' errors wrapped, with their tracebacks in the message.
        while isinstance(error, CheckpointException) and error.failures:
            error = error.failures[min(error.failures)][0]
        failed = storage_failure(error, where)
        if failed is not None:
            return RankFailure(_rank(), str(failed), True)
        text = error.args[0] if isinstance(error, EmbshardError) and error.args else first_line(error)
        return RankFailure(_rank(), str(text), False, isinstance(error, NewerCheckpoint))


def on_every_rank(stage: Callable[[], Any], where: StoragePath) -> tuple[RankFailure, BaseException | None] | None:
    """Collective: run `stage` on every rank; None when it succeeded on all of them, else the first
    failing rank's failure (the same on every rank) and this rank's own exception, if it had one.
    Every rank returns, so none is left waiting in a collective of a stage another one left."""
    own: BaseException | None = None
    local: RankFailure | None = None
    try:
        stage()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must reach the gather
        own, local = e, RankFailure.of(e, where)
    first = next((f for f in _gather(local) if f is not None), None)
    return None if first is None else (first, own)


def write_manifest(folder: StoragePath, step: int) -> dict[str, Any]:
    """Collective: every rank hashes its share of the folder's files; returns the manifest (rank 0
    writes it). Called once every file is in place, so the manifest is the last thing written.
    A failure on any rank raises on every rank (StorageError for the store, else DamagedCheckpoint)."""
    # One listing, rank 0's: on shared storage another rank's listing may lag, and shares computed
    # from different lists would leave some file unhashed.
    listed: list[Any] = [None]

    def listing() -> None:
        if _rank() == 0:
            listed[0] = sorted(relative(p, folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)

    _raise_agreed(on_every_rank(listing, folder))
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(listed, src=0)
    names: list[str] = listed[0]
    # Sizes come with the hashes: after the gather, rank 0 may already be renaming the folder.
    mine: dict[str, dict[str, Any]] = {}

    def hashing() -> None:
        mine.update({name: file_record(folder / name) for name in _my_share(names)})

    _raise_agreed(on_every_rank(hashing, folder))
    files: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        files.update(part)
    return {"version": MANIFEST_VERSION, "step": step, "written_at": time.time(), "files": dict(sorted(files.items()))}


def _raise_agreed(failed: tuple[RankFailure, BaseException | None] | None) -> None:
    if failed is None:
        return
    failure, own = failed
    if failure.newer:
        # Not "damaged": a run that took it for damaged set it aside and went on from an older step.
        raise NewerCheckpoint(failure.message) from own
    error = StorageError(failure.message) if failure.storage else \
        DamagedCheckpoint(f"rank {failure.rank}: {failure.message}")
    raise error from own


def read_manifest(folder: StoragePath) -> dict[str, FileEntry]:
    """The manifest's file list; raises DamagedCheckpoint when it is missing or unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DamagedCheckpoint(f"no {MANIFEST} (the write did not finish)")
    try:
        raw = json.loads(path.read_text())
        version = raw.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
            # Not damaged: set aside as such, the run went on from an older step, or from scratch.
            raise NewerCheckpoint(f"{path}: {version_mismatch(version, MANIFEST_VERSION)}")
        entries = {name: _file_entry(entry) for name, entry in raw["files"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise DamagedCheckpoint(f"unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
    for name in entries:
        # Read as listed, `../step-8/x` vouched for another step's file, and in a bucket was
        # "access denied", which stopped every resume and export there for good.
        if not name or "\\" in name or name.startswith("/") or {"", ".", ".."} & set(name.split("/")):
            raise DamagedCheckpoint(f"{MANIFEST} lists {name!r}, which names no file of this step")
    return entries


def _file_entry(entry: Any) -> FileEntry:
    """A manifest's record of one file: its size (a version-1 manifest's whole record) and hash.
    Counts only: `1e999` was an OverflowError traceback out of every resume and export."""
    if is_count(entry):
        return FileEntry(entry, None)
    if isinstance(entry, dict) and is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str):
        return FileEntry(entry["bytes"], entry["sha256"])
    raise ValueError(f"a file's entry {entry!r:.80} is no size and sha256")


def check_progress(folder: StoragePath) -> None:
    """DamagedCheckpoint unless the step's progress.json holds counts, and the step its folder's
    name and its manifest give: read as it was, a step of -5 in step-000018 resumed at -5, and
    its folder's name kept it the newest, so each later run resumed it and pruned the newer
    steps."""
    def read(name: str) -> Any:
        # The manifest once more, for its step: a few hundred bytes beside the hashing of every file.
        try:
            return json.loads((folder / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DamagedCheckpoint(f"unreadable {name} ({type(e).__name__}: {e})") from None

    progress, manifest = read(PROGRESS), read(MANIFEST)
    if not isinstance(progress, dict):
        raise DamagedCheckpoint(f"{PROGRESS} holds no object")
    least = {"step": 0, "epoch": 0, "samples": 0, "batch_size": 0, "world_size": 1}
    bad = [key for key, low in least.items() if key in progress
           and not (is_count(progress[key]) and progress[key] >= low)]
    if bad:
        raise DamagedCheckpoint(f"{PROGRESS}: {bad[0]} {progress[bad[0]]!r:.40} is no count of at least "
                                f"{least[bad[0]]}")
    named = STEP_FOLDER.match(folder.name)
    for step, where in ((manifest.get("step") if isinstance(manifest, dict) else None, MANIFEST),
                        (int(named[1]) if named else None, "its folder's name")):
        if step is not None and step != progress.get("step", 0):
            raise DamagedCheckpoint(f"{PROGRESS} is of step {progress.get('step', 0)}, {where} of step {step}")


class DamagedCheckpoint(EmbshardError):
    """Why a checkpoint folder fails verification (the message names the file)."""


class NewerCheckpoint(EmbshardError):
    """A checkpoint written by a newer embshard: whole, but not this one's to read."""


def check_layout(folder: StoragePath) -> dict[str, FileEntry]:
    """Every listed file exists with its size, and no unlisted file would be read (cheap: no hashing)."""
    files = read_manifest(folder)
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if f.stat().st_size != entry.size:
            raise DamagedCheckpoint(f"{name} has {f.stat().st_size} bytes, the manifest says {entry.size}")
    # An unlisted .metadata or .pt would be unpickled without a hash having vouched for it. Only
    # the step's own level is read so: a stray file in a subfolder (an export written there once)
    # got a whole good step set aside as damaged and its steps trained again.
    for f in folder.iterdir():
        name = relative(f, folder)
        if f.is_file() and name != MANIFEST and name not in files and f.suffix in (".metadata", ".pt", ".distcp"):
            raise DamagedCheckpoint(f"{name} is not in the manifest")
    return files


def check_contents(folder: StoragePath, files: dict[str, FileEntry], names: Iterable[str]) -> None:
    for name in names:
        if name not in files:
            raise DamagedCheckpoint(f"{name} is not in the manifest")
        expected = files[name].sha256
        if expected is not None and sha256_file(folder / name) != expected:
            raise DamagedCheckpoint(f"{name}: content differs from the manifest's SHA-256")


def verify(folder: StoragePath, read: Callable[[str], bool] | None = None, present: Iterable[str] = ()) -> None:
    """One process: the layout, and the hashes of the manifest's files that `read` names (None:
    every file) and of the files `present` names, which the manifest must list."""
    files = check_layout(folder)
    wanted = [name for name in files if read is None or read(name)]
    check_contents(folder, files, [*wanted, *(name for name in present if name not in wanted)])
    check_progress(folder)


def unusable(folder: StoragePath, check: Callable[[], None]) -> str | None:
    """Why `check` found the checkpoint `folder` unusable, or None. A store that fails meanwhile
    raises StorageError instead: that is no reason, the checkpoint may be fine and must not be set
    aside or skipped for it."""
    try:
        check()
    except DamagedCheckpoint as e:
        return str(e)
    except (OSError, StorageError) as e:  # pyarrow's streams raise plain OSErrors
        failed = None if isinstance(e, FileNotFoundError) else storage_failure(e, folder)
        if failed is None and isinstance(e, OSError) and e.errno in _UNREADABLE:
            # A permission refused the read, the file may be whole: set aside as damaged, the run
            # rolled back past its newest checkpoint, with a warning in the log alone. (An I/O
            # error is the file's own: damaged, as it was.)
            failed = StorageError(f"{e.filename or folder}: {e.strerror}")
        if failed is None:
            return str(e)
        raise StorageError(f"{failed} while verifying checkpoint {folder}") from e
    return None


_UNREADABLE = frozenset({errno.EACCES, errno.EPERM})


def verify_collective(folder: StoragePath) -> str | None:
    """Collective: None when the layout holds on every rank and every file's hash matches (each rank
    hashes its share), else the first reason found on any rank. Every rank gets the same answer;
    a failing store raises StorageError on every rank (see `unusable`)."""
    why: str | None = None

    def layout_and_hashes() -> None:
        files = check_layout(folder)
        check_contents(folder, files, _my_share(sorted(files)))
        check_progress(folder)

    def check() -> None:
        nonlocal why
        why = unusable(folder, layout_and_hashes)

    _raise_agreed(on_every_rank(check, folder))
    return next((w for w in _gather(why) if w is not None), None)


# -- reading DCP metadata without running code ---------------------------------------------------

# The classes DCP's metadata module defines itself (not what it imports, such as Enum).
_DCP_CLASSES = {name for name, obj in vars(dcp_metadata).items()
                if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": _DCP_CLASSES,
    "torch.distributed.checkpoint.filesystem": {_StorageInfo.__name__},
    "torch": {"Size", *(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))},
    "torch.serialization": {"_get_layout"},  # maps "torch.strided" to the layout object
    "pathlib": {PosixPath.__name__, PurePosixPath.__name__, Path.__name__},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP metadata")


class _SafeMetadata:
    """read_metadata for DCP's readers: the metadata unpickler admits only DCP's own classes."""

    fs: Any
    path: Any
    load_id: str

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self.fs.concat_path(self.path, ".metadata")
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise DamagedCheckpoint(f"{path}: not a DCP metadata file ({e})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise DamagedCheckpoint(f"{path}: not a DCP metadata file (holds {type(metadata).__name__})")
        storage = getattr(metadata, "storage_meta", None)
        if storage is None:
            storage = metadata.storage_meta = dcp_metadata.StorageMeta()
        storage.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP's FileSystemReader whose metadata unpickler admits only DCP's own metadata classes."""


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """The same over fsspec (a checkpoint in object storage: s3://, gs://, ...)."""


def check_checkpoint_io(path: StoragePath, what: str) -> None:
    """EnvironmentProblem when DCP cannot reach checkpoints at `path`. An object store goes
    through fsspec, whose client for some schemes is a package of its own (gs:// needs gcsfs,
    which embshard does not install); pyarrow, which checks the bucket, serves them all, so
    otherwise the first save, after the run has trained, would find it missing."""
    if isinstance(path, Path):
        return
    scheme = path.fsspec_uri.split("://", 1)[0]  # a URI fsspec cannot be given: said before anything trains
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise EnvironmentProblem(f"{what} {path}: checkpoints are read and written there through fsspec, "
                                 f"which cannot: {first_line(e)}") from None


def checkpoint_reader(path: StoragePath) -> FileSystemReader:
    """DCP's reader for a local folder or an object-store prefix, with the safe metadata unpickler."""
    return SafeFileSystemReader(path) if isinstance(path, Path) else SafeFsspecReader(path.fsspec_uri)


def checkpoint_writer(path: StoragePath) -> FileSystemWriter:
    """DCP's writer for a local folder, or (fsspec) for an object-store prefix."""
    return FileSystemWriter(path) if isinstance(path, Path) else FsspecWriter(path.fsspec_uri)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except for non-tensor items (optimizer step counts, learning
    rates): DCP unpickles those with `weights_only=False`, so they are first read with
    `weights_only=True`, which refuses anything but plain data, before DCP reads them."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raw = value.read()
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except pickle.UnpicklingError as e:
            raise DamagedCheckpoint(f"{read_item.dest_index.fqn}: refusing to load a non-tensor item "
                                    f"({first_line(e)})") from None
        super().load_bytes(read_item, io.BytesIO(raw))
