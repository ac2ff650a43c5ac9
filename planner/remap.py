"""Row remaps: the id -> ranked-row permutation a blocked table applies before its lookup.

A remap is a 1-D int64 array `r` of length `num_embeddings` with `r[id]` = the row the id moves to;
blocks are contiguous ranges of those ranked rows. It is stored as `.npy` next to the plan, under a
name that carries a digest of its rows (`t_C1.<digest>.remap.npy`): two plans in one folder, or a
plan and the one it replaces, then never write one file name with two orders, and a plan can never
read an order it was not made with.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from embshard.datasets.storage import StoragePath, written_whole
from embshard.errors import PlanError, first_line, no_file

REMAP_SUFFIX = ".remap.npy"
DIGEST_CHARS = 16  # of the rows' sha256 in the file name: 64 bits, no collision among a folder's plans


def frequency_ranking(counts: np.ndarray) -> np.ndarray:
    """id -> rank by descending count; equal counts keep id order (stable) so plans reproduce."""
    counts = np.asarray(counts)
    order = np.argsort(-counts.astype(np.int64), kind="stable")  # rank -> id
    ranks = np.empty(len(counts), dtype=np.int64)
    ranks[order] = np.arange(len(counts), dtype=np.int64)
    return ranks


def check_remap(remap: np.ndarray, num_embeddings: int, where: str) -> np.ndarray:
    """Raise PlanError unless `remap` is a permutation of range(num_embeddings)."""
    _check_shape(remap.dtype, remap.shape, num_embeddings, where)
    if len(remap) and (remap.min() < 0 or remap.max() >= num_embeddings):
        raise PlanError(f"{where}: remap has rows outside [0, {num_embeddings})")
    if len(remap) and np.bincount(remap, minlength=num_embeddings).max() > 1:
        raise PlanError(f"{where}: remap sends two ids to the same row (not a permutation)")
    return remap.astype(np.int64, copy=False)


def save_remap(out_dir: Path | None, table: str, remap: np.ndarray) -> str:
    """Write `table`'s remap into the plan's folder; returns the name TablePlan.remap stores."""
    if out_dir is None:
        raise PlanError(
            f"table {table!r} reorders its rows: planning it needs an output folder for the remap"
        )
    ranks = np.ascontiguousarray(remap, dtype=np.int64)
    name = f"{table}.{hashlib.sha256(ranks.data).hexdigest()[:DIGEST_CHARS]}{REMAP_SUFFIX}"
    with written_whole(Path(out_dir) / name) as tmp, tmp.open("wb") as f:
        np.save(f, ranks, allow_pickle=False)
    return name


def load_remap(path: StoragePath, num_embeddings: int) -> np.ndarray:
    if not path.is_file():
        raise PlanError(f"{path}: {no_file(path, 'remap file')}")
    try:
        # Bytes first: the plan folder of a checkpoint may be in object storage (a RemotePath).
        data = path.read_bytes()
        _check_header(data, num_embeddings, str(path))
        remap = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        # numpy's own text for a file of another kind advises allow_pickle=True: not for a remap.
        why = "a pickle or text file" if "allow_pickle" in str(e) else first_line(e)
        raise PlanError(f"{path}: not a .npy array ({why})") from None
    if not isinstance(remap, np.ndarray):  # np.load reads an .npz archive too
        raise PlanError(f"{path}: not a .npy array (an .npz archive)")
    return check_remap(remap, num_embeddings, str(path))


def _check_shape(dtype: np.dtype, shape: tuple[int, ...], num_embeddings: int, where: str) -> None:
    # By kind: numpy counts timedelta64 among its integers, and the cast to int64 then failed.
    if len(shape) != 1 or dtype.kind not in "iu":
        raise PlanError(f"{where}: remap must be a 1-D integer array, got {dtype} {shape}")
    if shape[0] != num_embeddings:
        raise PlanError(f"{where}: remap has {shape[0]} entries, table has {num_embeddings} rows")


def _check_header(data: bytes, num_embeddings: int, where: str) -> None:
    """The array a .npy header claims, checked before it is read: a header claiming 10**12
    entries in a file of 200 bytes had numpy allocate 7 TiB. A file without a readable header is
    left to np.load, which says why."""
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except ValueError:
        return
    _check_shape(dtype, shape, num_embeddings, where)
