"""The DimensionPlan artifact (JSON round trip, validation) and the `embeddings:` config."""

import json

import numpy as np
import pytest

from embshard.config import EmbeddingsConfig
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import ConfigError, PlanError
from embshard.planner.policies import plan_dimensions
from embshard.planner.remap import load_remap
from embshard.planner.types import Block, DimensionPlan, TablePlan
from embshard.typed_config import from_dict, to_dict


def blocked_plan() -> DimensionPlan:
    blocks = [
        Block(0, 2, 16, mlet_width=64, source={"policy": "mde", "popularity": 0.4}),
        Block(2, 10, 4, source={"policy": "mde", "popularity": 0.01}),
    ]
    return DimensionPlan(
        base_dim=16,
        tables=[
            TablePlan("t_a", ["a"], 10, blocks, row_order="frequency", remap="t_a.remap.npy"),
            TablePlan("t_b", ["b"], 3, [Block(0, 3, 16)]),
        ],
        policy={"policy": "mde", "alpha": 0.3},
        notes=["t_a block 1: 3.1 -> 4 (multiple4, FBGEMM needs widths divisible by 4)"],
    )


def test_json_round_trip(tmp_path):
    plan = blocked_plan()
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    assert raw["tables"][0]["blocks"][0] == {
        "start": 0, "end": 2, "dim": 16, "mlet_width": 64, "source": {"policy": "mde", "popularity": 0.4},
        "state_cols": 0, "side_bytes_per_entry": 0,
    }
    loaded = DimensionPlan.load(path)
    assert loaded == plan
    assert not loaded.is_uniform
    assert loaded.table("t_a").block_name(1) == "t_a__b1" and loaded.table("t_b").block_name(0) == "t_b"
    assert loaded.serve_params() == 2 * 16 + 8 * 4 + 4 * 16 + 3 * 16  # projection for the 4-wide block


def test_policy_plan_round_trip_keeps_its_remap(tmp_path):
    spec = DatasetSpec("toy", [], [SparseFeature("a", 6), SparseFeature("b", 4)])
    counts = {"a": np.array([1, 10, 3, 6, 0, 4]), "b": np.array([5, 5, 1, 1])}
    cfg = from_dict(EmbeddingsConfig, {"policy": "mde", "mde": {"mode": "within", "blocks": 2}, "mlet": {"ratio": 2.0}})
    plan = plan_dimensions(cfg, spec, counts, tmp_path)
    loaded = DimensionPlan.load(plan.save(tmp_path / "dimension_plan.json"))
    assert loaded == plan
    assert loaded.policy == to_dict(cfg)
    for t in loaded.tables:
        assert load_remap(tmp_path / t.remap, t.num_embeddings).dtype == np.int64
        assert all(b.mlet_width == 2 * b.dim for b in t.blocks)


@pytest.mark.parametrize(
    "tables, message",
    [
        ([TablePlan("t", ["a"], 10, [Block(0, 10, 8, mlet_width=4)])], r"MLET width k=4 < d=8.*Theorem 2\.2"),
        ([TablePlan("t", ["a"], 10, [Block(0, 4, 8), Block(5, 10, 8)])], r"rows \[5, 10\) do not continue from row 4"),
        ([TablePlan("t", ["a"], 10, [Block(0, 9, 8)])], "blocks cover 9 rows, table has 10"),
        ([TablePlan("t", ["a"], 10, [Block(0, 10, 8)], row_order="frequency")], "needs a remap file"),
        # A method's own arithmetic: tracebacks from torch (a float size) and json (a numpy int).
        ([TablePlan("t", ["a"], 10, [Block(0, 10, 8.0)])], r"table 't' block 0: dim must be an int, got float 8\.0"),
        ([TablePlan("t", ["a"], 10, [Block(0, np.int64(10), 8)])], r"block 0: end must be an int, got int64"),
        ([TablePlan("t", ["a"], 10, [Block(0, 10, True)])], r"block 0: dim must be an int, got bool True"),
        ([TablePlan("t", ["a"], 10.0, [Block(0, 10, 8)])], r"table 't': num_embeddings must be an int, got float"),
        # Two tables of one feature: a KeyError in the model, blamed on the model.
        ([TablePlan("t", ["a"], 10, [Block(0, 10, 8)]), TablePlan("u", ["a"], 10, [Block(0, 10, 8)])],
         r"feature 'a' is read by tables 't' and 'u'; a feature is one table's"),
    ],
)
def test_invalid_plans_are_refused(tables, message):
    with pytest.raises(PlanError, match=message):
        DimensionPlan(base_dim=8, tables=tables)


