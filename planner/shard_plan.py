"""DimensionPlan + topology -> TorchRec ShardingPlan, through TorchRec's own planner.

Each block of the DimensionPlan becomes one TorchRec `EmbeddingBagConfig` (at its training width),
so TorchRec's `EmbeddingShardingPlanner` shards blocks like any table. The resulting plan is
serialised shard by shard to JSON, and training rebuilds the exact `ParameterSharding`s from that
JSON: a plan made on a laptop is the layout the cluster trains with.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torch.overrides import TorchFunctionMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, PoolingType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    Topology,
)
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)

from embshard.errors import PlanError
from embshard.planner.capacity import (
    RESERVED_FRACTION,
    Demand,
    check_can_fit,
    shortfall_error,
    usable_bytes,
)
from embshard.planner.optimizers import SparseOptimizer, torch_optimizer_class
from embshard.planner.search import SearchPolicy
from embshard.planner.topology import TopologySpec
from embshard.planner.torchrec_parts import BucketIndexedEnumerator
from embshard.planner.types import DimensionPlan, TablePlan
from embshard.units import human_bytes

# FBGEMM's fused table-batched kernels need widths divisible by 4; narrower or odd widths are
# placed data-parallel with the dense kernel, where any width works.
FUSED_WIDTH_MULTIPLE = 4

# TorchRec logs every plan at INFO/WARNING through its own loggers; embshard prints its own report.
logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)


def block_feature_name(feature: str, block: int, num_blocks: int) -> str:
    return feature if num_blocks == 1 else f"{feature}__b{block}"


def block_table_configs(plan: DimensionPlan) -> list[EmbeddingBagConfig]:
    """One TorchRec table per block of the pooled tables, at the block's training width."""
    return _block_configs(plan, pooled=True)


def unpooled_table_configs(plan: DimensionPlan) -> list[EmbeddingConfig]:
    """The same for tables looked up unpooled (`TablePlan.pooled` false): EmbeddingCollection's."""
    return _block_configs(plan, pooled=False)


def _block_configs(plan: DimensionPlan, pooled: bool) -> list:
    configs: list = []
    for table in plan.tables:
        if table.pooled != pooled:
            continue
        n = len(table.blocks)
        # TorchRec draws a table from U(-sqrt(1/rows), sqrt(1/rows)). Each block starts as its rows
        # would in the whole table: by its own row count, a popular block of 40 rows would start
        # ten times wider than the same rows of a 4,000-row table.
        bound = math.sqrt(1 / table.num_embeddings)
        for i, block in enumerate(table.blocks):
            common = {
                "name": table.block_name(i),
                "embedding_dim": block.train_dim,
                "num_embeddings": block.num_rows,
                "feature_names": [block_feature_name(f, i, n) for f in table.features],
                "weight_init_min": -bound,
                "weight_init_max": bound,
            }
            configs.append(
                EmbeddingBagConfig(**common, pooling=PoolingType.SUM) if pooled else EmbeddingConfig(**common)
            )
    return configs


