"""Writing a dataset directory: the 80/10/10 split by row order and Parquet part files with
fixed-size row groups, staged and renamed into place whole (see outdir.py). Shared by `synth` and
the converters so they all produce the same layout.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embshard.datasets.outdir import check_output, drop_staging, make_staging, publish
from embshard.datasets.profile import counted_profile
from embshard.datasets.schema import (
    ITEMS_DIR,
    OOV_ID,
    SPLITS,
    VOCAB_DIR,
    DatasetSpec,
    flat_ids,
    part_name,
    vocabulary_file,
)
from embshard.datasets.storage import location
from embshard.datasets.vocabulary import DATASET_KEY, PART_KEY, Vocabulary, part_stamp
from embshard.errors import DataError, EnvironmentProblem
from embshard.progress import progress_bar
from embshard.units import human_bytes

# Readers split work across ranks by row group, so groups must be small enough to balance ranks
# yet large enough that Parquet overhead stays negligible.
ROW_GROUP_ROWS = 8192
# Several part files let a directory listing show progress and keep any one file a few hundred MB.
PART_ROWS = 128 * ROW_GROUP_ROWS


TRAIN, VALID, TEST = range(3)  # split codes of SplitPlan.assignment, in SPLITS order


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Places `total` ordered positions (rows or input lines) in train/valid/test.

    Without `assignment` the cut is by order at 80/10/10 (the time split of time-ordered logs);
    with it, assignment[i] is the split code (TRAIN/VALID/TEST) of position i.
    """

    total: int
    assignment: np.ndarray | None = None
    kind: str = "time"  # recorded in dataset.json

    @staticmethod
    def random(total: int, seed: int) -> "SplitPlan":
        """Seeded row-level 80/10/10 with exact split sizes; one byte per position, so a
        45M-line Criteo file costs 45 MB."""
        order = SplitPlan(total)
        codes = np.repeat(np.array([TRAIN, VALID, TEST], dtype=np.int8),
                          [order.train_end, order.valid_end - order.train_end, total - order.valid_end])
        np.random.default_rng(seed).shuffle(codes)
        return SplitPlan(total, codes, "random")

    @property
    def train_end(self) -> int:
        return self.total * 8 // 10

    @property
    def valid_end(self) -> int:
        return self.train_end + self.total // 10

    @property
    def train_stop(self) -> int:
        """One past the last train position: a pass that needs only train rows can stop there."""
        if self.assignment is None:
            return self.train_end
        train = np.flatnonzero(self.assignment == TRAIN)
        return int(train[-1]) + 1 if train.size else 0

    def codes(self, positions: np.ndarray) -> np.ndarray:
        """The split code of each position."""
        if self.assignment is not None:
            return self.assignment[positions]
        return np.searchsorted([self.train_end, self.valid_end], positions, side="right").astype(np.int8)


@dataclass
class SplitStats:
    rows: int = 0
    positives: float = 0.0
    ids: dict[str, int] = field(default_factory=dict)  # sparse feature -> ids written
    oov: dict[str, int] = field(default_factory=dict)  # sparse feature -> of those, OOV_ID


