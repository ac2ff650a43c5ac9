"""The whole planning pipeline in one call, shared by `embshard plan` and `embshard train`.

dataset spec + id profile + `embeddings:` config -> DimensionPlan -> TorchRec shard plan for a
topology -> memory report, saved together as one `plan.json` (remap files beside it). Training on
a saved plan rebuilds exactly the planned layout.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from embshard.config import EmbeddingsConfig
from embshard.datasets.profile import Profile, load_profile
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import StoragePath, read_json, write_whole, written_whole
from embshard.errors import ConfigError, PlanError
from embshard.planner.memory import MemoryReport, memory_report
from embshard.planner.optimizers import SparseOptimizer
from embshard.planner.policies import plan_dimensions
from embshard.planner.remap import REMAP_SUFFIX, load_remap
from embshard.planner.shard_plan import ShardPlan, plan_sharding
from embshard.planner.topology import TopologySpec
from embshard.planner.types import DimensionPlan

PLAN_FILE = "plan.json"


@dataclass
class PlanBundle:
    dimension_plan: DimensionPlan
    shard_plan: ShardPlan
    memory: MemoryReport
    directory: Path  # plan.json and the remap files live here
    _id_maps: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def save(self, name: str = PLAN_FILE) -> Path:
        """Writes the plan to `name` in its folder (whole: a temporary file renamed)."""
        return write_whole(self.directory / name, json.dumps(self.to_json(), indent=1) + "\n")

    def to_json(self) -> dict[str, Any]:
        return {
            "dimension_plan": self.dimension_plan.to_json(),
            "shard_plan": self.shard_plan.to_json(),
            "memory": self.memory.to_json(),
        }

    @staticmethod
    def from_json(raw: dict[str, Any], path: Path, optimizer: SparseOptimizer) -> "PlanBundle":
        """The plan read from the file `path` (any name: errors name it)."""
        where, directory = str(path), path.parent
        try:
            dim_plan = DimensionPlan.from_json(raw["dimension_plan"], where)
            shard = ShardPlan.from_json(raw["shard_plan"], where)
            shard.check_matches(dim_plan, shard.topology)  # its blocks, then its shards, before anything reads them
            shard.check_shards(dim_plan)
        except KeyError as e:
            raise PlanError(f"{where}: missing section {e}") from None
        except (PlanError, ConfigError) as e:
            # A hand-edited file's topology or shards were refused without a word of which file.
            if str(e).startswith(where):
                raise
            raise PlanError(f"{where}: {e}") from None
        for table in dim_plan.tables:
            if table.remap is not None and not (directory / table.remap).is_file():
                raise PlanError(f"{where}: its remap file {table.remap} is not beside it; copy the plan's "
                                "whole folder")
        return PlanBundle(dim_plan, shard, memory_report(dim_plan, shard, optimizer), directory)

    @staticmethod
    def load(path: str | Path, optimizer: SparseOptimizer) -> "PlanBundle":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found (write one with `embshard plan`)")
        return PlanBundle.from_json(_read_plan_file(path), path, optimizer)

    def copy_to(self, directory: Path, name: str = PLAN_FILE) -> "PlanBundle":
        """This plan (its file, as `name`, and its remap files) saved in `directory`, e.g. a run's
        plan folder. The remap files go first, each whole, and the plan file last: a plan file there
        before reads its own remaps until it is replaced. Those of them that no plan file of the
        folder reads afterwards are removed. A remap file that another plan file of the folder
        reads and that differs from this plan's (a name without a digest, from before remap names
        had one) is refused: that plan would read this one's rows, silently."""
        if directory.resolve() == self.directory.resolve():
            return self
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        readers = _remap_readers(directory, besides=target)
        copies = []
        for remap in sorted({t.remap for t in self.dimension_plan.tables if t.remap is not None}):
            source, there = self.directory / remap, directory / remap
            if there.is_file() and filecmp.cmp(source, there, shallow=False):
                continue  # this plan's rows already (a digest in the name, or an earlier copy)
            if there.is_file() and remap in readers:
                raise PlanError(f"{there}: {readers[remap]} reads this remap file too, and this plan's differs; "
                                f"write the plan into a folder of its own")
            copies.append((source, there))
        replaced = _remaps_read_by(target)
        for source, there in copies:
            with written_whole(there) as tmp:
                shutil.copyfile(source, tmp)
        copy = replace(self, directory=directory)
        copy.save(name)
        kept = {t.remap for t in self.dimension_plan.tables if t.remap is not None} | set(readers)
        for stale in sorted(replaced - kept):
            # Only a remap file of this folder, by the name a plan gives one: the names come from
            # the file replaced, and a hand-edited one's "/home/me/notes" or "../x" was deleted.
            if Path(stale).name == stale and stale.endswith(REMAP_SUFFIX):
                (directory / stale).unlink(missing_ok=True)
        return copy

    def id_maps(self) -> dict[str, np.ndarray]:
        """Read once: a run's train, valid and test readers share them (a copy each was 800 MB
        each for a table of 100M rows)."""
        if self._id_maps is None:
            self._id_maps = load_id_maps(self.dimension_plan, self.directory)
        return self._id_maps


