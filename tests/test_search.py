"""How much of TorchRec's search a plan gets: everything when small, a narrowed search when large."""

from __future__ import annotations

import re

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer

from embshard.planner.capacity import Demand
from embshard.planner.search import HOST_LOCAL_TYPES, Search, SearchPolicy
from embshard.planner.shard_plan import block_table_configs, make_constraints, plan_sharding
from embshard.planner.topology import TopologySpec
from embshard.planner.torchrec_parts import BucketIndexedEnumerator, FirstPlacedProposer
from embshard.planner.types import Block, DimensionPlan, TablePlan

CLUSTER = TopologySpec(world_size=64, device="cuda", device_memory_gb=80, local_world_size=8)


def _search(tables: list[tuple[int, int]], topology: TopologySpec) -> Search:
    plan = DimensionPlan(
        base_dim=64,
        tables=[TablePlan(f"t{i}", [f"f{i}"], r, [Block(0, r, d)]) for i, (r, d) in enumerate(tables)],
    )
    configs = block_table_configs(plan)
    constraints, _ = make_constraints(plan, topology)
    return SearchPolicy().search(configs, constraints, topology, Demand.of(configs, "rowwise_adagrad"))


def test_small_plan_gets_torchrecs_full_search() -> None:
    search = _search([(10_000, 64)] * 26, TopologySpec(world_size=8, device="cuda", local_world_size=8))
    assert search.proposers is None and search.timeout_seconds is None and not search.notes
    assert all(c.compute_kernels is None for c in search.constraints.values())
    assert all("row_wise" in c.sharding_types for c in search.constraints.values())


def test_many_tables_get_host_local_types_fused_kernel_and_cheap_proposers() -> None:
    search = _search([(1_000_000, 64)] * 200, CLUSTER)
    assert [type(p) for p in search.proposers] == [GreedyProposer, UniformProposer]
    assert search.timeout_seconds == SearchPolicy().timeout_seconds
    for c in search.constraints.values():
        assert set(c.sharding_types) == set(HOST_LOCAL_TYPES) and c.compute_kernels == ["fused"]
    assert "full-search limit" in search.notes[0]


def test_forced_data_parallel_and_host_sized_tables_keep_their_types() -> None:
    # t1: width 6 is forced data-parallel; t2: 3e9 x 64 (~730 GiB) is larger than a host's 8 ranks.
    search = _search([(1_000, 64), (1_000, 6), (3_000_000_000, 64)] + [(1_000, 64)] * 97, CLUSTER)
    assert search.constraints["t1"].sharding_types == ["data_parallel"]
    assert search.constraints["t1"].compute_kernels == ["dense"]
    assert "row_wise" in search.constraints["t2"].sharding_types
    assert "row_wise" not in search.constraints["t0"].sharding_types


def test_few_tables_on_many_ranks_keep_every_type() -> None:
    search = _search([(1_000_000, 64)] * 10, CLUSTER)
    assert search.proposers is not None  # 640 table-ranks: past the full-search limit
    assert all("row_wise" in c.sharding_types for c in search.constraints.values())


def test_cuda_tables_are_searched_fused_in_hbm_whatever_their_size() -> None:
    # 100 tables of 1e9 x 64 (~24 TiB with state) exceed 64 x 68 GiB of HBM. They kept UVM kernels
    # (tables in host memory the memory report counted in HBM); TorchRec is offered no host memory
    # on CUDA now, and plan_sharding refuses such a plan (test_shard_plan).
    search = _search([(1_000_000_000, 64)] * 100, CLUSTER)
    assert all(c.compute_kernels == ["fused"] for c in search.constraints.values())
    assert "fused kernel only" in search.notes[0]


# --- cluster scale: thousands of tables on hundreds of ranks ------------------------------------

CLUSTER_1024 = TopologySpec(world_size=1024, device="cuda", device_memory_gb=80, local_world_size=8)