@dataclass
class ShardPlan:
    """A TorchRec sharding plan for the block tables, plus what the planner decided and why."""

    sharding: dict[str, ParameterSharding]  # block table name -> its sharding
    topology: TopologySpec
    notes: list[str] = field(default_factory=list)

    def to_torchrec(self, module_path: str) -> ShardingPlan:
        return ShardingPlan(plan={module_path: self.module_plan(self.sharding)})

    def module_plan(self, tables: Iterable[str]) -> EmbeddingModuleShardingPlan:
        """The shardings of `tables`: one collection's entry of a TorchRec ShardingPlan."""
        return EmbeddingModuleShardingPlan({name: self.sharding[name] for name in tables})

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": {
                "world_size": self.topology.world_size,
                "device": self.topology.device,
                "device_memory_gb": self.topology.device_memory_gb,
                "local_world_size": self.topology.local_world_size,
            },
            "tables": {name: _sharding_to_json(ps) for name, ps in self.sharding.items()},
            "notes": list(self.notes),
        }

    @staticmethod
    def from_json(raw: Mapping[str, Any], where: str = "shard plan") -> "ShardPlan":
        try:
            topology = TopologySpec(**raw["topology"])
            sharding = {n: _sharding_from_json(ps, topology, f"{where}: {n}") for n, ps in raw["tables"].items()}
            return ShardPlan(sharding=sharding, topology=topology, notes=list(raw.get("notes", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{where}: malformed shard plan ({e})") from None

    def check_matches(self, plan: DimensionPlan, topology: TopologySpec) -> None:
        """A shard plan trains only the dimension plan, world size and device it was made for."""
        expected = {t.block_name(i) for t in plan.tables for i in range(len(t.blocks))}
        if set(self.sharding) != expected:
            missing = sorted(expected - set(self.sharding))[:3]
            extra = sorted(set(self.sharding) - expected)[:3]
            raise PlanError(
                f"shard plan does not match the dimension plan (missing {missing}, extra {extra}); "
                f"re-run `embshard plan`"
            )
        if self.topology.world_size != topology.world_size:
            raise PlanError(
                f"shard plan was made for {self.topology.world_size} ranks, training has {topology.world_size}; "
                f"re-run `embshard plan --world-size {topology.world_size}` or change the worker count"
            )
        if self.topology.device != topology.device:
            # Its shards would be placed on a device this run does not train on.
            raise PlanError(
                f"shard plan was made for {self.topology.device} ranks, training runs on {topology.device}; "
                f"re-run `embshard plan --device {topology.device}` or change sharding.device"
            )
        if self.topology.capacity_bytes > topology.capacity_bytes:
            # Its memory check would pass against memory this run's ranks do not have.
            raise PlanError(
                f"shard plan was made for {human_bytes(self.topology.capacity_bytes)} per rank, this run's ranks "
                f"have {human_bytes(topology.capacity_bytes)}; re-run `embshard plan` or set sharding.device_memory_gb"
            )

    def check_shards(self, plan: DimensionPlan) -> None:
        """Each table's sharding as planning would have made it on this plan's own topology: a
        type and kernel the device trains that table with (`block_sharding`), shards inside their
        table and covering it. Read once, where a plan file is loaded."""
        blocks = {t.block_name(i): (t, b) for t in plan.tables for i, b in enumerate(t.blocks)}
        for name, ps in self.sharding.items():
            table, block = blocks[name]
            rows, dim = block.num_rows, block.train_dim
            types, kernels, _ = block_sharding(name, table, dim, self.topology, self.topology.sharding_types)
            if ps.sharding_type not in types or (kernels is not None and ps.compute_kernel not in kernels):
                # Data-parallel on CPU trains nothing, and says so only in a torch warning.
                raise PlanError(f"shard plan: {name}: sharding type {ps.sharding_type!r} is not one "
                                f"{self.topology.device} ranks train {'pooled' if table.pooled else 'unpooled'} "
                                f"tables with ({', '.join(types)}); re-run `embshard plan`")
            if ps.sharding_spec is None:
                continue
            area = 0
            for shard in ps.sharding_spec.shards:
                (r0, c0), (nr, nc) = shard.shard_offsets, shard.shard_sizes
                if not (0 <= r0 and 0 <= c0 and r0 + nr <= rows and c0 + nc <= dim):
                    raise PlanError(f"shard plan: {name}: a shard at {[r0, c0]} of {[nr, nc]} lies outside its "
                                    f"{rows} x {dim} table; re-run `embshard plan`")
                area += nr * nc
            if area != rows * dim:
                raise PlanError(f"shard plan: {name}: its shards cover {area:,} of its {rows * dim:,} entries "
                                f"({rows} x {dim}); re-run `embshard plan`")


def block_sharding(name: str, table: TablePlan, width: int, topology: TopologySpec,
                   allowed: list[str]) -> tuple[list[str], list[str] | None, str | None]:
    """The sharding types (and kernels, None: any) a block of `table` at training `width` may take:
    the method's own choice (`TablePlan.sharding_types`) or `allowed`; a width FBGEMM's fused
    kernels cannot take goes data-parallel on the dense kernel, on CUDA only (with the note that
    says so). Planning and the check of a loaded plan read it alike."""
    if width % FUSED_WIDTH_MULTIPLE == 0:
        return table.sharding_types or allowed, None, None
    if topology.device == "cpu":
        raise PlanError(
            f"{name}: width {width} cannot train on CPU: FBGEMM's fused CPU kernels need widths divisible "
            f"by {FUSED_WIDTH_MULTIPLE}, and its dense (data-parallel) kernel has no CPU autograd; use "
            f"embeddings.rounding: multiple4 (a method of your own: give widths divisible by {FUSED_WIDTH_MULTIPLE})"
        )
    return ["data_parallel"], ["dense"], (f"{name}: width {width} is not a multiple of {FUSED_WIDTH_MULTIPLE} "
                                          "(FBGEMM fused kernels) -> data_parallel, dense kernel")


def make_constraints(
    plan: DimensionPlan,
    topology: TopologySpec,
    pooling_factors: Mapping[str, float] | None = None,
    sharding_types: list[str] | None = None,
) -> tuple[dict[str, ParameterConstraints], list[str]]:
    """Per block table: the sharding types this device supports and the measured pooling factor."""
    allowed = list(sharding_types or topology.sharding_types)
    unsupported = sorted(set(allowed) - set(topology.sharding_types))
    # Tables whose method chose their sharding types (TablePlan.sharding_types) are not held to
    # the pooled collection's list.
    if unsupported and any(t.sharding_types is None for t in plan.tables):
        raise PlanError(
            f"sharding.sharding_types: {unsupported} not supported for EmbeddingBagCollection on "
            f"{topology.device} (supported: {', '.join(topology.sharding_types)})"
        )
    owner = {t.block_name(i): t for t in plan.tables for i in range(len(t.blocks))}
    constraints, notes = {}, []
    for config in [*block_table_configs(plan), *unpooled_table_configs(plan)]:
        types, kernels, note = block_sharding(config.name, owner[config.name], config.embedding_dim, topology, allowed)
        notes.extend([note] if note else [])
        pf = (pooling_factors or {}).get(config.name)
        constraints[config.name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=kernels,
            pooling_factors=[pf] if pf else [1.0],
        )
    return constraints, notes


def plan_sharding(
    plan: DimensionPlan,
    topology: TopologySpec,
    *,
    batch_size: int,
    optimizer: SparseOptimizer = "rowwise_adagrad",
    pooling_factors: Mapping[str, float] | None = None,
    sharding_types: list[str] | None = None,
    search: SearchPolicy | None = None,
) -> ShardPlan:
    """Run TorchRec's EmbeddingShardingPlanner over the block tables of `plan` for `topology`.

    Needs no devices and no process group: the tables are built on the meta device. `search`
    decides how much of TorchRec's search space the plan gets (all of it for small plans).
    """
    pooled, unpooled = block_table_configs(plan), unpooled_table_configs(plan)
    configs = [*pooled, *unpooled]
    constraints, notes = make_constraints(plan, topology, pooling_factors, sharding_types)
    torchrec_topology = topology.to_torchrec()
    demand = Demand.of(configs, optimizer)
    check_can_fit(demand, topology, torchrec_topology)
    chosen = (search or SearchPolicy()).search(configs, constraints, topology, demand)

    with _MetaInitSkipped():
        module, sharders = _collections(pooled, unpooled)
    _tag_optimizer(module, optimizer)
    planner = EmbeddingShardingPlanner(
        topology=torchrec_topology,
        batch_size=batch_size,
        enumerator=BucketIndexedEnumerator(
            topology=torchrec_topology, batch_size=batch_size, constraints=chosen.constraints
        ),
        storage_reservation=FixedPercentageStorageReservation(RESERVED_FRACTION),
        proposer=chosen.proposers,
        constraints=chosen.constraints,
        # embshard prints its own per-rank report; TorchRec's stats table is only logged.
        stats=[],
        debug=False,
        timeout_seconds=chosen.timeout_seconds,
    )
    try:
        with _no_data_parallel_spec_warning(), _timed(
                f"placing {len(configs):,} tables on {topology.world_size} {topology.device} ranks with "
                f"TorchRec's planner (it stops proposing after {chosen.timeout_seconds} s)",
                shown=chosen.timeout_seconds is not None):
            torchrec_plan = planner.plan(module, sharders)
    except PlannerError as e:
        raise _explain_planner_error(e, demand, topology, torchrec_topology) from None
    sharding = {name: ps for module_plan in torchrec_plan.plan.values() for name, ps in module_plan.items()}
    return ShardPlan(sharding=sharding, topology=topology, notes=notes + chosen.notes)


@contextmanager
def _timed(doing: str, shown: bool) -> Iterator[None]:
    """`doing` on stderr, then the seconds it took, when `shown`: a large plan spends tens of
    seconds inside TorchRec's planner, which says nothing meanwhile."""
    if not shown:
        yield
        return
    print(f"{doing} ...", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        print(f" {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def _collections(pooled: list[EmbeddingBagConfig], unpooled: list[EmbeddingConfig]) -> tuple[nn.Module, list]:
    """The collections the tables train in, on meta, and their sharders: the pooled collection
    alone (TorchRec's plain case), or both side by side."""
    meta = torch.device("meta")
    if not unpooled:
        return EmbeddingBagCollection(tables=pooled, device=meta), [EmbeddingBagCollectionSharder()]
    module = nn.Module()
    if pooled:  # TorchRec cannot shard an empty collection
        module.ebc = EmbeddingBagCollection(tables=pooled, device=meta)
    module.ec = EmbeddingCollection(tables=unpooled, device=meta)
    return module, [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


class _MetaInitSkipped(TorchFunctionMode):
    """Skip the random initialisation of meta tables while the planner's module is built.

    A meta tensor holds no values, yet `nn.EmbeddingBag` still runs `normal_` on it, through
    torch's Python reference kernels: seconds of planning time at 10,000 tables.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "normal_":  # nn.init.normal_ and Tensor.normal_
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _tag_optimizer(module: nn.Module, optimizer: SparseOptimizer) -> None:
    """Tell TorchRec's planner which optimizer the tables train with.

    Its storage estimator sizes optimizer state from `param._optimizer_classes`, the attribute
    `_apply_optimizer_in_backward` sets. That function also builds one optimizer (with its state)
    per table, which nothing here uses: at 10,000 meta tables it cost seconds, so only the
    attribute the planner reads is set.
    """
    cls = torch_optimizer_class(optimizer)
    for param in module.parameters():
        param._optimizer_classes = [cls]  # type: ignore[attr-defined]


_NO_ROOM = (
    PlannerErrorType.INSUFFICIENT_STORAGE,
    PlannerErrorType.STRICT_CONSTRAINTS,
    PlannerErrorType.PARTITION,
)


class _DropMissingSpecWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found for")


@contextmanager
def _no_data_parallel_spec_warning() -> Iterator[None]:
    """TorchRec warns on the root logger for every data-parallel table, which has no sharding spec
    by design: one line per table of noise for a plan that is as intended."""
    root = logging.getLogger()
    quiet = _DropMissingSpecWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _explain_planner_error(
    e: PlannerError, demand: Demand, topology: TopologySpec, torchrec_topology: Topology
) -> PlanError:
    # TorchRec reports a plan that fits in total but finds no placement as STRICT_CONSTRAINTS.
    if e.error_type in _NO_ROOM:
        return shortfall_error(demand, topology, usable_bytes(torchrec_topology))
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.error_type.value
    return PlanError(f"TorchRec's planner failed for {topology.world_size} x {topology.device}: {first_line}")


def _sharding_to_json(ps: ParameterSharding) -> dict[str, Any]:
    shards = None
    if ps.sharding_spec is not None:
        shards = [
            {
                "offsets": list(s.shard_offsets),
                "sizes": list(s.shard_sizes),
                "placement": str(s.placement),
            }
            for s in ps.sharding_spec.shards
        ]
    return {
        "sharding_type": ps.sharding_type,
        "compute_kernel": ps.compute_kernel,
        "ranks": list(ps.ranks) if ps.ranks is not None else None,
        "shards": shards,
    }


# Kernels by name, as a plan file spells them.
COMPUTE_KERNELS = frozenset(k.value for k in EmbeddingComputeKernel)


def _sharding_from_json(raw: Mapping[str, Any], topology: TopologySpec, where: str) -> ParameterSharding:
    """One table's sharding as a plan file has it, checked against the plan's own topology: an
    unknown kernel, a rank or a placement outside the world (its type: `check_matches`)."""
    if raw["compute_kernel"] not in COMPUTE_KERNELS:
        raise PlanError(f"{where}: unknown compute kernel {raw['compute_kernel']!r}")
    ranks = list(raw["ranks"] or [])
    spec = None
    if raw["shards"] is not None:
        shards = []
        for s in raw["shards"]:
            numbers = [*s["offsets"], *s["sizes"]]
            if len(s["offsets"]) != 2 or len(s["sizes"]) != 2 or not all(type(v) is int and v >= 0 for v in numbers):
                raise PlanError(f"{where}: shard offsets and sizes must be two whole numbers each, got "
                                f"{s['offsets']} and {s['sizes']}")
            shard = ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
            if shard.placement is None or shard.placement.rank() is None:
                raise PlanError(f"{where}: placement {s['placement']!r} names no rank (rank:N/device)")
            ranks.append(shard.placement.rank())
            shards.append(shard)
        spec = EnumerableShardingSpec(shards)
    outside = [r for r in ranks if not (type(r) is int and 0 <= r < topology.world_size)]
    if outside:
        raise PlanError(f"{where}: placed on rank {outside[0]!r}, outside the plan's {topology.world_size} ranks")
    return ParameterSharding(
        sharding_type=raw["sharding_type"],
        compute_kernel=raw["compute_kernel"],
        ranks=raw["ranks"],
        sharding_spec=spec,
    )
