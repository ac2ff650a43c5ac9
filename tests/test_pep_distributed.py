"""PEP on two gloo ranks: the sharded non-zero count and masks equal one process's; the prune run
writes masks within their targets and decisions that plan smaller; both retrains run."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import profiled_synth
from distributed import run_ranks
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    PepConfig,
    ShardingConfig,
    TrainConfig,
)
from embshard.datasets.convert import convert
from embshard.datasets.schema import DatasetSpec
from embshard.planner.decisions import load_decisions
from embshard.planner.pipeline import PlanBundle, make_plan
from embshard.planner.policies import plan_dimensions
from embshard.planner.topology import TopologySpec
from embshard.sharding.pep import PepEmbeddings, local_shards
from embshard.trainer.build import build_sharded
from embshard.trainer.loop import make_reader, run_worker, train_step
from embshard.trainer.method import get_method
from embshard.trainer.pep import (
    MaskKeeper,
    PepPrune,
    gather_masks,
    load_masks,
    nonzero_counts,
    pep_module,
    save_target,
    start_from_ticket,
)

pytestmark = pytest.mark.slow
WORLD = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("pep") / "data", rows=3000, max_cardinality=300, seed=1)


# Shards of two kinds side by side: the unpooled collection's row-wise (CPU can) next to
# table-wise, and the pooled collection's column-wise (each column shard meets its own
# dimension-wise s) next to table-wise.
SPLIT_OF = {False: "row_wise", True: "column_wise"}


def _sharded_count(rank: int, world: int, data: str, granularity: str, s_init: float, pooled: bool):
    plan = plan_dimensions(EmbeddingsConfig(dim=8), DatasetSpec.load(data))
    module = PepEmbeddings(plan, granularity, s_init, multi_hot=(), pooled_lookup=pooled, device=torch.device("meta"))
    types = {t.name: [SPLIT_OF[pooled] if i % 2 else "table_wise"] for i, t in enumerate(plan.tables)}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={n: ParameterConstraints(sharding_types=v, min_partition=4) for n, v in types.items()},
    )
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    dmp = DistributedModelParallel(module, device=torch.device("cpu"),
                                   plan=planner.collective_plan(module, sharders), sharders=sharders)
    pep = dmp.module
    pep.initialise(seed=4)
    spread_table_thresholds(pep)
    split = sum(s.tensor.shape != (plan.table(s.table).num_embeddings, pep.width) for s in pep.local_shards())
    return nonzero_counts(pep), gather_masks(pep), split


def spread_table_thresholds(pep: PepEmbeddings) -> None:
    """Each table's own s, so that a shard meeting another table's (or column's) would count apart."""
    if pep.per_table:
        with torch.no_grad():
            pep.threshold.copy_(pep.threshold + torch.linspace(-1.0, 1.0, pep.threshold.numel()).view_as(pep.threshold))


@pytest.mark.parametrize(
    "granularity, pooled", [("feature_dimension", False), ("dimension", False), ("dimension", True),
                            ("field", False), ("field_dimension", True)]
)
def test_sharded_count_and_masks_equal_single_process(dataset, granularity, pooled):
    s_init = math.log(0.03 / 0.97)  # g = 0.03, about half of uniform(+-1/sqrt(300)) survives
    results = run_ranks(_sharded_count, WORLD, str(dataset), granularity, s_init, pooled)
    plan = plan_dimensions(EmbeddingsConfig(dim=8), DatasetSpec.load(dataset))
    single = PepEmbeddings(plan, granularity, s_init, multi_hot=())
    single.initialise(seed=4)
    spread_table_thresholds(single)
    counts = nonzero_counts(single)
    assert results[0][0] == results[1][0] == counts
    assert 0.2 < sum(counts.values()) / (sum(t.num_embeddings for t in plan.tables) * 8) < 0.8
    assert results[0][2] > 0 and results[1][1] is None  # split shards exist; masks only on rank 0
    whole = gather_masks(single)
    assert all(np.array_equal(results[0][1][t], whole[t]) for t in whole)


def _job(dataset: Path, out: Path) -> JobConfig:
    return JobConfig(
        seed=2,
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=512, prefetch=1),
        model=ModelConfig(dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=8),
        sharding=ShardingConfig(plan_file=str(out / "plan")),
        train=TrainConfig(max_steps=8, progress=False, log_every=4, eval_max_batches=1),
        pep=PepConfig(granularity="feature_dimension", s_init=math.log(0.02 / 0.98), weight_decay=0.0,
                      targets=[0.9, 0.6, 0.001], count_every=2, retrain_target=0.6, out=str(out / "pep"),
                      retrain_from=str(out / "pep")),
    )


