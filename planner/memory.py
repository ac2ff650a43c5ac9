"""Memory per rank and per table, from the shard plan itself: what each rank will hold.

Training bytes are the block weights at their training width (MLET's k), the sparse optimizer's
state, what a method holds beside the shards (a lottery retrain's mask) and the projections every
rank replicates; serving bytes are the collapsed blocks at their
serving width plus the projections the plan has (to the base dim, or with `uniform_width` off only
within a table, to its widest block). Figures are exact counts of fp32 elements in the
planned shards, so a test can compare them with what `DistributedModelParallel` really allocates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from embshard.errors import PlanError
from embshard.planner.optimizers import BYTES_PER_ELEMENT, SparseOptimizer, optimizer_state_elements
from embshard.planner.shard_plan import ShardPlan
from embshard.planner.types import DimensionPlan
from embshard.units import human_bytes


@dataclass(frozen=True)
class ShardMemory:
    table: str  # block table name
    rank: int
    rows: int
    cols: int  # training width of this shard
    weight_bytes: int
    optimizer_bytes: int
    serve_bytes: int
    sharding_type: str
    side_bytes: int = 0  # what the method holds beside the shard (`Block.side_bytes_per_entry`)

    @property
    def train_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes + self.side_bytes


@dataclass
class MemoryReport:
    shards: list[ShardMemory]
    projection_bytes: int  # dense, replicated on every rank (training)
    serve_projection_bytes: int
    world_size: int
    capacity_bytes: int
    optimizer: str
    # The model's layers outside its tables (MLPs, an FM's linear terms) on every rank: weights,
    # gradients and the dense optimizer's state; and the projections' gradients and state (their
    # weights are in `projection_bytes`). Not the planner's to know: the driver counts them for
    # the model it trains (`trainer.build.dense_layer_bytes`); None: not counted.
    dense_bytes: int | None = None
    per_rank: dict[int, dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        totals: dict[int, dict[str, int]] = {
            r: {"train_bytes": self.projection_bytes, "serve_bytes": self.serve_projection_bytes}
            for r in range(self.world_size)
        }
        for s in self.shards:
            totals[s.rank]["train_bytes"] += s.train_bytes
            totals[s.rank]["serve_bytes"] += s.serve_bytes
        self.per_rank = totals

    def table_bytes(self, rank: int) -> dict[str, tuple[int, int]]:
        """block table -> (training bytes, serving bytes) held on `rank`."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s in self.shards:
            if s.rank == rank:
                out[s.table][0] += s.train_bytes
                out[s.table][1] += s.serve_bytes
        return {k: (v[0], v[1]) for k, v in out.items()}

    def check_fits(self) -> None:
        worst = max(self.per_rank, key=lambda r: self.per_rank[r]["train_bytes"])
        dense = self.dense_bytes or 0
        need = self.per_rank[worst]["train_bytes"] + dense
        if need > self.capacity_bytes:
            held = [(t, b[0]) for t, b in self.table_bytes(worst).items()]
            held += [("the dense layers", dense)] if dense else []
            # Largest first (the dense layers among them), human_bytes, not fixed GiB: a shortfall
            # of a few MiB must not print as "0.00 GiB".
            largest = [f"{what} ({human_bytes(n)})" for what, n in sorted(held, key=lambda h: -h[1])[:3]]
            raise PlanError(
                f"rank {worst} needs {human_bytes(need)} for training but has "
                f"{human_bytes(self.capacity_bytes)} (short by {human_bytes(need - self.capacity_bytes)}); "
                f"largest there: {', '.join(largest)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "capacity_bytes": self.capacity_bytes,
            "projection_bytes": self.projection_bytes,
            "serve_projection_bytes": self.serve_projection_bytes,
            "dense_bytes": self.dense_bytes,
            "per_rank": {str(r): v for r, v in self.per_rank.items()},
            "shards": [s.__dict__ for s in self.shards],
        }

    def format(self, max_tables: int = 12, max_ranks: int = 16) -> str:
        lines = [
            f"{'rank':>4}  {'train':>10}  {'serve':>10}  {'capacity':>10}  {'used':>6}  tables",
        ]
        # The fullest ranks: on 2,048 ranks every one was a line.
        ranks = sorted(self.per_rank.items(), key=lambda kv: -kv[1]["train_bytes"])
        for r, tot in sorted(ranks[:max_ranks]):
            tables = self.table_bytes(r)
            lines.append(
                f"{r:>4}  {human_bytes(tot['train_bytes']):>10}  {human_bytes(tot['serve_bytes']):>10}  "
                f"{human_bytes(self.capacity_bytes):>10}  "
                f"{100 * (tot['train_bytes'] + (self.dense_bytes or 0)) / self.capacity_bytes:5.1f}%  "
                f"{len(tables)}"
            )
        if len(ranks) > max_ranks:
            lines.append(f"... and {len(ranks) - max_ranks} less full ranks (see the JSON report)")
        if self.dense_bytes:
            lines.append(f"dense layers on every rank, besides train: {human_bytes(self.dense_bytes)} "
                         "(weights, gradients, optimizer state; the projections' gradients and state)")
        by_table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        placement: dict[str, set[str]] = defaultdict(set)
        for s in self.shards:
            by_table[s.table][0] += s.train_bytes
            by_table[s.table][1] += s.serve_bytes
            placement[s.table].add(f"{s.sharding_type}@{s.rank}")
        lines.append("")
        lines.append(f"{'table':<24}  {'train':>10}  {'serve':>10}  placement")
        ranked = sorted(by_table.items(), key=lambda kv: -kv[1][0])
        for name, (train, serve, _) in ranked[:max_tables]:
            where = ", ".join(sorted(placement[name]))
            lines.append(f"{name:<24}  {human_bytes(train):>10}  {human_bytes(serve):>10}  {where[:60]}")
        if len(ranked) > max_tables:
            lines.append(f"... and {len(ranked) - max_tables} more tables (see the JSON report)")
        return "\n".join(lines)


