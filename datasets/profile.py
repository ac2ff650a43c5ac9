"""Per-feature id frequencies over the TRAIN split: what the planner ranks rows and sizes tables by.

Layout::

    DIR/profile/profile.json    # {feature: {rows, total_ids, distinct_ids, mean_ids_per_row, sha256}}
    DIR/profile/<feature>.npy   # int64 counts[id], length = cardinality
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embshard.datasets.outdir import check_profile_replaceable, drop_staging, make_staging, replace_folder, writing
from embshard.datasets.schema import (
    PROFILE_DIR,
    PROFILE_FILE,
    SPEC_FILE,
    DatasetSpec,
    check_ids,
    check_no_nulls,
    check_part_schema,
    flat_ids,
)
from embshard.datasets.storage import StoragePath, arrow_source, location, read_json
from embshard.datasets.verify import read_row_group, verify_split
from embshard.errors import DataError, EnvironmentProblem
from embshard.progress import progress_bar
from embshard.units import human_bytes


@dataclass(frozen=True)
class FeatureStats:
    rows: int
    total_ids: int
    distinct_ids: int
    mean_ids_per_row: float  # the pooling factor
    # Of the count file, so that one copied in from other data with the same total is refused
    # (profiles written before it have none, and are checked by their total alone).
    sha256: str | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "total_ids", "distinct_ids"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} {value!r} is no count")
        mean = self.mean_ids_per_row
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not 0 <= mean <= self.total_ids:
            # Above total_ids, no row count gives it (1e308 was an OverflowError in TorchRec's planner).
            raise ValueError(f"mean_ids_per_row {mean!r} is no pooling factor of {self.total_ids:,} ids")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and len(self.sha256) == 64
                                            and all(c in "0123456789abcdef" for c in self.sha256)):
            raise ValueError(f"sha256 {self.sha256!r} is no digest")


def counts_digest(counts: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(counts, dtype="<i8").data).hexdigest()


@dataclass
class Profile:
    directory: StoragePath  # DIR/profile
    stats: dict[str, FeatureStats]
    cardinalities: dict[str, int]  # dataset.json's, which each count file's length must be
    _counts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def features(self) -> list[str]:
        return list(self.stats)

    def counts(self, name: str) -> np.ndarray:
        """counts[id] over the train split (loaded lazily: a profile may hold millions of ids)."""
        if name not in self.stats:
            raise DataError(f"{self.directory / PROFILE_FILE}: no feature {name!r}")
        if name not in self._counts:
            path = self.directory / f"{name}.npy"
            rerun = "rerun `embshard data profile` on the dataset"
            try:
                # A local file as it is (no second copy in memory); an object-store stream whole
                # first: np.load seeks, and such a stream reads best in one go.
                counts = np.load(path if isinstance(path, Path) else io.BytesIO(path.read_bytes()))
            except FileNotFoundError:
                raise DataError(f"{path}: missing from the profile; {rerun}") from None
            except (ValueError, EOFError) as e:
                raise DataError(f"{path}: not a count file ({e}); {rerun}") from None
            # What profile.json vouches for: a stale, cut or foreign file planned silently.
            stats = self.stats[name]
            if counts.ndim != 1 or counts.dtype.kind not in "iu" or int(counts.sum()) != stats.total_ids \
                    or (counts.size and int(counts.min()) < 0) \
                    or (stats.sha256 is not None and counts_digest(counts) != stats.sha256):
                raise DataError(f"{path}: not the counts profile.json describes ({stats.total_ids:,} ids "
                                f"of feature {name!r}); {rerun}")
            cardinality = self.cardinalities.get(name)
            if cardinality is not None and counts.size != cardinality:
                # dataset.json's cardinality edited (or the data rewritten) since the profile.
                raise DataError(f"{path}: counts {counts.size:,} ids of feature {name!r}, {SPEC_FILE} gives it "
                                f"cardinality {cardinality:,}; {rerun}")
            self._counts[name] = counts
        return self._counts[name]

    def lazy_counts(self, features: Mapping[str, str]) -> "IdCounts":
        """`counts` by another name (a plan's feature -> the data's), each read when first asked
        for: a policy that never looks (uniform) reads none."""
        return _LazyCounts(self, dict(features))

    def pooling_factor(self, name: str) -> float:
        if name not in self.stats:
            raise DataError(f"{self.directory / PROFILE_FILE}: no feature {name!r}")
        return self.stats[name].mean_ids_per_row


# A feature's ids of one row group are counted by sorting them when its cardinality is more
# than this many times their number, else by a bincount over every id of the feature.
_SORT_BELOW = 16


def write_profile(dataset_dir: str | Path) -> Profile:
    """The profile of the dataset `dataset_dir`, written into it. The dataset and its profile are
    locked from the check, before the counting, to the end: a replace of the dataset meanwhile
    (`--overwrite`) left a bucket's profile with half of its features, both commands saying they
    wrote theirs."""
    with writing(location(dataset_dir)), writing(location(dataset_dir) / PROFILE_DIR):
        return counted_profile(dataset_dir)


def _zero_counts(spec: DatasetSpec, where: StoragePath) -> dict[str, np.ndarray]:
    counts = {}
    for f in spec.sparse:
        try:
            counts[f.name] = np.zeros(f.cardinality, dtype=np.int64)
        except MemoryError:  # was "out of memory (... 8.00 PiB ...)", naming no feature
            raise EnvironmentProblem(f"{where}: sparse feature {f.name!r}: the counts of its {f.cardinality:,} ids "
                                     f"need {human_bytes(8 * f.cardinality)}, more than this machine can give (is "
                                     f"{SPEC_FILE}'s cardinality right?)") from None
    return counts


def counted_profile(dataset_dir: str | Path) -> Profile:
    """`write_profile` without its locks: for a writer's own staging folder, no other's to write."""
    spec = DatasetSpec.load(dataset_dir)
    check_profile_replaceable(location(dataset_dir) / PROFILE_DIR)  # before the counting, not after it
    parts = verify_split(dataset_dir, spec, "train")
    for path, meta in parts:  # what the reader checks, so a profile fails as one line where training would
        check_part_schema(path, meta.schema.to_arrow_schema(), spec)
    files = [path for path, _ in parts]
    counts = _zero_counts(spec, location(dataset_dir))
    rows = 0
    total_groups = sum(meta.num_row_groups for _, meta in parts)
    with progress_bar(total=total_groups, desc="profile", unit="row groups", leave=False) as bar:
        for path in files:
            fs, source = arrow_source(path)
            parquet = pq.ParquetFile(source, filesystem=fs)
            rows_in_file = 0
            for g in range(parquet.num_row_groups):
                table = read_row_group(parquet, path, g, rows_in_file, spec.sparse_names)
                check_no_nulls(path, table, spec.sparse_names, rows_in_file)
                for f in spec.sparse:
                    ids, offsets = flat_ids(table[f.name])
                    check_ids(path, f.name, ids, f.cardinality, offsets=offsets, first_row=rows_in_file)
                    if f.cardinality > _SORT_BELOW * ids.size:
                        # A full-cardinality bincount per row group made a profile cost (row
                        # groups x cardinality): 0.5 s a group at 40M ids. Sorting the group's
                        # ids costs the group alone.
                        seen, times = np.unique(ids, return_counts=True)
                        counts[f.name][seen] += times
                    else:
                        counts[f.name] += np.bincount(ids, minlength=f.cardinality)
                rows += table.num_rows
                rows_in_file += table.num_rows
                bar.update()
    # A dataset written over this one meanwhile (`--overwrite`) gave some of these rows, and would
    # get their counts as its profile.
    spec.check_still_at(dataset_dir, "its profile")
    directory = location(dataset_dir) / PROFILE_DIR
    stats = {}
    # Staged and swapped in whole: an interrupted profile must not leave a truncated count file
    # beside an earlier profile.json that vouches for it.
    staging = make_staging(directory, in_place=False)
    try:
        for name, c in counts.items():
            np.save(staging / f"{name}.npy", c)
            total = int(c.sum())
            stats[name] = FeatureStats(rows, total, int(np.count_nonzero(c)), total / rows if rows else 0.0,
                                       counts_digest(c))
        (staging / PROFILE_FILE).write_text(
            json.dumps({n: dataclasses.asdict(s) for n, s in stats.items()}, indent=2) + "\n")
        replace_folder(staging, directory, PROFILE_FILE)
    except BaseException:
        drop_staging(staging)
        raise
    return Profile(directory, stats, _cardinalities(spec), counts)


def load_profile(dataset_dir: str | Path) -> Profile:
    directory = location(dataset_dir) / PROFILE_DIR
    path = directory / PROFILE_FILE
    if not path.is_file():
        raise DataError(f"{path}: no id-frequency profile; run `embshard data profile {dataset_dir}`")
    raw = read_json(path, DataError)
    try:
        stats = {name: FeatureStats(**s) for name, s in raw.items()}
    except (TypeError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: malformed profile ({e}); rerun `embshard data profile {dataset_dir}`") from None
    # A profile of another writing of the data (its train split cut or grown since) was planned on.
    spec = DatasetSpec.load(dataset_dir)
    train_rows = spec.rows.get("train")
    counted = {s.rows for s in stats.values()}
    if train_rows is not None and counted and counted != {train_rows}:
        raise DataError(f"{path}: counted {min(counted):,} train rows, {SPEC_FILE} records {train_rows:,}: a profile "
                        f"of other data; rerun `embshard data profile {dataset_dir}`")
    return Profile(directory, stats, _cardinalities(spec))


def _cardinalities(spec: DatasetSpec) -> dict[str, int]:
    return {f.name: f.cardinality for f in spec.sparse}


class IdCounts(Mapping[str, np.ndarray]):
    """feature -> counts[id], and each feature's total lookups, which a policy that weighs whole
    tables (MDE across tables) reads without the counts: 8 bytes an id, 8 GB for a 1e9-row table."""

    def __init__(self, counts: Mapping[str, np.ndarray]) -> None:
        self._counts = counts

    def __getitem__(self, name: str) -> np.ndarray:
        return self._counts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def total(self, name: str) -> int:
        return int(np.asarray(self[name]).sum())

    @staticmethod
    def of(counts: Mapping[str, np.ndarray]) -> "IdCounts":
        return counts if isinstance(counts, IdCounts) else IdCounts(counts)


class _LazyCounts(IdCounts):
    def __init__(self, profile: Profile, features: dict[str, str]) -> None:
        super().__init__({})
        self.profile = profile
        self.features = features

    def __getitem__(self, name: str) -> np.ndarray:
        return self.profile.counts(self.features[name])

    def total(self, name: str) -> int:
        stats = self.profile.stats.get(self.features[name])
        if stats is None:  # said as `counts` says it
            return super().total(name)
        return stats.total_ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def __contains__(self, name: object) -> bool:  # Mapping's own reads the counts to answer
        return name in self.features
