"""MDE (Ginart et al.): Alg. 2 blocking, Alg. 3 dims, budgets, across-table mode."""

import re

import numpy as np
import pytest

from embshard.config import EmbeddingsConfig, MdeConfig
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import PlanError
from embshard.planner.policies import plan_dimensions
from embshard.planner.policies.mde import base_lambda, block_cost, equipartition, mde_dims, served_dim
from embshard.planner.remap import frequency_ranking, load_remap
from embshard.planner.rounding import round_width


def spec_of(**cards: int) -> DatasetSpec:
    return DatasetSpec("toy", [], [SparseFeature(name, n) for name, n in cards.items()])


def dims(plan):
    return {t.name: [b.dim for b in t.blocks] for t in plan.tables}


def sized(plan):
    """Alg. 3's rounded widths, before blocks too small to be worth a projection are served at dim."""
    return {t.name: [b.source["sized_dim"] for b in t.blocks] for t in plan.tables}


# --- Alg. 3: d_i = lambda * p_i^alpha ---------------------------------------------------------

P = np.array([0.5, 0.3, 0.2])


def test_alg3_lambda_from_base_dim():
    lam = base_lambda(P, alpha=0.5, base_dim=32)
    assert lam == pytest.approx(32 * 0.5**-0.5)  # 45.2548
    raw = mde_dims(P, 0.5, lam)
    # 32 * (p_i / 0.5)^0.5 = 32, 32*sqrt(0.6), 32*sqrt(0.4)
    assert raw == pytest.approx([32.0, 24.7871, 20.2386], abs=1e-4)
    assert [round_width(x, "multiple4", 4, 32).value for x in raw] == [32, 24, 20]
    assert [round_width(x, "pow2", 4, 32).value for x in raw] == [32, 32, 16]


@pytest.mark.parametrize("rounding, expected", [("multiple4", [32, 24, 20]), ("pow2", [32, 32, 16])])
def test_alg3_through_the_policy(rounding, expected):
    # One-row tables looked up 5, 3 and 2 times: block popularities are exactly (0.5, 0.3, 0.2).
    spec = spec_of(a=1, b=1, c=1)
    counts = {"a": np.array([5]), "b": np.array([3]), "c": np.array([2])}
    cfg = EmbeddingsConfig(policy="mde", dim=32, rounding=rounding, mde=MdeConfig(alpha=0.5))
    plan = plan_dimensions(cfg, spec, counts)
    assert sized(plan) == {"t_a": [32], "t_b": [expected[1]], "t_c": [expected[2]]}
    # One row at 24 plus a 24 x 32 projection (792 parameters) costs more than the row at 32.
    assert dims(plan) == {"t_a": [32], "t_b": [32], "t_c": [32]}
    assert f"t_c block 0: {expected[2]} -> 32 (1 rows at {expected[2]} and a {expected[2]} x 32 projection cost " \
           "no less than the rows at 32)" in plan.notes
    b = plan.table("t_b").blocks[0]
    assert b.source["policy"] == "mde"
    assert b.source["popularity"] == pytest.approx(0.3)
    assert b.source["raw_dim"] == pytest.approx(24.7871, abs=1e-4)
    assert any(n.startswith("t_c block 0: 20.24 -> ") for n in plan.notes)
    assert plan.policy["mde"]["alpha"] == 0.5 and plan.policy["policy"] == "mde"


def test_alpha_zero_is_uniform(tmp_path):
    assert mde_dims(P, 0.0, base_lambda(P, 0.0, 32)) == pytest.approx([32, 32, 32])
    spec = spec_of(a=10, b=1000)
    counts = {"a": np.arange(10), "b": np.arange(1000)}
    for mode in ("across", "within"):
        cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(alpha=0.0, mode=mode, blocks=3))
        plan = plan_dimensions(cfg, spec, counts, tmp_path)
        assert all(d == 16 for ds in dims(plan).values() for d in ds)


# --- across-table mode (the paper's CTR setting) ------------------------------------------------