def test_malformed_plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "base_dim": 8, "tables": [{"name": "t"}]}))
    with pytest.raises(PlanError, match=f"{path}: malformed dimension plan"):
        DimensionPlan.load(path)
    # A newer embshard's plan, once "version 2, expected 1".
    path.write_text(json.dumps({**blocked_plan().to_json(), "version": 2}))
    with pytest.raises(PlanError, match=r": version 2, newer than this embshard reads \(1\): written by a newer"):
        DimensionPlan.load(path)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_yaml_shape():
    cfg = from_dict(EmbeddingsConfig, {"policy": "mde", "mde": {"alpha": 0.25}, "mlet": {"width": 64}}, "embeddings")
    assert (cfg.dim, cfg.mde.mode, cfg.mde.alpha, cfg.rounding, cfg.min_dim, cfg.mlet.width) == (
        16, "across", 0.25, "multiple4", 4, 64)


@pytest.mark.parametrize("key", ["alpha", "mode", "blocks", "budget_params", "budget_bytes"])
def test_flat_mde_keys_say_where_they_moved(key):
    with pytest.raises(ConfigError) as e:
        from_dict(EmbeddingsConfig, {"policy": "mde", key: 1}, "embeddings")
    assert str(e.value) == (f"embeddings.{key}: moved to embeddings.mde.{key}; rewrite `{key}: ...` as "
                            f"`mde: {{{key}: ...}}` under embeddings")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mde": {"alpha": 1.5}}, "embeddings.mde.alpha: must be in [0, 1], got 1.5"),
        ({"dim": 6}, "embeddings.dim: 6 is not a multiple of 4"),
        ({"dim": 24, "rounding": "pow2"}, "embeddings.dim: 24 is not a power of two"),
        ({"min_dim": 32}, "embeddings.min_dim: 32 is above dim 16"),
        ({"mde": {"blocks": 0}}, "embeddings.mde.blocks: must be >= 1"),
        (
            {"policy": "mde", "mde": {"budget_params": 10, "budget_bytes": 40}},
            "embeddings.mde.budget_bytes: set budget_params or budget_bytes",
        ),
        ({"policy": "mde", "mde": {"budget_params": -1}}, "embeddings.mde.budget_params: must be positive"),
        ({"mde": {"budget_params": 1000}}, "embeddings.mde.budget_params: only policy mde takes a budget"),
        ({"policy": "decisions"}, "embeddings.decisions: policy decisions needs the path"),
        ({"mlet": {}}, "embeddings.mlet.ratio: set exactly one of mlet.ratio or mlet.width"),
        ({"mlet": {"ratio": 0.5}}, "embeddings.mlet.ratio: 0.5 < 1 gives k < d"),
        ({"mlet": {"ratio": 2, "features": []}}, "embeddings.mlet.features: an empty list trains no table with MLET"),
        ({"mlet": {"ratio": 2, "features": ["C1", "C1"]}}, "embeddings.mlet.features: 'C1' given twice"),
        ({"mlet": {"width": 0}}, "embeddings.mlet.width: must be 1 to 16,777,216, got 0"),
        ({"mlet": {"width": 1 << 63}}, "embeddings.mlet.width: must be 1 to 16,777,216"),
        ({"min_dim": 1 << 40, "dim": 1 << 40}, "embeddings.dim: at most 16,777,216"),
        ({"mde": {"mode": "inside"}}, "embeddings.mde.mode: 'inside' is not one of 'within', 'across'"),
        ({"alhpa": 0.3}, "embeddings.alhpa: unknown field"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(EmbeddingsConfig, data, "embeddings")
    assert str(e.value).startswith(message)


def test_the_sharding_types_a_plan_may_name_are_torchrecs():
    from torchrec.distributed.types import ShardingType

    from embshard.planner.types import SHARDING_TYPE_NAMES

    assert sorted(SHARDING_TYPE_NAMES) == sorted(s.value for s in ShardingType)
    # A tuple of them, saved as a list, was a plan before their names were checked.
    table = TablePlan("t_a", ["a"], 4, [Block(0, 4, 4)], sharding_types=("table_wise",))
    assert DimensionPlan(4, [table]).tables[0].sharding_types == ("table_wise",)