def _plan(cfg: JobConfig, method: str) -> PlanBundle:
    """The driver's planning step for `method` on WORLD ranks, into cfg.plan_dir."""
    return plan_for_training(replace(cfg, sharding=replace(cfg.sharding, plan_file=None),
                                     cluster=replace(cfg.cluster, workers=WORLD)), method)


def _prune_and_retrain(rank: int, world: int, cfg: JobConfig, retrain: JobConfig):
    pruned = run_worker(cfg, method="pep")
    lottery = run_worker(retrain, method="pep_lottery")
    # The retrain's mask holds on every rank's shards through training.
    bundle = PlanBundle.load(retrain.plan_dir, cfg.train.sparse_optimizer)
    reader = make_reader(cfg, bundle, "train", rank, world)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"), method=get_method("uniform"))
    tables = {t.name: t.num_embeddings for t in bundle.dimension_plan.tables}
    masks = load_masks(cfg.pep_dir / "target-0.6", tables, 8)
    shards = local_shards(sharded.embeddings.get_submodule("ebc"))
    start_from_ticket(shards, masks, cfg.seed, tables)
    keeper = MaskKeeper(shards, masks)
    for batch in islice(reader, 3):
        train_step(sharded, batch)
        keeper.on_step(None)
    leaked = sum(int((s.tensor != 0)[~torch.from_numpy(
        masks[s.table][s.row_offset:s.row_offset + s.tensor.shape[0], s.col_offset:s.col_offset + s.tensor.shape[1]]
    )].sum()) for s in shards)
    return pruned, lottery, leaked


def test_prune_run_masks_decisions_and_retrains(dataset, tmp_path):
    cfg = _job(dataset, tmp_path / "run")
    _plan(cfg, "pep")  # the prune run's tables, thresholds in their rows
    retrain = replace(cfg, output_dir=str(tmp_path / "run" / "lottery"), sharding=ShardingConfig())
    make_plan(cfg.embeddings, dataset, TopologySpec(WORLD, "cpu"), retrain.plan_dir,
              batch_size=cfg.data.batch_size, optimizer=cfg.train.sparse_optimizer).save()
    results = run_ranks(_prune_and_retrain, WORLD, cfg, retrain)
    pruned, lottery, leaked = results[0]
    reached = pruned["pep"]["reached"]
    assert set(reached) == {"0.9", "0.6"} and pruned["pep"]["missed"] == [0.001]
    plan = plan_dimensions(EmbeddingsConfig(dim=8), DatasetSpec.load(dataset))
    dense = sum(t.num_embeddings for t in plan.tables) * 8
    for target in (0.9, 0.6):
        directory = cfg.pep_dir / f"target-{target:g}"
        kept = sum(int(np.load(directory / f"{t.name}.mask.npy").sum()) for t in plan.tables)
        assert kept <= target * dense and kept == reached[f"{target:g}"]["nonzero"]
        decided = load_decisions(directory / "decisions.json")
        assert decided.method == "pep" and decided.meta["target"] == target
    assert leaked == 0 and results[1][2] == 0
    assert lottery["steps"] > 0 and math.isfinite(lottery["valid_auc"])
    mixed_plan = make_plan(
        EmbeddingsConfig(dim=8, policy="decisions", decisions=str(cfg.pep_dir / "target-0.6" / "decisions.json")),
        dataset, TopologySpec(WORLD, "cpu"), tmp_path / "check", batch_size=128, optimizer="rowwise_adagrad",
    )
    assert mixed_plan.dimension_plan.serve_params() < plan.serve_params()