def test_across_without_counts_uses_one_over_n():
    # p_i proportional to 1/n_i; alpha 0.5: d_i = 32 * sqrt(n_0 / n_i) = 32, 16, 8 exactly.
    spec = spec_of(small=10, mid=40, big=160)
    plan = plan_dimensions(EmbeddingsConfig(policy="mde", dim=32, mde=MdeConfig(alpha=0.5)), spec, None)
    assert dims(plan) == {"t_small": [32], "t_mid": [16], "t_big": [8]}
    assert all(t.row_order == "identity" and t.remap is None for t in plan.tables)
    # p_small = (1/10) / 3 once normalised over the three tables: lambda = 32 * sqrt(30)
    assert plan.notes == [
        "mde across: lambda = 175.3 from dim 32 (most popular block gets it)",
        "mde across: no id counts, so p_i = 1/n_i (one lookup per table per example)",
    ]


def test_across_counts_follow_lookups():
    spec = spec_of(small=10, mid=40, big=160)
    single_hot = {"small": np.full(10, 16), "mid": np.full(40, 4), "big": np.full(160, 1)}
    plan = plan_dimensions(EmbeddingsConfig(policy="mde", dim=32, mde=MdeConfig(alpha=0.5)), spec, single_hot)
    assert dims(plan) == {"t_small": [32], "t_mid": [16], "t_big": [8]}  # same 160 lookups each: 1/n_i
    # A multi-hot `big` looked up 4x as often per example: p_big = 640/160 vs 160/10 -> 32*sqrt(1/4)
    multi_hot = {**single_hot, "big": np.full(160, 4)}
    plan = plan_dimensions(EmbeddingsConfig(policy="mde", dim=32, mde=MdeConfig(alpha=0.5)), spec, multi_hot)
    assert dims(plan)["t_big"] == [16]


def test_across_clips_to_min_dim_and_notes_it():
    spec = spec_of(a=1, b=1_000_000)
    plan = plan_dimensions(EmbeddingsConfig(policy="mde", dim=16, min_dim=8, mde=MdeConfig(alpha=1.0)), spec, None)
    assert dims(plan) == {"t_a": [16], "t_b": [8]}
    assert any(n.startswith("t_b block 0: 1.6e-05 -> 8") and "raised to min_dim 8" in n for n in plan.notes)


# --- Alg. 2: frequency ranking and equal-mass blocks ------------------------------------------

COUNTS = np.array([1, 10, 3, 6, 0, 4])  # ranked: id1(10) id3(6) id5(4) id2(3) id0(1) id4(0)


def test_frequency_ranking_is_descending_and_stable():
    assert frequency_ranking(COUNTS).tolist() == [4, 0, 3, 1, 5, 2]
    assert frequency_ranking(np.array([2, 5, 2, 5])).tolist() == [2, 0, 3, 1]  # ties keep id order


def test_equipartition_cut_points():
    ranked = np.array([10, 6, 4, 3, 1, 0])  # prefix sums 10 16 20 23 24 24
    assert equipartition(ranked, 2) == [0, 2, 6]  # first prefix >= 12 holds 2 rows
    assert equipartition(ranked, 3) == [0, 1, 2, 6]  # >= 8 after 1 row, >= 16 after 2
    assert equipartition(np.array([100, 1, 1, 1]), 3) == [0, 1, 4]  # a heavy id swallows a cut
    assert equipartition(np.zeros(5, dtype=np.int64), 3) == [0, 5]


