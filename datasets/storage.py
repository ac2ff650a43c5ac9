"""Where datasets, checkpoints and exports live: a local folder, or a prefix in object storage.

`location(x)` turns a config value or `--out` argument into something that behaves like a
`pathlib.Path`: a local path stays a real `Path` (so local behaviour is exactly what it was), a
URI (`s3://bucket/prefix`, `gs://...`, anything `pyarrow.fs.FileSystem.from_uri` serves) becomes
a `RemotePath` with the subset of `Path`'s methods the readers, writers and checkpoints use.

Credentials and endpoint come from the environment, as the AWS SDK reads them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (an S3-compatible
server such as MinIO). Every failure of the store (missing bucket, refused credentials, an
unreachable endpoint) is a `StorageError` of one line naming the URI.

Transient or fatal: a store that answered this process before and now cannot be reached is
retried with backoff (0.5 s, 1 s, 2 s, ... up to 8 s apart) for `retry_seconds()` (default 30 s,
EMBSHARD_STORAGE_RETRY_SECONDS), on top of the AWS SDK's own few retries: an endpoint that blinks
during a long run should not end it. One never reached fails at once (a wrong endpoint is not worth
waiting for), and a refusal (missing bucket, credentials) is never retried: it will not pass.

Object stores have no directories and no rename: a "directory" is a prefix, `mkdir` does nothing,
and `rename` copies every object it could read and only then deletes the originals. Writers that
must not leave half a result therefore write a marker object last (dataset.json, a checkpoint's
manifest.json, serving.json), and readers refuse a prefix without it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, Union, cast, overload
from urllib.parse import quote, unquote

import pyarrow.fs as pafs

from embshard.errors import EmbshardError, EnvironmentProblem, StorageError, first_line, no_file, version_mismatch


def is_uri(value: str | os.PathLike[str]) -> bool:
    """A `scheme://` location other than a plain local path (`file://` counts as local)."""
    text = os.fspath(value)
    return "://" in text and not text.startswith("file://")


def read_json(path: "StoragePath", error: type[EmbshardError]) -> Any:
    """The JSON document in `path`; `error` naming the file when it is no JSON text (a truncated
    or foreign file is an input to refuse in one line, not a traceback)."""
    if isinstance(path, Path) and path.exists() and not path.is_file():
        # A FIFO's read blocks for good, a socket's is a traceback.
        raise error(f"{path}: {no_file(path, 'JSON file')}")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not JSON ({e})") from None
    except ValueError as e:  # an integer of more than 4,300 digits: Python's guard on int() of text
        raise error(f"{path}: not a file embshard writes ({first_line(e)})") from None
    except DuplicateKey as e:
        raise error(f"{path}: key {e.args[0]!r} given twice in one object (JSON readers differ on which one counts)") \
            from None
    except RecursionError:
        raise error(f"{path}: not a file embshard writes (nested deeper than JSON readers follow)") from None


def is_count(value: Any) -> bool:
    """Whether a JSON value read from a file of ours is a whole number >= 0 (not a bool, not 1e999)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


# A file name's most bytes on Linux file systems (NAME_MAX).
NAME_MAX = 255
P = TypeVar("P", Path, "RemotePath")


def fitted_name(name: str, most: int = NAME_MAX) -> str:
    """`name` if it is at most `most` bytes, else its first bytes and a hash of the whole in that
    many: a name made of a user's values (a long `--out`, a --vary value) that the file system
    refused as "File name too long"."""
    raw = name.encode()
    if len(raw) <= most:
        return name
    return raw[:most - 9].decode(errors="ignore") + "~" + hashlib.sha256(raw).hexdigest()[:8]


def sibling_prefix(path: "StoragePath", kind: str) -> str:
    """`.NAME.<kind>-`, the start of every `sibling` name of `path` of that kind; its `.`,
    `.<kind>-<pid>-<hex>` take 30 bytes besides `kind`."""
    return f".{fitted_name(path.name, NAME_MAX - len(kind) - 30)}.{kind}-"