def test_cluster_scale_places_fair_share_tables_whole_and_splits_rows_only_past_a_rank() -> None:
    # 5,000 tables on 1,024 ranks (>= 4 per rank): 4,998 small tables, one larger than the fair
    # share (but within a rank) and one larger than a rank (~200 GiB with state, within a host).
    tables = [(100_000, 64)] * 4998 + [(20_000_000, 64), (400_000_000, 64)]
    search = _search(tables, CLUSTER_1024)
    assert [type(p) for p in search.proposers] == [FirstPlacedProposer]
    assert search.constraints["t0"].sharding_types == ["table_wise"]
    assert set(search.constraints["t4998"].sharding_types) == set(HOST_LOCAL_TYPES) - {"table_row_wise"}
    assert set(search.constraints["t4999"].sharding_types) == set(HOST_LOCAL_TYPES)
    assert "table_wise only for tables within a rank's fair share" in search.notes[0]


def test_below_cluster_scale_keeps_greedy_and_uniform_proposers() -> None:
    search = _search([(1_000_000, 64)] * 700, CLUSTER)  # 44,800 table-ranks
    assert [type(p) for p in search.proposers] == [GreedyProposer, UniformProposer]
    assert "table_row_wise" in search.constraints["t0"].sharding_types


def test_bucket_index_answers_as_torchrecs_scan() -> None:
    configs = [
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=100, feature_names=["a"]),
        EmbeddingBagConfig(
            name="virtual", embedding_dim=8, num_embeddings=100, feature_names=["b"],
            use_virtual_table=True, total_num_buckets=10,
        ),
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    topology = TopologySpec(world_size=2).to_torchrec()
    ours = BucketIndexedEnumerator(topology=topology, batch_size=8)
    theirs = EmbeddingEnumerator(topology=topology, batch_size=8)
    for name in ("plain", "virtual", "missing"):
        assert ours._get_num_buckets(name, ebc) == theirs._get_num_buckets(name, ebc)
    assert ours._get_num_buckets("virtual", ebc) == 10


def test_first_placed_proposer_walks_greedys_sequence_and_stops_once_placed() -> None:
    configs = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=10_000, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    topology = TopologySpec(world_size=4, device="cuda", local_world_size=2).to_torchrec()
    space = BucketIndexedEnumerator(topology=topology, batch_size=8).enumerate(
        ebc, [EmbeddingBagCollectionSharder()]
    )
    ours, greedy = FirstPlacedProposer(), GreedyProposer()
    ours.load(space)
    greedy.load(space)
    first = ours.propose()
    assert first == greedy.propose() and len(first) == 3  # every table at its best-rated option
    # Not placeable: the next proposal is GreedyProposer's next one, a different plan.
    ours.feedback(partitionable=False)
    greedy.feedback(partitionable=False)
    second = ours.propose()
    assert second == greedy.propose() and second != first
    ours.feedback(partitionable=True, plan=second, perf_rating=1.0)
    assert ours.propose() is None  # placed: nothing more to try
    ours.load(space)
    assert ours.propose() == first  # a new load starts over


def test_a_large_plan_says_what_torchrecs_planner_is_doing(capsys) -> None:
    # 10,000 tables spent a minute in TorchRec's planner with nothing on the console.
    plan = DimensionPlan(base_dim=8, tables=[TablePlan(f"t{i}", [f"f{i}"], 100, [Block(0, 100, 8)]) for i in range(6)])
    topology = TopologySpec(world_size=2, device="cpu")
    plan_sharding(plan, topology, batch_size=64)
    assert capsys.readouterr().err == ""  # a small plan: done before anyone waits
    plan_sharding(plan, topology, batch_size=64, search=SearchPolicy(full_search_table_ranks=1))
    err = capsys.readouterr().err
    assert re.fullmatch(r"placing 6 tables on 2 cpu ranks with TorchRec's planner \(it stops proposing after "
                        r"120 s\) \.\.\. \d+ s\n", err), err
