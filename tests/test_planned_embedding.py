"""PlannedEmbeddingBags against MDE's Alg. 1 written out in plain torch, and split_by_block's edges.

The reference never touches TorchRec: for every id it finds the block holding the id's ranked row,
reads that row from the block's table, applies the block's MLET W2 and projection P_i, and sums
over the bag. The module under test must agree for any mix of block widths and bag shapes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.planner.memory import memory_report
from embshard.planner.shard_plan import block_table_configs, plan_sharding
from embshard.planner.topology import TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.sharding.block_split import feature_blocks, split_by_block
from embshard.sharding.planned_embedding import PlannedEmbeddingBags

BASE = 8


def mixed_plan() -> DimensionPlan:
    """Four tables: blocks of widths 8/4/2 (one MLET-trained), a table shared by two features
    (one of them multi-hot), a single-block table narrower than the base dim, and a table of two
    blocks at the base dim (no projection at all, yet their partial bags must still be summed)."""
    return DimensionPlan(
        base_dim=BASE,
        tables=[
            TablePlan("t_a", ["a"], 10, [Block(0, 3, 8), Block(3, 7, 4, mlet_width=6), Block(7, 10, 2)]),
            TablePlan("t_bc", ["b", "c"], 6, [Block(0, 1, 8), Block(1, 6, 4)]),
            TablePlan("t_d", ["d"], 5, [Block(0, 5, 4)]),
            TablePlan("t_e", ["e"], 4, [Block(0, 2, 8), Block(2, 4, 8)]),
        ],
    )


def kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(bags)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor([i for k in keys for bag in bags[k] for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for k in keys for bag in bags[k]], dtype=torch.int32),
        stride=len(next(iter(bags.values()))),
    )


def alg1_reference(module: PlannedEmbeddingBags, bags: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """MDE Alg. 1 per id, summed per bag, with the module's own weights."""
    plan = module.plan
    out = {}
    for feature, feature_bags in bags.items():
        table = next(t for t in plan.tables if feature in t.features)
        rows = []
        for bag in feature_bags:
            total = torch.zeros(plan.output_dim(table))
            for r in bag:
                i = next(j for j, b in enumerate(table.blocks) if b.start <= r < b.end)
                name = table.block_name(i)
                e = module.ebc.embedding_bags[name].weight[r - table.blocks[i].start]
                if name in module.mlet:
                    e = module.mlet[name].weight @ e
                if name in module.projections:
                    e = module.projections[name].weight @ e
                total = total + e
            rows.append(total)
        out[feature] = torch.stack(rows)
    return out


BAGS = {
    # single-hot, every block of t_a, both sides of each boundary (2|3 and 6|7)
    "a": [[0], [2], [3], [6], [7], [9]],
    # multi-hot across blocks, repeated ids, an empty bag, ids out of ranked order
    "b": [[5, 0, 1], [], [0, 0], [4], [2, 5, 3, 1], []],
    "c": [[1], [0], [5], [], [3, 3], [0]],
    "d": [[0, 4], [1], [], [2, 3, 4], [4], [0]],
    "e": [[0, 3], [1, 2], [3], [], [0, 1, 2, 3], [2]],
}


def test_forward_equals_alg1_reference() -> None:
    torch.manual_seed(0)
    module = PlannedEmbeddingBags(mixed_plan())
    got = module(kjt(BAGS))
    assert got.keys() == ["a", "b", "c", "d", "e"]
    assert got.values().shape == (6, 5 * BASE)
    want = alg1_reference(module, BAGS)
    for feature, values in got.to_dict().items():
        torch.testing.assert_close(values, want[feature], rtol=1e-5, atol=1e-6)
    # An empty bag pools to zero, whatever the projections hold.
    assert torch.count_nonzero(got.to_dict()["b"][1]) == 0


def test_per_feature_widths_project_only_within_a_table() -> None:
    """uniform_width off (an arch that concatenates): each feature at its table's widest block;
    a single-block table is never projected, and the memory report counts exactly the
    projections and W2s the module holds."""
    torch.manual_seed(0)
    plan = replace(mixed_plan(), uniform_width=False)
    module = PlannedEmbeddingBags(plan)
    assert module.feature_dims == {"a": 8, "b": 8, "c": 8, "d": 4, "e": 8}
    assert set(module.projections) == {"t_a__b1", "t_a__b2", "t_bc__b1"}  # t_d stays 4 wide
    got = module(kjt(BAGS))
    assert got.length_per_key() == [8, 8, 8, 4, 8]
    want = alg1_reference(module, BAGS)
    for feature, values in got.to_dict().items():
        torch.testing.assert_close(values, want[feature], rtol=1e-5, atol=1e-6)
    report = memory_report(plan, plan_sharding(plan, TopologySpec(1, "cuda"), batch_size=6), "rowwise_adagrad")
    dense = sum(p.numel() for p in [*module.projections.parameters(), *module.mlet.parameters()])
    assert report.projection_bytes == dense * 4
    uniform = memory_report(mixed_plan(), plan_sharding(mixed_plan(), TopologySpec(1, "cuda"), batch_size=6),
                            "rowwise_adagrad")
    assert uniform.projection_bytes - report.projection_bytes == 4 * BASE * 4  # t_d's 4 -> 8 projection


def test_forward_with_input_keys_in_another_order() -> None:
    torch.manual_seed(0)
    module = PlannedEmbeddingBags(mixed_plan())
    reordered = {k: BAGS[k] for k in ["d", "e", "b", "a", "c"]}
    got = module(kjt(reordered)).to_dict()
    want = module(kjt(BAGS)).to_dict()
    for feature in BAGS:
        assert torch.equal(got[feature], want[feature])