def sibling(path: P, kind: str) -> P:
    """A hidden name beside `path` that no other process uses: `.NAME.<kind>-<pid>-<hex>`."""
    return path.with_name(f"{sibling_prefix(path, kind)}{os.getpid()}-{secrets.token_hex(4)}")


def sibling_pid(name: str, path: "StoragePath", kind: str) -> int | None:
    """The process id in `name` where it is a `sibling` name of `path` of that kind (a user's
    `.d.old-photos` is none), else None."""
    prefix = sibling_prefix(path, kind)
    pid, dash, token = name[len(prefix):].partition("-") if name.startswith(prefix) else ("", "", "")
    hexadecimal = len(token) == 8 and all(c in "0123456789abcdef" for c in token)
    return int(pid) if pid.isdecimal() and dash and hexadecimal else None


def left_by_the_dead(out: "StoragePath", kind: str) -> Iterator[tuple["StoragePath", int]]:
    """`sibling` entries of `out` of that kind whose process is not running on this host."""
    leftovers: list[StoragePath] = sorted(out.parent.glob(f"{glob.escape(sibling_prefix(out, kind))}*"), key=str)
    for leftover in leftovers:
        pid = sibling_pid(leftover.name, out, kind)
        if pid is None:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            yield leftover, pid
        except (PermissionError, OverflowError):
            pass  # alive under another user, or no pid at all


def moved_aside(path: "StoragePath") -> str:
    """Where the local folder `path` is missing because a replace of it was killed halfway: "; X
    beside it holds ..." naming the folder that holds what it held, else "". Where the file system
    has no swap in one step, a replace renames the old folder away, then the new one in
    (`outdir.replace_folder`): killed between the two, `path` was "not found" to every reader, its
    data hidden beside it under a dot name (a writer warns of it, `outdir._say_leftovers`)."""
    if not isinstance(path, Path) or path.exists() or not path.parent.is_dir():
        return ""
    aside = [leftover for leftover, _ in left_by_the_dead(path, "old") if leftover.is_dir()]
    if not aside:
        return ""
    return (f"; {aside[-1].name} beside it holds what it held before a replace of it was killed halfway: move it "
            f"back (mv {aside[-1]} {path})")


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary file of a name no one else uses, for the block to write; renamed over `path`
    when the block ends, removed when it fails. A reader never sees half a file, and an interrupted
    write leaves the earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "partial")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@overload
def write_whole(path: Path, text: str) -> Path: ...
@overload
def write_whole(path: "RemotePath", text: str) -> "RemotePath": ...
def write_whole(path: "StoragePath", text: str) -> "StoragePath":
    if isinstance(path, RemotePath):  # an object appears whole
        path.write_text(text)
        return path
    with written_whole(path) as tmp:
        tmp.write_text(text)
    return path


def read_json_version(path: "StoragePath", expected: int, error: type[EmbshardError]) -> dict[str, Any]:
    """The JSON object in `path`, which must be of format version `expected`."""
    raw = read_json(path, error)
    version = raw.get("version") if isinstance(raw, dict) else None
    mismatch = version_mismatch(version, expected)
    if mismatch:
        raise error(f"{path}: {mismatch}")
    return cast(dict[str, Any], raw)


def read_json_object(path: "StoragePath", keys: tuple[str, ...], error: type[EmbshardError]) -> dict[str, Any]:
    """The JSON object in `path`, which must have `keys`: enough to tell a file of ours (of any
    version) from another, before replacing it."""
    raw = read_json(path, error)
    missing = [k for k in keys if k not in raw] if isinstance(raw, dict) else list(keys)
    if missing:
        raise error(f"{path}: not the JSON object expected (no {missing[0]!r})")
    return cast(dict[str, Any], raw)