def test_within_table_plan(tmp_path):
    spec = spec_of(x=6)
    cfg = EmbeddingsConfig(policy="mde", dim=32, mde=MdeConfig(alpha=0.5, mode="within", blocks=3))
    plan = plan_dimensions(cfg, spec, {"x": COUNTS}, tmp_path)
    t = plan.table("t_x")
    assert [(b.start, b.end) for b in t.blocks] == [(0, 1), (1, 2), (2, 6)]
    # block popularity = lookups / rows: 10/1, 6/1, 8/4 (over 24): d = 32*sqrt(p / p_0)
    assert [b.source["raw_dim"] for b in t.blocks] == pytest.approx([32, 32 * 0.6**0.5, 32 * 0.2**0.5])
    assert [b.source["sized_dim"] for b in t.blocks] == [32, 24, 16]  # 32, 24.79, 14.31
    # Served: 1 row at 24 costs 24 + 24 x 32 > 32; 4 rows at 16 cost 64 + 16 x 32 > 4 x 32.
    assert [b.dim for b in t.blocks] == [32, 32, 32]
    # The file is named by its rows: a plan beside it, or replacing it, cannot swap its order.
    assert t.row_order == "frequency" and re.fullmatch(r"t_x\.[0-9a-f]{16}\.remap\.npy", t.remap)
    assert load_remap(tmp_path / t.remap, 6).tolist() == [4, 0, 3, 1, 5, 2]


def test_within_notes_fewer_blocks(tmp_path):
    spec = spec_of(x=4)
    cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(mode="within", blocks=3))
    plan = plan_dimensions(cfg, spec, {"x": np.array([1, 100, 1, 1])}, tmp_path)
    assert len(plan.table("t_x").blocks) == 2
    assert any(n.startswith("t_x: 2 blocks instead of 3 (equal-lookup cuts coincide") for n in plan.notes)


def test_within_needs_counts_and_out_dir():
    spec = spec_of(x=6)
    cfg = EmbeddingsConfig(policy="mde", mde=MdeConfig(mode="within", blocks=2))
    with pytest.raises(PlanError, match="within ranks rows by training frequency.*'x'.*profile"):
        plan_dimensions(cfg, spec, None)
    with pytest.raises(PlanError, match="'t_x' reorders its rows"):
        plan_dimensions(cfg, spec, {"x": COUNTS}, None)
    with pytest.raises(PlanError, match="id counts for 'x': expected 6 integers"):
        plan_dimensions(cfg, spec, {"x": np.ones(5, dtype=np.int64)})


# --- budgets ------------------------------------------------------------------------------------

CARDS = {f"C{i}": n for i, n in enumerate([50, 200, 1000, 5000, 20000, 100000])}


def zipf_counts(seed=7):
    rng = np.random.default_rng(seed)
    return {f: np.bincount(rng.zipf(1.2, 20000) % n, minlength=n) for f, n in CARDS.items()}


@pytest.mark.parametrize(
    "mode, rounding, budget",
    [
        ("across", "multiple4", 600_000),
        ("across", "multiple4", 1_000_000),
        ("across", "multiple4", 2_000_000),
        ("across", "none", 4_000_000),
        ("within", "multiple4", 600_000),
        ("within", "multiple4", 1_000_000),
        ("within", "none", 4_000_000),
        ("within", "pow2", 1_000_000),
    ],
)
def test_budget_lands_within_one_percent(tmp_path, mode, rounding, budget):
    mde = MdeConfig(mode=mode, blocks=4, budget_params=budget)
    cfg = EmbeddingsConfig(policy="mde", dim=64, rounding=rounding, mde=mde)
    plan = plan_dimensions(cfg, spec_of(**CARDS), zipf_counts(), tmp_path)
    # serve_params counts the d_i x 64 projection of every block narrower than 64
    assert 0.99 * budget <= plan.serve_params() <= budget
    blocks = sorted((b for t in plan.tables for b in t.blocks), key=lambda b: -b.source["popularity"])
    widths = [b.source["sized_dim"] for b in blocks]
    assert widths == sorted(widths, reverse=True)  # monotone in p
    assert plan.notes[0].startswith(f"mde {mode}: lambda = ")


