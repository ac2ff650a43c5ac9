"""Memory report figures checked by hand on a shard plan small enough to count on paper."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import ParameterSharding

from embshard.errors import PlanError
from embshard.planner.memory import memory_report
from embshard.planner.shard_plan import ShardPlan, plan_sharding
from embshard.planner.topology import GIB, TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan

BASE = 8


def _sharded(kind: str, ranks: list[int], shards: list[tuple[list[int], list[int], int]]) -> ParameterSharding:
    spec = EnumerableShardingSpec(
        [ShardMetadata(shard_offsets=o, shard_sizes=s, placement=f"rank:{r}/cpu") for o, s, r in shards]
    )
    return ParameterSharding(sharding_type=kind, compute_kernel="fused", ranks=ranks, sharding_spec=spec)


@pytest.fixture
def hand_plan() -> tuple[DimensionPlan, ShardPlan]:
    plan = DimensionPlan(
        base_dim=BASE,
        tables=[
            TablePlan("a", ["a"], 100, [Block(0, 100, 8)]),  # table-wise on rank 1
            TablePlan("b", ["b"], 50, [Block(0, 50, 16)]),  # column-wise, 8 columns per rank
            TablePlan("c", ["c"], 10, [Block(0, 10, 6)]),  # data-parallel on both ranks
            TablePlan("d", ["d"], 20, [Block(0, 20, 4, mlet_width=8)]),  # MLET, table-wise on rank 0
        ],
    )
    sharding = {
        "a": _sharded("table_wise", [1], [([0, 0], [100, 8], 1)]),
        "b": _sharded("column_wise", [0, 1], [([0, 0], [50, 8], 0), ([0, 8], [50, 8], 1)]),
        "c": ParameterSharding(sharding_type="data_parallel", compute_kernel="dense", ranks=[0, 1]),
        "d": _sharded("table_wise", [0], [([0, 0], [20, 8], 0)]),
    }
    return plan, ShardPlan(sharding, TopologySpec(world_size=2, device="cpu", device_memory_gb=1))


def test_projections_counted(hand_plan) -> None:
    plan, shard_plan = hand_plan
    report = memory_report(plan, shard_plan, "rowwise_adagrad")
    # Training: b 16->8 (128), c 6->8 (48), d's MLET W2 8x4 (32) and its 4->8 projection (32).
    assert report.projection_bytes == (128 + 48 + 32 + 32) * 4
    # Serving: MLET collapsed, so only the projections to the base dim remain.
    assert report.serve_projection_bytes == (128 + 48 + 32) * 4


def test_per_rank_bytes_by_hand(hand_plan) -> None:
    plan, shard_plan = hand_plan
    report = memory_report(plan, shard_plan, "rowwise_adagrad")
    train_proj, serve_proj = 240, 208  # elements, from test_projections_counted
    # rowwise_adagrad keeps one fp32 per row of each shard.
    rank0_train = (50 * 8 + 50) + (10 * 6 + 10) + (20 * 8 + 20)  # b half, c replica, d at k=8
    rank1_train = (100 * 8 + 100) + (50 * 8 + 50) + (10 * 6 + 10)  # a, b half, c replica
    assert report.per_rank[0]["train_bytes"] == (rank0_train + train_proj) * 4
    assert report.per_rank[1]["train_bytes"] == (rank1_train + train_proj) * 4
    rank0_serve = 50 * 8 + 10 * 6 + 20 * 4  # d served at d=4
    rank1_serve = 100 * 8 + 50 * 8 + 10 * 6
    assert report.per_rank[0]["serve_bytes"] == (rank0_serve + serve_proj) * 4
    assert report.per_rank[1]["serve_bytes"] == (rank1_serve + serve_proj) * 4


def test_shard_kinds_by_hand(hand_plan) -> None:
    plan, shard_plan = hand_plan
    shards = {(s.table, s.rank): s for s in memory_report(plan, shard_plan, "rowwise_adagrad").shards}
    assert set(shards) == {("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)}
    assert (shards["b", 1].rows, shards["b", 1].cols) == (50, 8)
    assert shards["a", 1].optimizer_bytes == 100 * 4  # rows x 4 bytes
    assert shards["c", 0].weight_bytes == shards["c", 1].weight_bytes == 10 * 6 * 4
    assert (shards["d", 0].weight_bytes, shards["d", 0].serve_bytes) == (20 * 8 * 4, 20 * 4 * 4)


def test_optimizer_state_scales_with_optimizer(hand_plan) -> None:
    plan, shard_plan = hand_plan
    shards = {(s.table, s.rank): s for s in memory_report(plan, shard_plan, "adam").shards}
    assert shards["a", 1].optimizer_bytes == 2 * 100 * 8 * 4
    shards = {(s.table, s.rank): s for s in memory_report(plan, shard_plan, "sgd").shards}
    assert shards["a", 1].optimizer_bytes == 0


def test_check_fits_names_rank_and_shortfall(hand_plan) -> None:
    plan, shard_plan = hand_plan
    report = memory_report(plan, shard_plan, "rowwise_adagrad")
    report.check_fits()  # 1 GiB per rank holds a few KiB
    tight = ShardPlan(shard_plan.sharding, TopologySpec(world_size=2, device="cpu", device_memory_gb=6000 / GIB))
    need = memory_report(plan, tight, "rowwise_adagrad").per_rank[1]["train_bytes"]
    assert need == (1420 + 240) * 4
    with pytest.raises(PlanError, match=rf"rank 1 needs .*short by {need - 6000} B.*largest there: a"):
        memory_report(plan, tight, "rowwise_adagrad").check_fits()
    # The dense layers take their place by size: they were named first whatever theirs
    # ("the dense layers (769.3 KiB), t_C1 (63.3 GiB)").
    for dense, largest in ((8, r"a \(3\.5 KiB\), b \(1\.8 KiB\), c \(280 B\)$"),
                           (1 << 20, r"the dense layers \(1\.0 MiB\), a \(3\.5 KiB\), b \(1\.8 KiB\)$")):
        with pytest.raises(PlanError, match=r"largest there: " + largest):
            replace(memory_report(plan, tight, "rowwise_adagrad"), dense_bytes=dense).check_fits()


def test_planned_shards_conserve_rows() -> None:
    """Whatever TorchRec decides, the report counts every row once per model-parallel table and
    once per rank for a data-parallel one."""
    plan = DimensionPlan(
        base_dim=16,
        tables=[
            TablePlan(f"t{i}", [f"f{i}"], rows, [Block(0, rows, dim)])
            for i, (rows, dim) in enumerate([(5000, 16), (300, 8), (40, 6), (20000, 32)])
        ],
    )
    shard_plan = plan_sharding(plan, TopologySpec(world_size=2, device="cuda"), batch_size=64)
    report = memory_report(plan, shard_plan, "rowwise_adagrad")
    for t in plan.tables:
        pieces = [s for s in report.shards if s.table == t.name]
        copies = 2 if shard_plan.sharding[t.name].sharding_type == "data_parallel" else 1
        assert sum(s.rows * s.cols for s in pieces) == copies * t.num_embeddings * t.blocks[0].dim


def test_the_printed_report_shows_the_fullest_ranks_of_a_large_world() -> None:
    # One line per rank: 2,048 lines at 2,048 ranks.
    rows = [100 * (i + 1) for i in range(40)]
    plan = DimensionPlan(base_dim=16, tables=[TablePlan(f"t{i}", [f"f{i}"], n, [Block(0, n, 16)])
                                              for i, n in enumerate(rows)])
    report = memory_report(plan, plan_sharding(plan, TopologySpec(world_size=40), batch_size=64), "rowwise_adagrad")
    lines = report.format(max_ranks=5).splitlines()
    shown = [int(line.split()[0]) for line in lines[1:6]]
    fullest = sorted(report.per_rank, key=lambda r: -report.per_rank[r]["train_bytes"])[:5]
    assert shown == sorted(fullest) and lines[6] == "... and 35 less full ranks (see the JSON report)"


def test_what_a_method_holds_beside_its_shards_is_counted_per_entry(hand_plan) -> None:
    # A lottery retrain keeps a bool mask of each local shard all run long (a byte an entry); the
    # report left it out, and a plan it said fitted held a quarter more than the tables' fp32 bytes.
    plan, shard_plan = hand_plan
    masked = replace(plan, tables=[replace(t, blocks=[replace(b, side_bytes_per_entry=1) for b in t.blocks])
                                   for t in plan.tables])
    before, after = memory_report(plan, shard_plan, "rowwise_adagrad"), memory_report(masked, shard_plan,
                                                                                       "rowwise_adagrad")
    # Rank 1 holds a (100 x 8), half of b (50 x 8) and a replica of c (10 x 6); serving holds none.
    assert after.per_rank[1]["train_bytes"] - before.per_rank[1]["train_bytes"] == 100 * 8 + 50 * 8 + 10 * 6
    assert after.per_rank[0]["train_bytes"] - before.per_rank[0]["train_bytes"] == 50 * 8 + 10 * 6 + 20 * 8
    assert after.per_rank[1]["serve_bytes"] == before.per_rank[1]["serve_bytes"]
    assert after.table_bytes(1)["a"][0] == before.table_bytes(1)["a"][0] + 100 * 8
    with pytest.raises(PlanError, match=r"table 'a' block 0: side_bytes_per_entry must be >= 0, got -1"):
        replace(plan, tables=[replace(plan.tables[0], blocks=[replace(plan.tables[0].blocks[0],
                                                                      side_bytes_per_entry=-1)])])