def location(value: "str | os.PathLike[str] | RemotePath") -> "StoragePath":
    """A local `Path`, or a `RemotePath` for a URI."""
    if isinstance(value, RemotePath):
        return value
    text = os.fspath(value)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if text.startswith("file:/"):
        return Path(text[len("file:"):])  # RFC 8089's form without an authority
    if re.match(r"^[a-z][a-z0-9+.-]+:/[^/]", text, re.IGNORECASE):
        # `s3:/bucket/x` wrote a local folder named `s3:` without a word.
        raise StorageError(f"{text}: a URI with one '/' after its scheme; a location is a local path or "
                           "scheme://authority/path (s3://bucket/prefix)")
    if not is_uri(text):
        return Path(text)
    _check_key(text)
    return RemotePath(text)


def _check_key(uri: str) -> None:
    """StorageError for a URI whose key names no one prefix. pyarrow takes `.` and `..` as names
    (a write there failed as "access denied" once it had run) and decodes `%2F` into a `/` that
    the URI's own parent does not have (a message named the bucket as the dataset `ds%2Fsub` was
    inside)."""
    if "#" in uri:  # pyarrow takes `a#b` as the key `a`
        raise StorageError(f"{uri}: a '#' in an object-store location ends its key there; write it as %23")
    for segment in uri.partition("?")[0].split("://", 1)[1].split("/")[1:]:
        name = unquote(segment)
        if name in (".", ".."):
            raise StorageError(f"{uri}: a {name!r} in an object-store key names no prefix (a store has no folders "
                               "to step into or out of); give the prefix itself")
        if "/" in name:
            raise StorageError(f"{uri}: {segment!r} encodes a '/' inside one name; write the '/' itself")


@dataclass(frozen=True)
class _Stat:
    st_size: int


