"""The planner's per-rank bytes match what DistributedModelParallel really allocates."""

from __future__ import annotations

import json

import pytest
import torch
from distributed import run_ranks

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    PepConfig,
)
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.planner.pipeline import PlanBundle, make_plan
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import build_sharded
from embshard.trainer.held_memory import held_bytes, held_dense_bytes
from embshard.trainer.method import get_method

pytestmark = pytest.mark.slow


def _held_bytes(rank: int, world: int, cfg: JobConfig, method: str | None = None) -> dict[str, int]:
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    return held_bytes(build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"),
                                    method=get_method(method) if method else None))


@pytest.mark.parametrize(
    "embeddings",
    [
        EmbeddingsConfig(policy="uniform", dim=16),
        EmbeddingsConfig(policy="mde", dim=16, mlet=MletConfig(ratio=2),
                         mde=MdeConfig(alpha=0.4, mode="within", blocks=3)),
    ],
    ids=["uniform", "mde-within-mlet"],
)
def test_planned_bytes_match_dmp(tmp_path, embeddings):
    data = tmp_path / "data"
    synthesize(data, rows=4000, seed=1, max_cardinality=3000)
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(data), batch_size=256),
                    embeddings=embeddings)
    bundle = make_plan(cfg.embeddings, data, TopologySpec(2, "cpu"), cfg.plan_dir,
                       batch_size=256, optimizer=cfg.train.sparse_optimizer)
    bundle.save()
    held = run_ranks(_held_bytes, 2, cfg)
    for rank, actual in enumerate(held):
        planned = bundle.memory.per_rank[rank]["train_bytes"]
        measured = actual["train_bytes"]
        assert measured > 0
        assert abs(planned - measured) <= 0.05 * measured, (rank, planned, actual)


def test_per_feature_width_plan_bytes_match_dmp(tmp_path):
    """An arch that takes each feature at its own width (dlrm_dcn): the plan records it, the
    module drops the projections between tables, and the report counts only those that remain."""
    data = tmp_path / "data"
    synthesize(data, rows=4000, seed=1, max_cardinality=3000)
    embeddings = EmbeddingsConfig(policy="mde", dim=16, mlet=MletConfig(ratio=2),
                                  mde=MdeConfig(alpha=0.4, mode="within", blocks=3))
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(data), batch_size=256),
                    embeddings=embeddings, cluster=ClusterConfig(workers=2),
                    model=ModelConfig(arch="dlrm_dcn", options={"dcn_low_rank_dim": 8}))
    bundle = plan_for_training(cfg)
    assert PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer).dimension_plan.uniform_width is False
    uniform = make_plan(embeddings, data, TopologySpec(2, "cpu"), tmp_path / "uniform",
                        batch_size=256, optimizer=cfg.train.sparse_optimizer)
    assert bundle.memory.projection_bytes < uniform.memory.projection_bytes
    held = run_ranks(_held_bytes, 2, cfg)
    for rank, actual in enumerate(held):
        planned = bundle.memory.per_rank[rank]["train_bytes"]
        measured = actual["weights"] + actual["optimizer"] + actual["projections"]
        assert measured > 0
        assert abs(planned - measured) <= 0.05 * measured, (rank, planned, actual)
        assert actual["projections"] == bundle.memory.projection_bytes  # dense: exact


@pytest.mark.parametrize("pooled_lookup", [True, False], ids=["pooled", "unpooled"])
def test_pep_prune_plan_bytes_match_dmp(tmp_path, pooled_lookup):
    """A feature-dimension prune run trains rows of [V | s], twice the base dim: plan.json says so,
    and its memory report matches what DMP allocates (through the EmbeddingCollection too)."""
    data = tmp_path / "data"
    synthesize(data, rows=4000, seed=1, max_cardinality=3000)
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(data), batch_size=256),
                    embeddings=EmbeddingsConfig(dim=16), cluster=ClusterConfig(workers=2),
                    pep=PepConfig(granularity="feature_dimension", pooled_lookup=pooled_lookup, weight_decay=0.0))
    bundle = plan_for_training(cfg, "pep")
    saved = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    assert {b.train_dim for t in saved.dimension_plan.tables for b in t.blocks} == {32}
    assert all(t.pooled == pooled_lookup for t in saved.dimension_plan.tables)
    held = run_ranks(_held_bytes, 2, cfg, "pep")
    for rank, actual in enumerate(held):
        planned = bundle.memory.per_rank[rank]["train_bytes"]
        measured = actual["train_bytes"]
        assert measured > 0
        assert abs(planned - measured) <= 0.05 * measured, (rank, planned, actual)


@pytest.mark.parametrize("arch, embeddings", [
    ("dlrm", EmbeddingsConfig(dim=16)),
    ("fm", EmbeddingsConfig(dim=16)),
    ("dlrm", EmbeddingsConfig(policy="mde", dim=16, mlet=MletConfig(ratio=2),
                              mde=MdeConfig(alpha=0.4, mode="within", blocks=3))),
    ("dlrm", EmbeddingsConfig(dim=32, method="autodim")),
], ids=["dlrm", "fm", "dlrm-mde-mlet", "autodim-search-separate-zero-pad"])
def test_dense_layers_the_plan_counts_are_those_dmp_holds(tmp_path, arch, embeddings):
    """A dense_arch no rank could hold was a worker's "crashed: can't allocate"; the plan now
    counts the model's layers outside its tables (on the meta device). fm's per-id linear terms
    are such layers: replicated on every rank, as large as a width-1 table per feature. MDE's
    projections and MLET's W2 are too: the plan counted their weights alone, where the dense
    optimizer gives each a gradient and two moments (a plan at 81% of a rank needed 176%).
    AutoDim's search unifies its candidates' widths itself (zero padding here: no transforms at
    all); the report counted a projection per narrower candidate table, which no rank holds."""
    data = tmp_path / "data"
    synthesize(data, rows=4000, seed=1, max_cardinality=3000)
    search = AutodimConfig(lookup="separate", unify="zero_pad") if embeddings.method == "autodim" else None
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=str(data), batch_size=256),
                    embeddings=embeddings, cluster=ClusterConfig(workers=2), autodim=search,
                    model=ModelConfig(arch=arch, dense_arch=[64, 16], over_arch=[32, 1]))
    bundle = plan_for_training(cfg)
    assert json.loads((cfg.plan_dir / "plan.json").read_text())["memory"]["dense_bytes"] == bundle.memory.dense_bytes
    for actual in run_ranks(_dense_bytes_after_a_step, 2, cfg):
        assert actual["weights"] > 0 and actual["gradients"] == actual["weights"]
        # The projections' weights are in each rank's train bytes, the rest of them in dense_bytes.
        assert actual["weights"] + actual["gradients"] + actual["optimizer"] + actual["buffers"] == \
            bundle.memory.dense_bytes + bundle.memory.projection_bytes, actual
    assert (bundle.memory.projection_bytes > 0) == (embeddings.policy == "mde")


def _dense_bytes_after_a_step(rank: int, world: int, cfg: JobConfig) -> dict[str, int]:
    from embshard.trainer.loop import make_reader, train_step

    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    train_step(sharded, next(iter(make_reader(cfg, bundle, "train", rank, world))))
    return held_dense_bytes(sharded)