def test_gradients_reach_every_block_and_projection() -> None:
    torch.manual_seed(0)
    module = PlannedEmbeddingBags(mixed_plan())
    out = module(kjt(BAGS)).values()
    (out * torch.randn_like(out)).sum().backward()
    names = [c.name for c in block_table_configs(module.plan)]
    assert len(names) == 8
    for name in names:
        grad = module.ebc.embedding_bags[name].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert set(module.projections) == {"t_a__b1", "t_a__b2", "t_bc__b1", "t_d"}
    assert set(module.mlet) == {"t_a__b1"}
    for p in [*module.projections.parameters(), *module.mlet.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_uniform_plan_is_bit_identical_to_bare_torchrec() -> None:
    plan = DimensionPlan(
        base_dim=BASE,
        tables=[TablePlan("t_a", ["a"], 10, [Block(0, 10, BASE)]),
                TablePlan("t_bc", ["b", "c"], 6, [Block(0, 6, BASE)])],
    )
    assert plan.is_uniform
    torch.manual_seed(0)
    module = PlannedEmbeddingBags(plan)
    assert len(module.projections) == 0 and len(module.mlet) == 0
    # TorchRec's own default draw: a one-block table starts exactly as a bare collection's.
    torch.manual_seed(0)
    bare = EmbeddingBagCollection(tables=[replace(c, weight_init_min=None, weight_init_max=None)
                                          for c in block_table_configs(plan)])
    assert all(torch.equal(module.ebc.state_dict()[k], v) for k, v in bare.state_dict().items())
    features = kjt({k: BAGS[k] for k in ["a", "b", "c"]})
    got, want = module(features), bare(features)
    assert got.keys() == want.keys()
    assert torch.equal(got.values(), want.values())


def test_blocks_start_as_their_rows_would_in_the_whole_table() -> None:
    """TorchRec draws a table from U(+-sqrt(1/rows)); a block drawn by its own row count would
    start a popular block of 40 rows of a 10,000-row table 16 times wider than those rows."""
    plan = DimensionPlan(base_dim=BASE, tables=[
        TablePlan("t", ["a"], 10_000, [Block(0, 40, 8), Block(40, 10_000, 4)]),
        TablePlan("u", ["b"], 100, [Block(0, 100, 8)]),
    ])
    bound = (1 / 10_000) ** 0.5
    configs = {c.name: c for c in block_table_configs(plan)}
    assert {n: (c.get_weight_init_min(), c.get_weight_init_max()) for n, c in configs.items()} == {
        "t__b0": (-bound, bound), "t__b1": (-bound, bound), "u": (-0.1, 0.1)}
    torch.manual_seed(0)
    module = PlannedEmbeddingBags(plan)
    popular = module.ebc.embedding_bags["t__b0"].weight
    assert popular.abs().max() <= bound and popular.std() > bound / 4  # drawn over the whole range


def _split(bags: dict[str, list[list[int]]], plan: DimensionPlan) -> dict[str, tuple[list[int], list[int]]]:
    out = split_by_block(kjt(bags), feature_blocks(plan)).to_dict()
    return {k: (jt.values().tolist(), jt.lengths().tolist()) for k, jt in out.items()}


def test_split_ids_on_block_boundaries() -> None:
    got = _split({"a": [[2, 3], [6, 7], [0, 9]], "b": [[0, 1], [], [5]], "c": [[1], [0], []],
                  "d": [[4], [0], [2]], "e": [[1, 2], [], [3]]}, mixed_plan())
    assert got["a__b0"] == ([2, 0], [1, 0, 1])
    assert got["a__b1"] == ([0, 3], [1, 1, 0])  # rows 3 and 6 -> local 0 and 3
    assert got["a__b2"] == ([0, 2], [0, 1, 1])  # rows 7 and 9 -> local 0 and 2
    assert got["b__b0"] == ([0], [1, 0, 0])
    assert got["b__b1"] == ([0, 4], [1, 0, 1])
    assert got["c__b0"] == ([0], [0, 1, 0])
    assert got["c__b1"] == ([0], [1, 0, 0])
    assert got["d"] == ([4, 0, 2], [1, 1, 1])  # single-block table: untouched
    assert got["e__b0"] == ([1], [1, 0, 0])
    assert got["e__b1"] == ([0, 1], [1, 0, 1])


@pytest.mark.parametrize("ids, block", [([0, 1, 2, 0], "a__b0"), ([7, 9, 8, 7], "a__b2")])
def test_split_all_ids_in_one_block(ids: list[int], block: str) -> None:
    plan = mixed_plan()
    start = {"a__b0": 0, "a__b2": 7}[block]
    got = _split({"a": [ids[:3], [], ids[3:]], "b": [[], [], []], "c": [[], [], []], "d": [[], [], []],
                  "e": [[], [], []]}, plan)
    assert got[block] == ([i - start for i in ids], [3, 0, 1])
    for other in {"a__b0", "a__b1", "a__b2"} - {block}:
        assert got[other] == ([], [0, 0, 0])
    assert got["b__b0"] == got["b__b1"] == ([], [0, 0, 0])


def test_split_keeps_bag_order_within_a_block() -> None:
    got = _split({"a": [[5, 4, 3, 6], [6, 3]], "b": [[], []], "c": [[], []], "d": [[], []], "e": [[], []]},
                  mixed_plan())
    assert got["a__b1"] == ([2, 1, 0, 3, 3, 0], [4, 2])
