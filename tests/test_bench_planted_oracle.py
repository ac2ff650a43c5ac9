"""bench/planted_oracle.py writes the planted answer as a decisions file the planner takes as it is:
the planted blocks' rows in train frequency order, each `scale` x its planted rank wide."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import bench_module

from embshard.config import EmbeddingsConfig, JobConfig
from embshard.datasets.planted import synthesize_planted
from embshard.datasets.profile import load_profile
from embshard.planner.policies import plan_dimensions
from embshard.planner.remap import load_remap
from embshard.planner.types import table_name

BASE = 16


@pytest.fixture(scope="module")
def oracle():
    return bench_module("planted_oracle")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("planted") / "data"
    return out, synthesize_planted(out, rows=3000, seed=0, max_cardinality=60, rank_range=(2, 12))


@pytest.mark.parametrize("scale", [1, 2])
def test_the_plan_has_the_planted_blocks_at_scale(oracle, planted, tmp_path: Path, scale: int) -> None:
    data, spec = planted
    path = oracle.planted_decisions(data, BASE, scale, tmp_path / "oracle")
    emb = EmbeddingsConfig(dim=BASE, min_dim=1, rounding="none", policy="decisions", decisions=str(path))
    plan = plan_dimensions(emb, spec, None, tmp_path / "plan")
    counts = load_profile(data)
    for table in plan.tables:
        (feature,) = table.features
        blocks = spec.planted["ranks"][feature]["blocks"]
        assert [(b.start, b.end) for b in table.blocks] == [(b["start"], b["end"]) for b in blocks]
        assert [b.dim for b in table.blocks] == [min(BASE, scale * b["rank"]) for b in blocks]
        # The block of popular rows holds the most-counted ids: the order MDE ranks rows in.
        ranks = load_remap(tmp_path / "plan" / table.remap, table.num_embeddings)
        c = counts.counts(feature)
        assert c[ranks < blocks[0]["end"]].min() >= c[ranks >= blocks[0]["end"]].max()
        assert table.name == table_name(feature)
    assert len(plan.tables) == len(spec.sparse)


def test_planted_params_counts_the_blocks_and_their_maps(oracle, planted, tmp_path: Path) -> None:
    data, spec = planted
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=BASE))
    by_hand = sum(
        (b["end"] - b["start"]) * min(BASE, b["rank"]) + (min(BASE, b["rank"]) * BASE if b["rank"] < BASE else 0)
        for t in spec.planted["ranks"].values() for b in t["blocks"]
    )
    assert oracle.planted_params(cfg, data, tmp_path) == by_hand


def test_uniform_widths_option(oracle) -> None:
    assert oracle._uniform_widths("auto") is None  # chosen per seed from the planted plans
    assert oracle._uniform_widths("none") == []
    assert oracle._uniform_widths("8,16") == [8, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, none or comma-separated widths"):
        oracle._uniform_widths("8,a")