def _train_mixed(rank: int, world: int, cfg: JobConfig):
    return run_worker(cfg, method="decisions")


def test_pep_decisions_train_through_the_ordinary_loop(dataset, tmp_path):
    """Retrain (b): `embeddings.policy: decisions` on a PEP decisions file needs nothing new."""
    plan = plan_dimensions(EmbeddingsConfig(dim=8), DatasetSpec.load(dataset))
    rng = np.random.default_rng(0)
    masks = {t.name: rng.random((t.num_embeddings, 8)) < rng.random((t.num_embeddings, 1)) for t in plan.tables}
    decisions = save_target(masks, 8, tmp_path / "target-0.5", {"target": 0.5})
    base = _job(dataset, tmp_path / "mixed")
    cfg = replace(base, embeddings=EmbeddingsConfig(dim=8, policy="decisions", decisions=str(decisions)),
                  sharding=ShardingConfig(), checkpoint=replace(base.checkpoint, enabled=False))
    bundle = make_plan(cfg.embeddings, dataset, TopologySpec(WORLD, "cpu"), cfg.plan_dir,
                       batch_size=cfg.data.batch_size, optimizer=cfg.train.sparse_optimizer)
    bundle.save()
    assert not bundle.dimension_plan.is_uniform
    assert bundle.dimension_plan.serve_params() < plan.serve_params()
    trained = run_ranks(_train_mixed, WORLD, cfg)[0]
    assert trained["steps"] > 0 and math.isfinite(trained["valid_auc"])


def _multi_hot_steps(rank: int, world: int, cfg: JobConfig):
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    reader = make_reader(cfg, bundle, "train", rank, world)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"), method=PepPrune())
    pep = pep_module(sharded.model)
    losses = [float(train_step(sharded, batch)) for batch in islice(reader, 3)]
    return sorted(pep.pooled_tables), list(pep.unpooled_features), losses, nonzero_counts(pep)


def test_multi_hot_table_is_pruned_unpooled_beside_pooled_ones(tmp_path):
    """MovieLens' genres is multi-hot: its table goes through the EmbeddingCollection while the
    single-hot tables use the pooled one, both sharded by DMP in one model."""
    rng = np.random.default_rng(0)
    src = tmp_path / "ml-20m"
    src.mkdir()
    users, movies = rng.integers(1, 60, 1500), rng.integers(1, 40, 1500)
    ratings = [(u, m, rng.choice([1.0, 2.0, 4.0, 5.0]), 1000 + i)
               for i, (u, m) in enumerate(zip(users, movies, strict=True))]
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in ratings)
    )
    genres = ["Action", "Comedy", "Drama", "Romance", "Thriller"]
    (src / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f"{m},Movie {m} ({1990 + m % 7}),{'|'.join(rng.choice(genres, size=1 + m % 3, replace=False))}\n"
        for m in range(1, 40)))
    data = tmp_path / "data"
    convert("movielens", src, data)
    cfg = replace(_job(data, tmp_path / "run"),
                  pep=PepConfig(granularity="feature_dimension", s_init=-4.0, weight_decay=0.0))
    _plan(cfg, "pep")
    results = run_ranks(_multi_hot_steps, WORLD, cfg)
    pooled, unpooled, losses, counts = results[0]
    assert unpooled == ["genres"] and "t_genres" not in pooled and "t_userId" in pooled
    assert all(math.isfinite(x) for x in losses)
    assert results[1][3] == counts and 0 < sum(counts.values())
