"""Streaming, rank-partitioned batches from a dataset split.

Work is split across ranks by rows of Parquet row groups: each epoch the row groups are
(optionally) shuffled with a seeded RNG, laid end to end, and rank r takes the r-th of world_size
equal contiguous row ranges, so ranks stay balanced even when a split has fewer row groups than
there are ranks (a small validation split, say). A rank reads only the row groups its range
touches; the two ranks that share a group shuffle it identically and take disjoint slices. Ranks
run collective ops every step, so all of them must yield the same number of batches: that number
is computed from Parquet metadata alone (no data read): the fewest full batches of any rank when
the last partial batch is dropped (training), else the most batches of any rank, every row read
(evaluation: see `_batch_sizes`). Batches are assembled on a background thread into a bounded
queue so the training loop rarely waits for I/O.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from embshard.datasets.schema import DatasetSpec, check_ids, check_no_nulls, check_part_schema, flat_ids, split_dir
from embshard.datasets.storage import StoragePath, arrow_source, retrying, storage_failure
from embshard.datasets.verify import read_row_group, verify_split
from embshard.errors import ConfigError, DataError, StorageError

# The largest magnitude whose square float32 holds (1.8e19).
SQUARE_OVERFLOW = math.sqrt(float(np.finfo(np.float32).max))


@dataclass
class Batch(Pipelineable):
    """Pipelineable so TorchRec's train pipelines can move it to the device and mark the streams
    that use it ahead of the step that trains it."""

    dense: torch.Tensor  # [B, num_dense] float32 (num_dense may be 0)
    sparse: KeyedJaggedTensor  # keys = spec.sparse_names in order; values int64, lengths int32
    labels: torch.Tensor  # [B] float32
    extra: dict[str, torch.Tensor]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            extra={k: v.to(device, non_blocking=non_blocking) for k, v in self.extra.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        if isinstance(stream, torch.cpu.Stream):  # only a device's caching allocator tracks streams
            return
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        for v in self.extra.values():
            v.record_stream(stream)


@dataclass(frozen=True)
class _RowGroup:
    path: StoragePath
    index: int  # row group index within the file
    first_row: int  # file row of the group's first row (error messages name file rows)
    rows: int
    ordinal: int  # position in the split's row-group list: seeds the in-group shuffle


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of a (shuffled) row group that belong to one rank."""

    group: _RowGroup
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class _Failure:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ParquetBatchReader:
    """One epoch per iteration; `set_epoch(e)` picks the shuffle, `state_dict` allows exact resume.

    With drop_last=False every row of the split is read once (a split of fewer rows than ranks is
    refused: a rank without rows has no batch to give), and every rank yields as many batches,
    ceil(rows / B) of the rank with the most rows (`_batch_sizes`). It was that of
    the rank with the fewest, and the larger ranks' last rows were never evaluated: a metric that
    changed with the number of workers.
    """

    def __init__(self, dataset_dir: str | Path, split: str, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 id_maps: Mapping[str, np.ndarray] | None = None, prefetch: int = 4,
                 validate: bool = True, replaced: str = "run again on the dataset there now") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside [0, world_size={world_size})")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {prefetch}")
        if not drop_last and batch_size == 1 and world_size > 1:
            # A rank one row short of another then has no batch to split in two (`_batch_sizes`).
            raise ConfigError("an evaluation batch of 1 row cannot cover a split shared by several ranks; use "
                              "data.eval_batch_size 2 or more")
        self.spec = DatasetSpec.load(dataset_dir)
        self.dataset_dir = dataset_dir
        self.replaced = replaced  # what to do once the dataset is replaced under this reader
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.validate = validate
        self.columns = [self.spec.label, *self.spec.dense, *self.spec.sparse_names, *self.spec.extra]
        # The columns whose values train through a square (see _check_values), known once, not per row group.
        self.squared = {*self.spec.dense, *([self.spec.label] if self.spec.target != "click" else [])}
        self.split = split
        self.split_path = split_dir(dataset_dir, split)
        self._footers: dict[StoragePath, pq.FileMetaData] = {}  # each part's, as read at the start
        self.groups = self._row_groups(dataset_dir, split)
        self.id_maps = self._check_id_maps(id_maps or {})
        self.epoch = 0
        self.wait_seconds = 0.0  # cumulative time the consumer blocked on the queue
        self._consumed = 0
        self._resume: tuple[int, int] | None = None
        if not drop_last and len(self) == 0:
            # Before training: the test split is read after it, and "no rows to evaluate on" came
            # then, for a split that has rows.
            rows = sum(g.rows for g in self.groups)
            raise DataError(f"{self.split_path}: no rows to evaluate on" if rows == 0 else
                            f"{self.split_path}: {rows:,} row(s), fewer than the {world_size} ranks that each "
                            "evaluate a share of the split; use fewer workers or a larger split")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        resume = self._resume
        self._consumed = resume[1] if resume is not None and resume[0] == epoch else 0

    def __len__(self) -> int:
        rows = [sum(p.rows for p in pieces) for pieces in self._assignment(self.epoch)]
        if self.drop_last:
            return min(r // self.batch_size for r in rows)
        if min(rows) == 0:  # a split of fewer rows than ranks: a rank without rows has no batch to give
            return 0
        return max(math.ceil(r / self.batch_size) for r in rows)

    def _batch_sizes(self, rows: int, batches: int) -> list[int]:
        """The sizes of the `batches` batches a rank of `rows` rows yields: full ones, then, without
        drop_last, its partial last one. Ranks' rows differ by one at most, so a rank short of a
        batch holds exactly one fewer batch's worth, and yields its last one as B - 1 rows and 1."""
        full, rest = divmod(rows, self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        if not self.drop_last and len(sizes) < batches:
            sizes[-1:] = [self.batch_size - 1, 1]
        return sizes[:batches]

    def state_dict(self) -> dict:
        return self.state_after(self._consumed)

    def state_after(self, batches: int) -> dict:
        """The state once `batches` of the current epoch are consumed: a consumer that fetches
        ahead (a train pipeline) saves the batches it trained, not those it fetched."""
        return {"epoch": self.epoch, "batches": batches}

    def load_state_dict(self, state: Mapping) -> None:
        """The next iteration of epoch state['epoch'] skips the batches already consumed."""
        self.epoch = int(state["epoch"])
        self._consumed = int(state["batches"])
        self._resume = (self.epoch, self._consumed)

    def __iter__(self) -> Generator[Batch, None, None]:
        epoch = self.epoch
        skip = self._resume[1] if self._resume and self._resume[0] == epoch else 0
        self._resume = None
        total = len(self)
        skip = min(skip, total)
        self._consumed = skip
        pieces = self._assignment(epoch)[self.rank]
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(pieces, epoch, skip, total - skip, out, stop),
            name=f"embshard-reader-r{self.rank}", daemon=True)
        worker.start()
        try:
            for _ in range(total - skip):
                start = time.perf_counter()
                item = out.get()
                self.wait_seconds += time.perf_counter() - start
                if isinstance(item, _Failure):
                    raise item.error
                self._consumed += 1
                yield item
        finally:
            stop.set()
            # Unblock a producer stuck on a full queue so it sees `stop` and exits.
            while worker.is_alive():
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()

    # -- planning (metadata only) --------------------------------------------------------------

    def _row_groups(self, dataset_dir: str | Path, split: str) -> list[_RowGroup]:
        groups: list[_RowGroup] = []
        # verify_split reads each footer once: a missing or truncated part fails here, not mid-epoch.
        for path, meta in verify_split(dataset_dir, self.spec, split):
            self._footers[path] = meta
            if self.validate:
                check_part_schema(path, meta.schema.to_arrow_schema(), self.spec)
            first = 0
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                groups.append(_RowGroup(path, i, first, n, len(groups)))
                first += n
        return groups

    def _assignment(self, epoch: int) -> list[list[_Piece]]:
        order = np.arange(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        groups = [self.groups[i] for i in order]
        ends = np.cumsum([g.rows for g in groups])
        total = int(ends[-1]) if len(ends) else 0
        bounds = [total * r // self.world_size for r in range(self.world_size + 1)]
        pieces: list[list[_Piece]] = []
        for r in range(self.world_size):
            lo, hi = bounds[r], bounds[r + 1]
            mine = []
            for g, end in zip(groups, ends, strict=True):
                begin = int(end) - g.rows
                if begin < hi and end > lo:
                    mine.append(_Piece(g, max(lo, begin) - begin, min(hi, int(end)) - begin))
            pieces.append(mine)
        return pieces

    def _check_id_maps(self, id_maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = {}
        for name, mapping in id_maps.items():
            card = self.spec.feature(name).cardinality
            mapping = np.asarray(mapping, dtype=np.int64)
            if mapping.shape != (card,):
                raise ConfigError(f"id_maps[{name!r}]: shape {mapping.shape}, expected ({card},)")
            checked[name] = mapping
        return checked

    # -- producer thread -----------------------------------------------------------------------

    def _produce(self, pieces: list[_Piece], epoch: int, skip_batches: int, n_batches: int,
                 out: queue.Queue, stop: threading.Event) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        made = 0
        reading: StoragePath = self.split_path
        try:
            files: dict[StoragePath, pq.ParquetFile] = {}
            sizes = self._batch_sizes(sum(p.rows for p in pieces), skip_batches + n_batches)
            skip_rows, sizes = sum(sizes[:skip_batches]), sizes[skip_batches:]
            pending: list[pa.Table] = []
            pending_rows = 0
            for piece in pieces:
                if made == n_batches or stop.is_set():
                    break
                # Resume: pieces already consumed are skipped without reading them; the in-group
                # shuffle is seeded per group, so the rest is identical to before.
                if skip_rows >= piece.rows:
                    skip_rows -= piece.rows
                    continue
                group = piece.group
                reading = group.path
                if group.path not in files:
                    self.spec.check_still_at(self.dataset_dir, f"split {self.split} (epoch {epoch})", self.replaced)
                    fs, source = arrow_source(group.path)
                    files[group.path] = retrying(str(group.path), pq.ParquetFile, source, filesystem=fs)
                    if not files[group.path].metadata.equals(self._footers[group.path]):
                        # Written part by part with dataset.json last (or left alone), another
                        # dataset's part copied over one of these trained without a word.
                        raise DataError(f"{group.path}: replaced while split {self.split} (epoch {epoch}) read the "
                                        "dataset (its footer is not the one read when the run started); stopped "
                                        "before reading it")
                table = retrying(str(group.path), self._load, files[group.path], group, epoch)
                table = table.slice(piece.start + skip_rows, piece.rows - skip_rows)
                skip_rows = 0
                pending.append(table)
                pending_rows += table.num_rows
                while made < n_batches and pending_rows >= sizes[made]:
                    # Permissive: parts rewritten by Spark (list items not null) beside embshard's.
                    merged = pa.concat_tables(pending, promote_options="permissive")
                    if not put(self._batch(merged.slice(0, sizes[made]))):
                        return
                    rest = merged.slice(sizes[made])
                    made += 1
                    pending, pending_rows = [rest], rest.num_rows
        except BaseException as e:  # noqa: BLE001 - every failure must reach the consumer
            replaced = self._replaced(epoch) if isinstance(e, Exception) else None
            failed = storage_failure(e, reading)
            if replaced is not None:  # a part file read as garbage, or gone, because another dataset took its place
                e = replaced
            elif failed is not None:  # the store, not the data: say which read of the run it ended
                e = StorageError(f"{failed} while reading batch {skip_batches + made + 1} of split "
                                 f"{self.split} (epoch {epoch})")
            put(_Failure(e))

    def _replaced(self, epoch: int) -> DataError | None:
        """The error saying the dataset was written again under this read, if it was: in a bucket,
        a part file replaced mid-epoch failed as a store's error ("Couldn't deserialize thrift")."""
        try:
            self.spec.check_still_at(self.dataset_dir, f"split {self.split} (epoch {epoch})", self.replaced)
        except DataError as replaced:
            return replaced
        except Exception:  # noqa: BLE001 - the store cannot say now: the read's own failure stands
            return None
        return None

    def _load(self, parquet: pq.ParquetFile, group: _RowGroup, epoch: int) -> pa.Table:
        table = read_row_group(parquet, group.path, group.index, group.first_row, self.columns)
        if self.validate:
            self._check_values(table, group)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, group.ordinal])
            table = table.take(rng.permutation(table.num_rows))
        for name, mapping in self.id_maps.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, _map_ids(table[name], mapping))
        return table

    def _check_values(self, table: pa.Table, group: _RowGroup) -> None:
        # Extras too: a null in an integer one made its batch float64 with a NaN, without a word.
        check_no_nulls(group.path, table, self.columns, group.first_row)
        floats = [e for e in self.spec.extra if pa.types.is_floating(table[e].type)]
        labels = table[self.spec.label].to_numpy()
        # Squared where they train: a loss of a rating's error, the optimizer's state of a weight a
        # dense value feeds. One train row of 3e38 trained to exit 0 and AUC 0.50; in valid it was
        # "evaluate() returned logloss = inf", blamed on the model.
        for name in [self.spec.label, *self.spec.dense, *floats]:
            values = labels if name == self.spec.label else table[name].to_numpy()
            bad = ~(np.abs(values) <= SQUARE_OVERFLOW) if name in self.squared else ~np.isfinite(values)
            if not bad.any():
                continue
            row = int(np.flatnonzero(bad)[0])
            where = f"{group.path}: column {name!r}, row {group.first_row + row}"
            if not np.isfinite(values[row]):
                raise DataError(f"{where}: non-finite value {values[row]}")
            raise DataError(f"{where}: value {values[row]:g} is beyond ±{SQUARE_OVERFLOW:.2g}, where its square "
                            "overflows float32 (a squared error of it, or the optimizer's state of a weight it feeds, "
                            "is infinite); rescale the column (log1p of a count)")
        if self.spec.target == "click":
            # A BCE target: a label of 7 trained without a word, and one of 0.3 trained, then the
            # run died at its first evaluation (AUC is of clicks).
            bad = (labels != 0) & (labels != 1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(f"{group.path}: column {self.spec.label!r}, row {group.first_row + row}: "
                                f"label {labels[row]:g} is no click, 0 or 1 (dataset.json's target is click)")
        for f in self.spec.sparse:
            ids, offsets = flat_ids(table[f.name])
            check_ids(group.path, f.name, ids, f.cardinality, offsets=offsets, first_row=group.first_row)

    def _batch(self, table: pa.Table) -> Batch:
        n = table.num_rows
        if self.spec.dense:
            dense = np.column_stack([table[d].to_numpy() for d in self.spec.dense])
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        values, lengths = [], []
        for f in self.spec.sparse:
            ids, offsets = flat_ids(table[f.name])
            values.append(ids)
            lengths.append(np.diff(offsets).astype(np.int32) if offsets is not None else np.ones(n, np.int32))
        sparse = KeyedJaggedTensor(
            keys=self.spec.sparse_names,
            values=torch.from_numpy(np.concatenate(values)) if values else torch.empty(0, dtype=torch.int64),
            lengths=torch.from_numpy(np.concatenate(lengths)) if lengths else torch.empty(0, dtype=torch.int32),
            stride=n,
        )
        return Batch(
            dense=_tensor(dense, np.float32),
            sparse=sparse,
            labels=_tensor(table[self.spec.label].to_numpy(), np.float32),
            extra={e: _tensor(table[e].to_numpy(), None) for e in self.spec.extra},
        )


def _tensor(array: np.ndarray, dtype: type | None) -> torch.Tensor:
    # Arrow hands out read-only zero-copy views; torch tensors must own writable memory.
    return torch.from_numpy(np.require(array, dtype=dtype, requirements=["C", "W"]))


def _map_ids(column: pa.ChunkedArray, mapping: np.ndarray) -> pa.Array:
    ids, offsets = flat_ids(column)
    mapped = pa.array(mapping[ids])
    if offsets is None:
        return mapped
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), mapped)
