"""Per-feature id frequencies over the TRAIN split: what the planner ranks rows and sizes tables by.

Layout::

    DIR/profile/profile.json    # {feature: {rows, total_ids, distinct_ids, mean_ids_per_row}}
    DIR/profile/<feature>.npy   # int64 counts[id], length = cardinality
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from embshard.datasets.outdir import make_staging, replace_folder
from embshard.datasets.schema import PROFILE_DIR, DatasetSpec, check_ids, flat_ids
from embshard.datasets.storage import StoragePath, arrow_source, location, read_json
from embshard.datasets.verify import verify_split
from embshard.errors import DataError

PROFILE_FILE = "profile.json"


@dataclass(frozen=True)
class FeatureStats:
    rows: int
    total_ids: int
    distinct_ids: int
    mean_ids_per_row: float  # the pooling factor


@dataclass
class Profile:
    directory: StoragePath  # DIR/profile
    stats: dict[str, FeatureStats]
    _counts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def features(self) -> list[str]:
        return list(self.stats)

    def counts(self, name: str) -> np.ndarray:
        """counts[id] over the train split (loaded lazily: a profile may hold millions of ids)."""
        if name not in self.stats:
            raise DataError(f"{self.directory / PROFILE_FILE}: no feature {name!r}")
        if name not in self._counts:
            # Whole file first: np.load seeks, and an object-store stream reads best in one go.
            self._counts[name] = np.load(io.BytesIO((self.directory / f"{name}.npy").read_bytes()))
        return self._counts[name]

    def pooling_factor(self, name: str) -> float:
        if name not in self.stats:
            raise DataError(f"{self.directory / PROFILE_FILE}: no feature {name!r}")
        return self.stats[name].mean_ids_per_row


def write_profile(dataset_dir: str | Path) -> Profile:
    spec = DatasetSpec.load(dataset_dir)
    parts = verify_split(dataset_dir, spec, "train")
    files = [path for path, _ in parts]
    counts = {f.name: np.zeros(f.cardinality, dtype=np.int64) for f in spec.sparse}
    rows = 0
    total_groups = sum(meta.num_row_groups for _, meta in parts)
    with tqdm(total=total_groups, desc="profile", unit="row groups", leave=False) as bar:
        for path in files:
            fs, source = arrow_source(path)
            parquet = pq.ParquetFile(source, filesystem=fs)
            rows_in_file = 0
            for g in range(parquet.num_row_groups):
                table = parquet.read_row_group(g, columns=spec.sparse_names)
                for f in spec.sparse:
                    ids, offsets = flat_ids(table[f.name])
                    check_ids(path, f.name, ids, f.cardinality, offsets=offsets, first_row=rows_in_file)
                    counts[f.name] += np.bincount(ids, minlength=f.cardinality)
                rows += table.num_rows
                rows_in_file += table.num_rows
                bar.update()
    directory = location(dataset_dir) / PROFILE_DIR
    stats = {}
    # Staged and swapped in whole: an interrupted profile must not leave a truncated count file
    # beside an earlier profile.json that vouches for it.
    staging = make_staging(directory)
    try:
        for name, c in counts.items():
            np.save(staging / f"{name}.npy", c)
            total = int(c.sum())
            stats[name] = FeatureStats(rows, total, int(np.count_nonzero(c)), total / rows if rows else 0.0)
        (staging / PROFILE_FILE).write_text(
            json.dumps({n: dataclasses.asdict(s) for n, s in stats.items()}, indent=2) + "\n")
        replace_folder(staging, directory, PROFILE_FILE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Profile(directory, stats, counts)


def load_profile(dataset_dir: str | Path) -> Profile:
    directory = location(dataset_dir) / PROFILE_DIR
    path = directory / PROFILE_FILE
    if not path.is_file():
        raise DataError(f"{path}: no id-frequency profile; run `embshard data profile {dataset_dir}`")
    raw = read_json(path, DataError)
    try:
        stats = {name: FeatureStats(**s) for name, s in raw.items()}
    except (TypeError, AttributeError) as e:
        raise DataError(f"{path}: malformed profile ({e}); rerun `embshard data profile {dataset_dir}`") from None
    return Profile(directory, stats)