def projection_elements(plan: DimensionPlan) -> tuple[int, int]:
    """(training, serving) elements of the plan's dense parts that every rank holds: MLET's W2 and
    the projections to the base dim (training), and those projections alone (serving)."""
    projection = serve_projection = 0
    for table in plan.tables:
        for b in table.blocks:
            if b.mlet_width is not None:
                projection += b.mlet_width * b.dim
            shape = plan.projection_shape(table, b)
            if shape is not None:
                projection += shape[0] * shape[1]
                serve_projection += shape[0] * shape[1]
    return projection, serve_projection


def memory_report(
    plan: DimensionPlan, shard_plan: ShardPlan, optimizer: SparseOptimizer
) -> MemoryReport:
    blocks = {table.block_name(i): b for table in plan.tables for i, b in enumerate(table.blocks)}
    projection, serve_projection = projection_elements(plan)
    world = shard_plan.topology.world_size
    shards = []
    for name, ps in shard_plan.sharding.items():
        block = blocks[name]
        dim, train_dim = block.dim, block.train_dim
        if ps.sharding_spec is None:  # data-parallel: every rank holds the whole table
            pieces = [(r, block.num_rows, train_dim) for r in range(world)]
        else:
            pieces = [
                (_rank_of(str(s.placement)), s.shard_sizes[0], s.shard_sizes[1])
                for s in ps.sharding_spec.shards
            ]
        for rank, rows_, cols in pieces:
            shards.append(
                ShardMemory(
                    table=name,
                    rank=rank,
                    rows=rows_,
                    cols=cols,
                    weight_bytes=rows_ * cols * BYTES_PER_ELEMENT,
                    optimizer_bytes=optimizer_state_elements(optimizer, rows_, cols) * BYTES_PER_ELEMENT,
                    # Collapse keeps each shard's rows and scales its width from k to d.
                    serve_bytes=rows_ * cols * dim // train_dim * BYTES_PER_ELEMENT,
                    sharding_type=ps.sharding_type,
                    side_bytes=rows_ * cols * block.side_bytes_per_entry,
                )
            )
    return MemoryReport(
        shards=shards,
        projection_bytes=projection * BYTES_PER_ELEMENT,
        serve_projection_bytes=serve_projection * BYTES_PER_ELEMENT,
        world_size=world,
        capacity_bytes=shard_plan.topology.capacity_bytes,
        optimizer=optimizer,
    )


def _rank_of(placement: str) -> int:
    # ShardMetadata placements print as "rank:3/cuda:3"
    return int(placement.split("/")[0].split(":")[1])