def test_a_block_not_worth_a_projection_is_served_at_dim():
    # Narrowing 3 rows from 64 to 28 saves 108 parameters; the 28 x 64 projection costs 1,792.
    assert served_dim(3, 28, 64) == 64 and block_cost(3, 28, 64) == 3 * 64
    assert served_dim(100, 28, 64) == 28 and block_cost(100, 28, 64) == 100 * 28 + 28 * 64
    # At a tie (32 rows x 16 saved = 16 x 32) the unprojected block: as cheap, and of full rank.
    assert served_dim(32, 16, 32) == 32 and served_dim(33, 16, 32) == 16
    assert served_dim(1, 64, 64) == 64


def test_budget_counts_projections():
    # Two tables, one at 64 (no projection) and one at 4 (projection 4 x 64 = 256):
    # 10*64 + 1000*4 + 256 = 4896; the plan must see 4896 as the whole budget, not 4640.
    spec = spec_of(a=10, b=1000)
    cfg = EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(alpha=1.0, budget_params=4896))
    plan = plan_dimensions(cfg, spec, None)
    assert dims(plan) == {"t_a": [64], "t_b": [4]}
    assert plan.serve_params() == 4896


def test_budget_bytes_is_fp32_params(tmp_path):
    spec, counts = spec_of(**CARDS), zipf_counts()
    by_params = plan_dimensions(
        EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(budget_params=1_000_000)), spec, counts
    )
    by_bytes = plan_dimensions(
        EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(budget_bytes=4_000_000)), spec, counts
    )
    assert dims(by_params) == dims(by_bytes)
    assert "4,000,000 bytes of fp32" in by_bytes.notes[0]


def test_infeasible_budgets_say_why():
    spec = spec_of(**CARDS)
    with pytest.raises(PlanError, match="below the smallest MDE plan, 506,536 params .* min_dim 4"):
        plan_dimensions(EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(budget_params=400_000)), spec, None)
    with pytest.raises(PlanError, match="above the largest MDE plan, 8,080,000 params .* dim 64"):
        plan_dimensions(EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(budget_params=9_000_000)), spec, None)
    with pytest.raises(PlanError, match="cannot land within 1% .* rounding pow2"):
        plan_dimensions(
            EmbeddingsConfig(policy="mde", dim=64, rounding="pow2", mde=MdeConfig(budget_params=2_000_000)),
            spec,
            zipf_counts(),
        )


# --- budgets few large tables cannot reach by growing alone (MovieLens-100K) --------------------

# The features the MovieLens converter makes from ml-100k, with its cardinalities (+1: unknown id).
ML100K = {"userId": 944, "movieId": 1683, "gender": 3, "age": 62, "occupation": 22, "zip": 796,
          "year": 72, "genres": 20}
ML100K_ROWS = 58_000  # training ratings once the 3s are dropped; genres is multi-hot (~2 a row)


def ml100k():
    spec = DatasetSpec("ml100k", [], [SparseFeature(f, n, f == "genres") for f, n in ML100K.items()])
    lookups = {f: ML100K_ROWS * (2 if f == "genres" else 1) for f in ML100K}
    # Across tables only each feature's total lookups matter: p_i = lookups_i / rows_i.
    counts = {f: np.bincount(np.arange(lookups[f]) % n, minlength=n) for f, n in ML100K.items()}
    return spec, counts


def monotone_grid_totals(dim):
    """Every serving-parameter total of a multiple4 plan non-increasing in popularity (brute force)."""
    spec, counts = ml100k()
    rows = np.array(list(ML100K.values()))
    p = np.array([counts[f].sum() for f in ML100K]) / rows
    widths = np.arange(4, dim + 1, 4)
    grid = widths[np.indices((len(widths),) * len(rows)).reshape(len(rows), -1).T]
    ranked = grid[:, np.argsort(-p, kind="stable")]
    grid = grid[np.all(np.diff(ranked, axis=1) <= 0, axis=1)]
    # A block is served at dim where its projection costs no less than narrowing its rows saves.
    projected = (grid < dim) & (rows * (dim - grid) > grid * dim)
    return np.unique(np.where(projected, grid * rows + grid * dim, dim * rows).sum(axis=1))