# AWS SDK error codes -> what the user can do about them.
_REASONS = (
    (re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist"), "the bucket does not exist"),
    (re.compile(r"ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|"
                r"AccessDenied|SignatureDoesNotMatch|Forbidden|\b403\b|Access Key Id you provided does not exist"),
     "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
    (re.compile(r"NETWORK_CONNECTION|Could not connect|Could not resolve|Connect timeout|"
                r"Cannot connect|ConnectionRefused|EndpointConnectionError"),
     "cannot reach the storage endpoint (check AWS_ENDPOINT_URL / the network)"),
)


RETRY_ENV = "EMBSHARD_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 30.0
_UNREACHABLE = _REASONS[2][0]
T = TypeVar("T")
# `scheme://bucket` of every store that answered this process: only those are worth a retry.
_reached: set[str] = set()


def retry_seconds() -> float:
    """How long a connection failure to a store reached before is retried (see the module doc)."""
    raw = os.environ.get(RETRY_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r}: expected a number of seconds") from None


def _store(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def retrying(uri: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` against the store of `uri`, retried while a store this process has
    reached before cannot be reached (see the module doc); `fn` must be safe to repeat. A local
    path: `fn` once."""
    if not is_uri(uri):
        return fn(*args, **kwargs)
    store, delay, deadline = _store(uri), 0.5, None
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if store not in _reached or not _UNREACHABLE.search(str(e)):
                raise
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + retry_seconds()
            if now >= deadline:
                raise
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 8.0)
            continue
        _reached.add(store)
        return result


def storage_failure(error: BaseException, where: "StoragePath") -> StorageError | None:
    """The StorageError that `error`, raised while working on `where`, amounts to; None when it is
    no failure of a store (a local file, a bug). Client libraries raise OSError (pyarrow, s3fs)
    or their own classes (botocore's connection errors)."""
    if isinstance(error, StorageError):
        return error
    library = type(error).__module__.split(".")[0] in ("botocore", "aiobotocore")
    if isinstance(where, RemotePath) and (isinstance(error, OSError) or library):
        return StorageError(f"{where}: {reason(error)}")
    return None


def reason(error: BaseException) -> str:
    """One line saying why a storage call failed."""
    text = str(error)
    for pattern, why in _REASONS:
        if pattern.search(text):
            return why
    if isinstance(error, PermissionError):  # s3fs's translation of any 403
        return _REASONS[1][1]
    lines = text.strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _bounded(uri: str) -> str:
    """`uri` with the store's own retries bounded by retry_seconds(): left alone, pyarrow's GCS
    client retries an unreachable endpoint for 15 minutes, silently."""
    scheme = uri.partition("://")[0]
    if scheme not in ("gs", "gcs") or "retry_limit_seconds=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}retry_limit_seconds={max(retry_seconds(), 1.0):g}"


# What a name may hold in a URI as it is (RFC 3986's path characters): the rest is percent-encoded.
_URI_SAFE = "/!$&'()*+,;=:@"


class RemotePath:
    """A key prefix in object storage, with the `Path` methods embshard uses (see module doc)."""

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None, path: str | None = None) -> None:
        # `?region=...`: options for pyarrow's file system, kept on every path below this one.
        base, mark, options = uri.partition("?")
        self.uri, self.options = base.rstrip("/"), mark + options
        # Resolved on first use: pyarrow may ask the network (the bucket's region) to build one.
        self._resolved = (fs, path.rstrip("/")) if fs is not None and path is not None else None

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self._resolved is None:
            try:
                fs, path = pafs.FileSystem.from_uri(_bounded(str(self)))
            except (OSError, ValueError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
                raise StorageError(f"{self.uri}: cannot open this storage location ({reason(e)})") from None
            self._resolved = (fs, path.rstrip("/"))
        return self._resolved

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolve()[0]

    @property
    def path(self) -> str:
        """The location as the file system names it (`bucket/prefix` for S3)."""
        return self._resolve()[1]

    # -- naming ----------------------------------------------------------------------------------

    def __truediv__(self, name: str | os.PathLike[str]) -> "RemotePath":
        name = os.fspath(name).strip("/")
        return self._below(quote(name, safe=_URI_SAFE), name)

    def _below(self, quoted: str, name: str) -> "RemotePath":
        """The path `name` (`quoted` in the URI) below this one."""
        uri = f"{self.uri}/{quoted}{self.options}"
        return RemotePath(uri) if self._resolved is None else RemotePath(uri, self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        """The URI as given: `location(str(p)) == p` (Ray's workers and configs get it as text)."""
        return self.uri + self.options

    @property
    def fsspec_uri(self) -> str:
        """The URI as fsspec reads it (DCP's checkpoints): s3fs takes a key as it is, where pyarrow
        decodes it (a checkpoint's manifest went to `sp ace/`, its weights to `sp%20ace/`)."""
        if self.options:
            # Saved through fsspec with the environment's settings instead, a checkpoint went to
            # another endpoint or region than the rest of the run's files, if anywhere.
            raise StorageError(f"{self}: checkpoints are read and written through fsspec, which does not take "
                               f"pyarrow's URI options ({self.options!r}); set them in the environment "
                               "(AWS_REGION, AWS_ENDPOINT_URL) and give the URI without them")
        return unquote(self.uri)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __lt__(self, other: "RemotePath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships paths to workers: they rebuild the file system from the URI and their own env.
        return (RemotePath, (str(self),))

    # Names and relative paths are decoded, as `/` takes them; only the URI is encoded.
    @property
    def name(self) -> str:
        return unquote(posixpath.basename(self.uri))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "RemotePath":
        uri = self.uri.rsplit("/", 1)[0] + self.options
        return RemotePath(uri) if self._resolved is None else RemotePath(uri, self.fs, posixpath.dirname(self.path))

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def relative_to(self, other: "RemotePath") -> Path:
        return Path(unquote(posixpath.relpath(self.uri, other.uri)))

    def resolve(self) -> "RemotePath":
        return self

    absolute = resolve

    def is_symlink(self) -> bool:
        return False

    # -- queries ---------------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        return self._call(self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri}: not found")
        return _Stat(int(info.size or 0))

    def _listing(self, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return cast(list[pafs.FileInfo], self._call(self.fs.get_file_info, selector))

    def _child(self, info: pafs.FileInfo) -> "RemotePath":
        rel = posixpath.relpath(info.path, self.path)
        return self._below(quote(rel, safe=_URI_SAFE), rel)

    def iterdir(self) -> Iterator["RemotePath"]:
        return iter([self._child(i) for i in self._listing(recursive=False)])

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Children whose name matches `pattern` (one level, like the patterns embshard uses)."""
        return iter([self._child(i) for i in self._listing(recursive=False)
                     if fnmatch.fnmatch(posixpath.basename(i.path), pattern)])

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        return iter([self._child(i) for i in self._listing(recursive=True)
                     if fnmatch.fnmatch(posixpath.basename(i.path), pattern)])

    def check_bucket(self) -> None:
        """StorageError unless the bucket exists and these credentials may list it."""
        if self._call(self.fs.get_file_info, self.bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: the bucket does not exist")
        self._listing(recursive=False)

    # -- reading and writing ---------------------------------------------------------------------

    def open(self, mode: str = "r") -> IO[Any]:
        if mode == "rb":
            return cast(IO[bytes], self._call(self.fs.open_input_file, self.path))
        if mode == "wb":
            return cast(IO[bytes], self._call(self.fs.open_output_stream, self.path))
        raise ValueError(f"RemotePath.open: mode {mode!r} (binary 'rb' or 'wb' only)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return cast(bytes, self._call(f.read))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        def write() -> None:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        self._call(write)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to create: a prefix exists once an object is written under it."""

    def unlink(self) -> None:
        self._call(self.fs.delete_file, self.path)

    def rename(self, target: "StoragePath", marker: str | None = None) -> "RemotePath":
        """Copy every object under this prefix (or this object) to `target` (in the same store),
        then delete the originals, so every object was copied before anything is deleted. The
        object named `marker` is copied last and deleted first: a copy cut short leaves a target
        without it and a source without it, both of which readers refuse."""
        target = cast(RemotePath, target)
        if self.is_file():
            self._call(self.fs.copy_file, self.path, target.path)
            self.unlink()
            return target
        files = sorted((i.path for i in self._listing(recursive=True) if i.type == pafs.FileType.File),
                       key=lambda p: (posixpath.relpath(p, self.path) == marker, p))
        for path in files:
            rel = posixpath.relpath(path, self.path)
            self._call(self.fs.copy_file, path, f"{target.path}/{rel}")
        for path in reversed(files):
            self._call(self.fs.delete_file, path)
        if not any(i.type == pafs.FileType.File for i in self._listing(recursive=True)):
            # pyarrow leaves a marker object for each prefix it emptied (a dataset's staging prefix
            # and its train/, valid/, ... below it): it would still list as a step, or stay in the bucket.
            self._call(self.fs.delete_dir, self.path)
        return target

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return retrying(self.uri, fn, *args, **kwargs)
        except (OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError) and "NO_SUCH_BUCKET" not in str(e):
                raise FileNotFoundError(f"{self.uri}: not found") from None
            raise StorageError(f"{self.uri}: {reason(e)}") from None


StoragePath = Union[Path, RemotePath]


def relative(path: StoragePath, root: StoragePath) -> str:
    """`path` relative to the folder `root` it is in, as a POSIX string (a manifest's file name)."""
    if isinstance(path, RemotePath):
        return str(path.relative_to(cast(RemotePath, root)))
    return str(path.relative_to(cast(Path, root)))


def arrow_source(path: StoragePath) -> tuple[pafs.FileSystem | None, str]:
    """(file system, path) for pyarrow readers such as `pq.ParquetFile(path, filesystem=fs)`."""
    if isinstance(path, RemotePath):
        return path.fs, path.path
    return None, str(path)


def move(source: StoragePath, target: StoragePath, marker: str | None = None) -> None:
    """Rename a folder (local: one atomic rename; object storage: see RemotePath.rename)."""
    if isinstance(source, RemotePath):
        source.rename(target, marker=marker)
    else:
        source.rename(cast(Path, target))  # moves stay within one store: a local folder's target is local


def rmtree(path: StoragePath) -> None:
    """Remove a folder or prefix that this process wrote itself (a staging area, a pruned step)."""
    if isinstance(path, RemotePath):
        if path.exists():
            path._call(path.fs.delete_dir, path.path)  # its objects and the prefix's marker
    else:
        shutil.rmtree(path, ignore_errors=True)


def copytree(source: StoragePath, target: StoragePath) -> None:
    """Copy a folder between any two locations (local or remote, either way)."""
    if isinstance(source, Path) and isinstance(target, Path):
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    for f in source.rglob("*"):
        if f.is_file():
            rel = f.relative_to(source)  # type: ignore[arg-type]
            copy_file(f, target / str(rel))


def copy_file(source: StoragePath, target: StoragePath) -> None:
    """Stream one file between any two locations (a connection lost midway: the whole copy again)."""
    if isinstance(source, Path) and isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)

    def copy() -> None:
        with source.open("rb") as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    remote = target if isinstance(target, RemotePath) else source
    try:
        retrying(str(remote), copy)
    except OSError as e:
        # An upload fails when its stream is closed (the multipart upload completes there).
        raise StorageError(f"{target}: {reason(e)}") from None


def upload(staging: Path, out: RemotePath, marker: str) -> None:
    """Upload the complete local folder `staging` to `out`, the file `marker` last, so `out` holds
    a marker only once everything else is in place. On failure what this upload wrote is removed
    again (never anything it did not write), as far as the store still answers."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != marker)
    written: list[RemotePath] = []
    try:
        for f in [*files, staging / marker]:
            target = out / str(f.relative_to(staging))
            copy_file(f, target)
            written.append(target)
    except BaseException:
        for n, target in enumerate(reversed(written)):
            try:  # once, unretried: the store that just failed is likely to refuse this too
                target.fs.delete_file(target.path)
            except Exception:  # noqa: BLE001 - any refusal ends the clean-up alike
                print(f"warning: {out}: {len(written) - n} objects of an unfinished upload left "
                      f"(without {marker}, so nothing reads them)", file=sys.stderr)
                break
        raise


def check_reachable(path: StoragePath) -> None:
    """StorageError when `path` is in a bucket that is missing or refuses these credentials:
    said once, up front, instead of as a "not found" of the first file looked for."""
    if isinstance(path, RemotePath):
        path.check_bucket()


def check_writable(path: StoragePath, what: str) -> None:
    """`check_reachable`, and StorageError when an object holds the prefix's own key; for a local
    folder EnvironmentProblem when it cannot be created or written in (a read-only mount, no
    permission): said before a run trains, where the first
    checkpoint found it after the whole run had trained (the only save when every_steps is unset)."""
    if isinstance(path, RemotePath):
        path.check_bucket()
        if path.is_file():
            # Written below it, a folder's objects list as no folder: a dataset there could not be
            # replaced, a run's checkpoints there were never found (its restart trained from step 0).
            raise StorageError(f"{what} {path}: an object is stored under this very key, so what is written below "
                               "it would not read as a folder; move that object, or give another prefix")
        return
    existing = nearest_existing(path)  # checked there, not made: a run refused later leaves nothing
    if not existing.is_dir():
        raise EnvironmentProblem(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # EROFS too: access(2) reports a read-only mount
        raise EnvironmentProblem(f"{what} {path}: cannot write in {existing}")


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (or is a link): where whether it can be
    created is decided."""
    path = path.absolute()
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path
