"""Cheaper parts for TorchRec's planner, each following TorchRec's own interface.

`BucketIndexedEnumerator`: TorchRec's EmbeddingEnumerator, except that it finds a table's
virtual-table bucket count by name in a dict instead of scanning every table's config for each
table (quadratic: at 10,000 tables that scan alone took longer than the rest of planning), and
that it lists a table's sharding types and kernels in the sharder's order: TorchRec's filters
intersect sets, so their order (and, through ties in the proposers' stable sorts, the plan) changed
with Python's string hashing from one run to the next.

`FirstPlacedProposer`: a proposer that stops at the first proposal TorchRec's partitioner
places. At cluster scale (thousands of tables on hundreds of ranks) every proposal is a full partition
of all tables, and GreedyProposer's later proposals each move one table to its next option: with
10,000 tables they barely change the plan's rating, yet each costs as much as the first. This
proposer walks GreedyProposer's own sequence (every table at its best-rated option first; after
a proposal that cannot be placed, the table using the most memory moves to its next option) and
ends it as soon as one proposal is placed.
"""

from __future__ import annotations

from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.proposers import GreedyProposer
from torchrec.distributed.planner.types import Enumerator, Proposer, ShardingOption, Topology


class FirstPlacedProposer(Proposer):
    def __init__(self) -> None:
        self._greedy = GreedyProposer()
        self._placed = False

    def load(self, search_space: list[ShardingOption], enumerator: Enumerator | None = None) -> None:
        self._greedy.load(search_space, enumerator)
        self._placed = False

    def propose(self) -> list[ShardingOption] | None:
        return None if self._placed else self._greedy.propose()

    def feedback(
        self,
        partitionable: bool,
        plan: list[ShardingOption] | None = None,
        perf_rating: float | None = None,
        storage_constraint: Topology | None = None,
    ) -> None:
        if partitionable:
            self._placed = True
            return
        self._greedy.feedback(partitionable, plan, perf_rating, storage_constraint)


class BucketIndexedEnumerator(EmbeddingEnumerator):
    _buckets: dict[str, int | None] | None = None
    _buckets_of: nn.Module | None = None

    def _get_num_buckets(self, parameter: str, module: nn.Module) -> int | None:
        if not isinstance(module, EmbeddingBagCollection):
            return super()._get_num_buckets(parameter, module)
        if self._buckets is None or self._buckets_of is not module:
            # Same answer as TorchRec's scan: the bucket count of a virtual table, else None.
            self._buckets = {
                c.name: c.total_num_buckets if c.use_virtual_table else None
                for c in module.embedding_bag_configs()
            }
            self._buckets_of = module
        return self._buckets.get(parameter)

    def _filter_sharding_types(self, name: str, allowed_sharding_types: list[str], sharder_key: str = "") -> list[str]:
        kept = set(super()._filter_sharding_types(name, allowed_sharding_types, sharder_key))
        return [t for t in allowed_sharding_types if t in kept]

    def _filter_compute_kernels(self, name: str, allowed_compute_kernels: list[str], sharding_type: str) -> list[str]:
        kept = set(super()._filter_compute_kernels(name, allowed_compute_kernels, sharding_type))
        return [k for k in allowed_compute_kernels if k in kept]
