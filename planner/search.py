"""How much of TorchRec's search a plan gets, by its size.

TorchRec's default search scores every sharding type and kernel of every table, shard by shard
(a row-wise or data-parallel option has one shard per rank), then runs four proposers, each
proposal a full partition of all tables. The cost grows with tables x options x ranks and again
with tables per proposal: 50 tables on 64 ranks took about 25 s here, 1,000 tables over 10 minutes.

Small plans keep the full search. Large ones (more tables x ranks than a full search can afford)
get a narrower search that is still TorchRec's enumerator, estimators, partitioner and
proposers:
- TorchRec's GreedyProposer with early stopping, then its UniformProposer, under a time limit;
- the fused kernel only on CUDA: tables are planned into HBM (the topology offers TorchRec no
  host memory, `TopologySpec.to_torchrec`), so UVM options would only be estimated to be refused;
- with at least as many tables as ranks, only sharding types whose shards stay inside one host:
  placing whole tables already balances the ranks then, and an option spread over every rank
  costs `world_size` shard estimates. A table larger than a whole host keeps every type.

Cluster-scale plans (past `cluster_table_ranks`, e.g. 10,000 tables on 1,024 ranks) narrow further,
because there each proposal's partition and each option's estimate cost seconds in all:
- one proposal placed, not a search over many (`FirstPlacedProposer`: GreedyProposer's
  sequence, stopped at the first proposal TorchRec's partitioner places);
- row splitting (`table_row_wise`) only for tables that do not fit on one rank: with at least as
  many tables as ranks, whole tables and column shards already balance the ranks, and every
  row-split option is partitioned host by host;
- with at least `whole_tables_per_rank` tables per rank, a table no larger than one rank's fair
  share (all tables' bytes / ranks) is placed whole (`table_wise` only): packing such tables
  balances the ranks without splitting them, and each further option is one more estimate per
  table. Larger tables keep their column and row splits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.types import ParameterConstraints, Proposer

from embshard.planner.capacity import Demand, usable_bytes_per_rank
from embshard.planner.topology import TopologySpec
from embshard.planner.torchrec_parts import FirstPlacedProposer

# Tables x ranks up to which TorchRec searches everything: tens of tables on up to 8 ranks.
# Measured here with its defaults: 26 tables x 8 ranks in 2 s, 64 x 8 in 12 s, 50 x 64 in 25 s.
FULL_SEARCH_TABLE_RANKS = 512

# Tables x ranks past which a plan is planned as at cluster scale (1,000 tables on 64 ranks is
# past it): there every further proposal re-partitions thousands of tables and every further
# option per table is thousands of estimates, seconds each in all.
CLUSTER_TABLE_RANKS = 50_000

# Sharding types whose shards all live on one host (at most local_world_size of them).
HOST_LOCAL_TYPES = ("table_wise", "column_wise", "table_column_wise", "table_row_wise")


@dataclass(frozen=True)
class Search:
    """What one planning run hands TorchRec's EmbeddingShardingPlanner."""

    constraints: dict[str, ParameterConstraints]
    proposers: list[Proposer] | None  # None: TorchRec's default four
    timeout_seconds: int | None
    notes: list[str]


@dataclass(frozen=True)
class SearchPolicy:
    full_search_table_ranks: int = FULL_SEARCH_TABLE_RANKS
    # GreedyProposer stops after this many placeable proposals in a row that rate worse than
    # its best; each of its steps re-partitions every table.
    greedy_patience: int = 3
    # Large plans only: TorchRec stops proposing after this long and keeps its best plan.
    timeout_seconds: int = 120
    cluster_table_ranks: int = CLUSTER_TABLE_RANKS
    # Tables per rank from which fair-share tables are placed whole: with a handful per rank,
    # packing whole tables can already even out the ranks' memory.
    whole_tables_per_rank: int = 4

    def is_large(self, num_tables: int, world_size: int) -> bool:
        return num_tables * world_size > self.full_search_table_ranks

    def is_cluster_scale(self, num_tables: int, world_size: int) -> bool:
        return num_tables * world_size > self.cluster_table_ranks

    def search(
        self,
        configs: list[EmbeddingBagConfig],
        constraints: dict[str, ParameterConstraints],
        topology: TopologySpec,
        demand: Demand,
    ) -> Search:
        if not self.is_large(len(configs), topology.world_size):
            return Search(constraints, proposers=None, timeout_seconds=None, notes=[])
        per_rank = usable_bytes_per_rank(topology)
        host_bytes = per_rank * (topology.local_world_size or topology.world_size)
        kernels = ["fused"] if topology.device == "cuda" else None
        host_local = len(configs) >= topology.world_size
        cluster = self.is_cluster_scale(len(configs), topology.world_size)
        packed = cluster and len(configs) >= self.whole_tables_per_rank * topology.world_size
        fair_share = demand.total / topology.world_size
        sizes = dict(demand.sizes)
        narrowed = {
            name: _narrow(
                c,
                host_local and sizes[name] <= host_bytes,
                kernels,
                split_rows=not (cluster and host_local and sizes[name] <= per_rank),
                whole=packed and sizes[name] <= fair_share,
            )
            for name, c in constraints.items()
        }
        proposing = (
            "FirstPlacedProposer (GreedyProposer's sequence up to the first placed proposal)"
            if cluster
            else f"GreedyProposer (patience {self.greedy_patience}) and UniformProposer"
        )
        narrowing = [
            proposing,
            *(["fused kernel only"] if kernels else []),
            *(
                [f"host-local sharding types ({', '.join(HOST_LOCAL_TYPES)}) except for tables larger than a host"]
                if host_local
                else []
            ),
            *(["table_row_wise only for tables larger than a rank"] if cluster and host_local else []),
            *(["table_wise only for tables within a rank's fair share"] if packed else []),
        ]
        note = (
            f"{len(configs)} tables x {topology.world_size} ranks is past the full-search limit of "
            f"{self.full_search_table_ranks}: TorchRec searched with {'; '.join(narrowing)}"
        )
        proposers: list[Proposer] = (
            [FirstPlacedProposer()]
            if cluster
            else [GreedyProposer(threshold=self.greedy_patience), UniformProposer()]
        )
        return Search(
            narrowed, proposers=proposers, timeout_seconds=self.timeout_seconds, notes=[note]
        )


def _narrow(
    c: ParameterConstraints,
    host_local: bool,
    kernels: list[str] | None,
    split_rows: bool = True,
    whole: bool = False,
) -> ParameterConstraints:
    allowed = c.sharding_types or []
    if allowed == ["data_parallel"]:  # a width the fused kernels cannot take: placement is fixed
        return c
    types = [t for t in allowed if t in HOST_LOCAL_TYPES] if host_local else []
    if not split_rows:
        types = [t for t in types if t != "table_row_wise"]
    if whole and "table_wise" in (types or allowed):
        types = ["table_wise"]
    return dataclasses.replace(
        c, sharding_types=types or allowed, compute_kernels=c.compute_kernels or kernels
    )