class _SplitWriter:
    """Buffers incoming tables so every row group but a part's last holds ROW_GROUP_ROWS rows."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.part = 0
        self.part_rows = 0
        self.rows_per_part: list[int] = []
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush(whole_groups_only=True)

    def close(self) -> None:
        self._flush(whole_groups_only=False)
        if self.writer is None and self.part == 0 and self.part_rows == 0:
            # An empty split (tiny inputs) still gets a file, so every split has a readable schema.
            self._open()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.rows_per_part.append(self.part_rows)

    def _open(self) -> pq.ParquetWriter:
        name = part_name(self.part)
        # A part copied over another of as many rows (train's first over its second) carried the
        # same dataset stamp, and its rows were read twice without a word.
        stamps = {**(self.schema.metadata or {}), PART_KEY: part_stamp(self.directory.name, name).encode()}
        self.writer = pq.ParquetWriter(self.directory / name, self.schema.with_metadata(stamps))
        return self.writer

    def _flush(self, whole_groups_only: bool) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        n = table.num_rows
        if whole_groups_only:
            n -= n % ROW_GROUP_ROWS
        start = 0
        while start < n:
            writer = self.writer if self.writer is not None else self._open()
            take = min(n - start, PART_ROWS - self.part_rows)
            writer.write_table(table.slice(start, take), row_group_size=ROW_GROUP_ROWS)
            start += take
            self.part_rows += take
            if self.part_rows == PART_ROWS:
                writer.close()
                self.writer = None
                self.rows_per_part.append(self.part_rows)
                self.part += 1
                self.part_rows = 0
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows


class DatasetWriter:
    """Writes the three splits of one dataset into a staging folder beside `out_dir`; `finish`
    adds dataset.json (with the share of OOV_ID among the ids of each of `oov_features`) and the
    profile and renames the folder to `out_dir`.

    A non-empty `out_dir` is refused unless overwrite=True (and then it must hold a dataset);
    it is replaced only by a complete dataset. Use as a context manager: on any error the staging
    folder is removed and `out_dir` is left as it was.
    """

    def __init__(self, out_dir: str | Path, schema: pa.Schema, *, overwrite: bool = False,
                 label: str = "label", total_rows: int | None = None, desc: str = "writing",
                 oov_features: Sequence[str] = ()) -> None:
        self.out_dir = location(out_dir)
        self.schema = schema
        self.label = label
        self.overwrite = overwrite
        check_output(self.out_dir, overwrite)
        self.staging = make_staging(self.out_dir)
        try:  # a Ctrl-C or SIGTERM before `with` takes over must not leave the staging folder either
            # First: a SIGTERM inside tqdm's constructor left a half-made bar whose clean-up printed
            # "AttributeError: 'tqdm' object has no attribute 'pos'" below the one line.
            self.progress = progress_bar(total=total_rows, desc=desc, unit="rows", unit_scale=True, leave=False)
            self.dataset_id = uuid.uuid4().hex  # dataset.json's id, known to the vocabularies and part files
            # Each part file names its writing: one copied in from another dataset of as many rows
            # was read as this one's, and trained on without a word.
            stamped = schema.with_metadata({**(schema.metadata or {}), DATASET_KEY: self.dataset_id.encode()})
            self.splits: dict[str, _SplitWriter] = {}
            for split in SPLITS:
                d = self.staging / split
                d.mkdir()
                self.splits[split] = _SplitWriter(d, stamped)
            self.stats = {split: SplitStats() for split in SPLITS}
            # Only converters map values to OOV_ID; synth's id 0 is an ordinary value.
            self.oov_features = list(oov_features)
            self.total_rows = total_rows
            self.room_checked = False
            self.vocabularies: list[str] = []
        except BaseException:
            drop_staging(self.staging)
            raise

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, split: str, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self.splits[split].write(table)
        stats = self.stats[split]
        stats.rows += table.num_rows
        stats.positives += float(pc.sum(table[self.label]).as_py() or 0.0)
        for name in self.oov_features:
            ids, _ = flat_ids(table[name])
            stats.ids[name] = stats.ids.get(name, 0) + ids.size
            stats.oov[name] = stats.oov.get(name, 0) + int(np.count_nonzero(ids == OOV_ID))
        self.progress.update(table.num_rows)
        if not self.room_checked and self.rows_written >= PART_ROWS:
            self._check_room()

    @property
    def rows_written(self) -> int:
        return sum(st.rows for st in self.stats.values())

    def _check_room(self) -> None:
        """Once a part file's worth is written: EnvironmentProblem when the rest, at the bytes a row
        so far, cannot fit where it is staged (for object storage too: a local folder holds it until
        the upload). `synth --rows 100000000000000000000` wrote until the disk was full, and
        everything else writing there failed with it. `total_rows` may count input lines that turn
        out malformed or duplicate: a conversion is refused only when even its lines cannot fit."""
        self.room_checked = True
        written = self.rows_written
        if not self.total_rows or self.total_rows <= written:
            return
        staged = sum(f.stat().st_size for f in self.staging.rglob("*") if f.is_file())
        rest = staged / written * (self.total_rows - written)
        free = shutil.disk_usage(self.staging).free
        if rest > free:
            raise EnvironmentProblem(
                f"{self.out_dir}: {self.total_rows:,} rows need about {human_bytes(staged + rest)} "
                f"({staged / written:.0f} bytes a row as written so far), and {self.staging.parent} "
                f"has {human_bytes(free)} free; nothing written")

    def write_ordered(self, table: pa.Table, positions: np.ndarray, plan: SplitPlan) -> None:
        """Writes each row to the split `plan` gives its position (row or line index)."""
        codes = plan.codes(positions)
        for code, split in enumerate(SPLITS):
            mask = codes == code
            if mask.all():
                self.write(split, table)
            elif mask.any():
                self.write(split, table.filter(pa.array(mask)))

    def write_catalog(self, table: pa.Table, schema: pa.Schema) -> None:
        """The item catalog (see schema.ItemCatalog), published with the splits by `finish`."""
        directory = self.staging / ITEMS_DIR
        directory.mkdir()
        pq.write_table(table.select(schema.names).cast(schema), directory / part_name(0),
                       row_group_size=ROW_GROUP_ROWS)

    def write_vocabularies(self, vocabularies: Mapping[str, Vocabulary]) -> None:
        """Each feature's raw values in id order, published with the splits by `finish`."""
        (self.staging / VOCAB_DIR).mkdir()
        for name, vocabulary in vocabularies.items():
            vocabulary.write(self.staging / vocabulary_file(name), self.dataset_id, name)
        self.vocabularies = list(vocabularies)

    def finish(self, spec: DatasetSpec, *, source: str, skipped: int = 0, dropped: str = "",
               one_label_hint: str = "write more rows") -> DatasetSpec:
        """Publishes the dataset; `source` (and the `skipped` line count, and `dropped`: what else
        was left out, e.g. duplicate rows) name the input in errors. `one_label_hint`: what to do
        about a split whose click labels are all one (a converter's input sorted by label, say).

        A dataset with an empty split is refused: nothing could be trained, evaluated or tested
        on it, and a run would find out only once its cluster is up.
        """
        try:
            empty = [s for s, st in self.stats.items() if st.rows == 0]
            if empty:
                left_out = [f"{skipped:,} malformed lines skipped" if skipped else "", dropped]
                note = "".join(f"; {what}" for what in left_out if what)
                rows = ", ".join(f"{s} {st.rows:,}" for s, st in self.stats.items())
                raise DataError(f"{source}: 0 {empty[0]} rows ({rows}{note}); nothing written to {self.out_dir}")
            for w in self.splits.values():
                w.close()
            self.progress.close()
            spec = dataclasses.replace(
                spec, id=self.dataset_id, rows={s: st.rows for s, st in self.stats.items()},
                parts={s: w.rows_per_part for s, w in self.splits.items()}, vocabularies=self.vocabularies,
                oov_share={s: {f: st.oov[f] / n for f, n in st.ids.items() if n}
                           for s, st in self.stats.items()} if self.oov_features else {})
            spec.save(self.staging)
            counted_profile(self.staging)
            publish(self.staging, self.out_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        # Not for retrieval (an item catalog): it evaluates recall over positive rows alone.
        if spec.target == "click" and spec.catalog is None:
            self._warn_of_one_label(one_label_hint)
        return spec

    def _warn_of_one_label(self, hint: str) -> None:
        """A split of clicks whose every row has one label: its AUC is undefined, and a run found
        out at its first evaluation, once it had trained."""
        for split, st in self.stats.items():
            if st.positives in (0, st.rows):
                print(f"warning: {self.out_dir}: every one of the {st.rows:,} {split} rows has label "
                      f"{int(st.positives > 0)}, so a pointwise model's AUC there is undefined (a run evaluating it "
                      f"stops at its first evaluation); {hint}", file=sys.stderr)

    def abort(self) -> None:
        """Drops everything written so far; `out_dir` is untouched."""
        self.progress.close()
        for w in self.splits.values():
            if w.writer is not None:
                w.writer.close()
                w.writer = None
        drop_staging(self.staging)

    def summary(self, name: str, skipped: int = 0, target: str = "click", dropped: str = "") -> str:
        """target "rating": the labels are ratings, so their sum gives the mean rating, not a share.
        `dropped`: what else was left out, as `finish` says it."""
        rows = {s: st.rows for s, st in self.stats.items()}
        total = sum(rows.values())
        positives = sum(st.positives for st in self.stats.values())
        share = positives / total if total else 0.0
        parts = ", ".join(f"{s} {n:,}" for s, n in rows.items())
        labels = f"mean rating {share:.3f}" if target == "rating" else f"positives {share:.1%}"
        line = f"{name}: {total:,} rows ({parts}), {labels}"
        left_out = [f"skipped {skipped:,} malformed lines" if skipped else "", dropped]
        return line + "".join(f", {what}" for what in left_out if what)