def _remaps_read_by(plan_file: Path) -> set[str]:
    """The remap files a plan file, or a decisions file, reads: none for a file that is neither."""
    try:
        raw = json.loads(plan_file.read_text())
        tables = raw["dimension_plan"]["tables"] if "dimension_plan" in raw else list(raw["tables"].values())
        # As a path in the folder: a reader's "./t_C2.<digest>.remap.npy" did not keep that file.
        return {os.path.normpath(t["remap"]) for t in tables if isinstance(t.get("remap"), str) and t["remap"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _remap_readers(directory: Path, besides: Path) -> dict[str, str]:
    """remap file -> the name of a plan or decisions file in `directory`, other than `besides`,
    that reads it."""
    # Regular files only: a FIFO named *.json held the read open for good.
    # Any case of the suffix, as `plan --out` takes it: a plan named X.JSON lost its remap files
    # when another plan of the folder was replaced.
    return {remap: other.name for other in sorted(directory.iterdir()) if other.suffix.lower() == ".json"
            and other.is_file() and other.resolve() != besides.resolve() for remap in _remaps_read_by(other)}


def _read_plan_file(path: StoragePath) -> dict[str, Any]:
    raw = read_json(path, PlanError)
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: not a plan (a JSON {type(raw).__name__}, not an object)")
    return raw


def load_dimension_plan(path: StoragePath) -> DimensionPlan:
    """The DimensionPlan of the plan file `path`, local or in a bucket (a checkpoint's), without
    its shard plan, which a run on another topology replaces."""
    raw = _read_plan_file(path)
    if "dimension_plan" not in raw:
        raise PlanError(f"{path}: missing section 'dimension_plan'")
    return DimensionPlan.from_json(raw["dimension_plan"], str(path))


def load_id_maps(plan: DimensionPlan, directory: Path) -> dict[str, np.ndarray]:
    """feature -> id -> ranked-row permutation, for every table whose rows are reordered."""
    maps = {}
    for table in plan.tables:
        if table.remap is not None:
            remap = load_remap(directory / table.remap, table.num_embeddings)
            maps.update({f: remap for f in table.features})
    return maps


def check_plan_holds(plan: DimensionPlan, cardinalities: Mapping[str, int], where: str,
                     why: str = "the plan was made for other data") -> None:
    """PlanError unless every table has a row for each id its features take in the data
    (`cardinalities`, by dataset feature): a plan made for other data, resumed or given as a file,
    would have FBGEMM's bounds check read an id past a table's rows as row 0, silently. `where`
    names the plan and the data, `why` what went wrong. Every feature of the data must have a
    table: a plan without one trained without the feature, silently."""
    read = {t.data_feature(name) for t in plan.tables for name in t.features}
    unread = [f for f in cardinalities if f not in read]
    if unread:
        raise PlanError(f"{where}: the data's feature {unread[0]!r} has no table in the plan: {why}")
    for t in plan.tables:
        for name in t.features:
            f = t.data_feature(name)
            if f not in cardinalities:
                raise PlanError(f"{where}: table {t.name!r} reads feature {f!r}, which the data does not have")
            if cardinalities[f] > t.num_embeddings:
                raise PlanError(f"{where}: feature {f!r} takes {cardinalities[f]:,} ids, table {t.name!r} "
                                f"has {t.num_embeddings:,} rows: {why}")


# A method's planning step: dataset spec + id counts (+ the plan folder for remaps) -> DimensionPlan.
Decide = Callable[[DatasetSpec, Mapping[str, np.ndarray], Path], DimensionPlan]


def make_plan(embeddings: EmbeddingsConfig, dataset_dir: str | Path, topology: TopologySpec,
              out_dir: str | Path, **options: Any) -> PlanBundle:
    """The plan of an `embeddings:` policy (uniform, MDE, decisions; MLET on any of them);
    `options` as `plan_with`'s."""
    return plan_with(partial(plan_dimensions, embeddings), dataset_dir, topology, out_dir, **options)


def plan_with(
    decide: Decide,
    dataset_dir: str | Path,
    topology: TopologySpec,
    out_dir: str | Path,
    *,
    batch_size: int,
    optimizer: SparseOptimizer,
    sharding_types: list[str] | None = None,
) -> PlanBundle:
    """The whole pipeline for any method's planning step (`trainer/method.py`)."""
    out_dir = Path(out_dir)
    profile = load_profile(dataset_dir)
    return shard_dimension_plan(decided(decide, dataset_dir, out_dir, profile), profile, topology, out_dir,
                                batch_size=batch_size, optimizer=optimizer, sharding_types=sharding_types)


def decided(decide: Decide, dataset_dir: str | Path, out_dir: Path, profile: Profile | None = None) -> DimensionPlan:
    """The DimensionPlan a method's planning step makes from the dataset's spec and id counts (its
    remaps written into `out_dir`)."""
    spec = DatasetSpec.load(dataset_dir)
    profile = profile or load_profile(dataset_dir)
    return decide(spec, profile.lazy_counts({f: f for f in spec.sparse_names}), out_dir)


def shard_dimension_plan(
    dim_plan: DimensionPlan,
    profile: Profile,
    topology: TopologySpec,
    out_dir: Path,
    *,
    batch_size: int,
    optimizer: SparseOptimizer,
    sharding_types: list[str] | None = None,
) -> PlanBundle:
    """The shard half of planning: a decided DimensionPlan (its remaps in `out_dir`) placed on a
    topology. Also how a checkpoint's plan is re-sharded for another world size."""
    counts = profile.lazy_counts({f: t.data_feature(f) for t in dim_plan.tables for f in t.features})
    shard = plan_sharding(
        dim_plan,
        topology,
        batch_size=batch_size,
        optimizer=optimizer,
        pooling_factors=block_pooling_factors(dim_plan, profile, counts, load_id_maps(dim_plan, out_dir)),
        sharding_types=sharding_types,
    )
    return PlanBundle(dim_plan, shard, memory_report(dim_plan, shard, optimizer), out_dir)


def block_pooling_factors(
    plan: DimensionPlan,
    profile: Profile,
    counts: Mapping[str, np.ndarray],
    id_maps: dict[str, np.ndarray],
) -> dict[str, float]:
    """Measured ids per example for each block table: the feature's pooling factor times the
    share of its lookups that land in the block (TorchRec's planner sizes comms and compute by it).
    A table of one block takes them all: its counts are not read (a 1e8-row table's are 800 MB)."""
    factors: dict[str, float] = {}
    for table in plan.tables:
        for feature in table.features:
            pf = profile.pooling_factor(table.data_feature(feature))
            if len(table.blocks) == 1:
                name = table.block_name(0)
                factors[name] = factors.get(name, 0.0) + pf
                continue
            c = counts[feature]
            ranked = np.empty_like(c)
            ranked[id_maps[feature] if feature in id_maps else np.arange(len(c))] = c
            total = max(int(c.sum()), 1)
            for i, b in enumerate(table.blocks):
                share = float(ranked[b.start : b.end].sum()) / total
                name = table.block_name(i)
                factors[name] = factors.get(name, 0.0) + pf * share
    return factors