@pytest.mark.parametrize("budget", [120_000, 145_000, 210_000])
def test_budget_lands_on_movielens_100k(budget):
    # Growing the bisection's plan one step at a time stopped at 92-98% of these budgets.
    spec, counts = ml100k()
    cfg = EmbeddingsConfig(policy="mde", dim=64, mde=MdeConfig(budget_params=budget))
    plan = plan_dimensions(cfg, spec, counts)
    assert 0.99 * budget <= plan.serve_params() <= budget
    blocks = sorted((b for t in plan.tables for b in t.blocks), key=lambda b: -b.source["popularity"])
    widths = [b.source["sized_dim"] for b in blocks]
    assert widths == sorted(widths, reverse=True)
    assert all(b.dim % 4 == 0 and 4 <= b.dim <= 64 for b in blocks)
    assert "nearest a rounding boundary moved" in plan.notes[0]
    assert any("narrowed to fit the budget" in n for n in plan.notes)


def test_unreachable_budget_names_the_reachable_neighbours():
    spec, counts = ml100k()
    totals = monotone_grid_totals(16)
    budget = 40_000
    assert not np.any((totals >= 0.99 * budget) & (totals <= budget))  # truly unreachable
    below, above = totals[totals < 0.99 * budget].max(), totals[totals > budget].min()
    cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(budget_params=budget))
    with pytest.raises(PlanError) as err:
        plan_dimensions(cfg, spec, counts)
    assert (
        f"nearest plans have {below:,} params (budgets {below:,} to {int(below / 0.99):,} land) "
        f"and {above:,} params (budgets {above:,} to {int(above / 0.99):,} land)"
    ) in str(err.value)
    # ... and the budgets it names are met.
    for reachable in (int(below), int(above / 0.99)):
        cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(budget_params=reachable))
        assert 0.99 * reachable <= plan_dimensions(cfg, spec, counts).serve_params() <= reachable


def test_every_total_on_the_grid_is_a_budget_that_lands():
    # A bucket of totals that straddled the budget kept its assignment of least deviation, over
    # the budget: plans of exactly the budget were refused, and so were budgets the error named.
    spec, counts = ml100k()
    for budget in monotone_grid_totals(16):
        cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(budget_params=int(budget)))
        assert 0.99 * budget <= plan_dimensions(cfg, spec, counts).serve_params() <= budget, budget
    # Three equal tables: (16, 8, 4) is 2,800,192 with its projections; (12, 12, 4), which a bucket
    # merged it with, 2,800,448.
    equal = DatasetSpec("three", [], [SparseFeature(f"C{i}", 100_000) for i in range(3)])
    ones = {f.name: np.ones(100_000, dtype=np.int64) for f in equal.sparse}
    cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(mode="across", budget_params=2_800_192))
    plan = plan_dimensions(cfg, equal, ones)
    assert plan.serve_params() == 2_800_192
    assert [b.dim for t in plan.tables for b in t.blocks] == [16, 8, 4]


def test_across_tables_weighs_each_table_by_its_total_without_reading_its_counts(tmp_path):
    # Each table's counts were read (and kept) to be summed: 8 bytes an id, ~208 GB for 26 tables
    # of 1e9 rows, where the profile already holds each total.
    from embshard.config import MdeConfig
    from embshard.datasets.profile import load_profile
    from embshard.datasets.schema import DatasetSpec
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "d", rows=2000, seed=0, max_cardinality=300)
    spec, profile = DatasetSpec.load(tmp_path / "d"), load_profile(tmp_path / "d")
    cfg = EmbeddingsConfig(policy="mde", dim=16, mde=MdeConfig(mode="across", alpha=0.3))
    planned = plan_dimensions(cfg, spec, profile.lazy_counts({f: f for f in spec.sparse_names}))
    assert profile._counts == {}  # not one count file read
    read = plan_dimensions(cfg, spec, {f: profile.counts(f) for f in spec.sparse_names})
    assert planned.tables == read.tables and len({b.dim for t in planned.tables for b in t.blocks}) > 1
