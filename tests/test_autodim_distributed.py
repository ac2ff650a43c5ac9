"""AutoDim on 2 gloo ranks: the search runs sharded, ranks agree on alpha, and the decisions it
writes retrain through the ordinary decisions policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import profiled_synth
from distributed import run_ranks
from test_autodim import job as search_job
from test_autodim import plan_search

from embshard.config import EmbeddingsConfig, JobConfig
from embshard.planner.decisions import load_decisions
from embshard.planner.pipeline import PlanBundle, make_plan
from embshard.trainer.autodim import decisions_path
from embshard.trainer.loop import run_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("autodim2") / "data", rows=8000, max_cardinality=500, seed=1)


def job(dataset: Path, out: Path, **search) -> JobConfig:
    """test_autodim's job, with alpha steps early and often enough for a short distributed run."""
    cfg = search_job(dataset, out, alpha_every=2, pretrain_steps=2, alpha_lr=0.05, **search)
    cfg.train = replace(cfg.train, log_every=2)
    return cfg


def _search(rank: int, world: int, cfg: JobConfig) -> dict:
    return run_worker(cfg, method="autodim")


def _search_then_retrain(rank: int, world: int, cfg: JobConfig, retrain: JobConfig) -> tuple[dict, dict, dict]:
    """One spawn for both runs (process start-up dominates): search, plan the retrain from its
    decisions on rank 0 (the driver's job in `embshard train`), train it."""
    searched = run_worker(cfg, method="autodim")
    if rank == 0:
        make_plan(retrain.embeddings, retrain.data.path, retrain.sharding.topology(world), retrain.plan_dir,
                  batch_size=retrain.data.batch_size, optimizer=retrain.train.sparse_optimizer).save()
    dist.barrier()
    plan = PlanBundle.load(retrain.plan_dir, retrain.train.sparse_optimizer).dimension_plan
    widths = {t.features[0]: t.blocks[0].dim for t in plan.tables}
    return searched, run_worker(retrain), {"widths": widths, "notes": plan.notes}


def test_sharded_search_writes_decisions_that_retrain(dataset, tmp_path):
    cfg = job(dataset, tmp_path / "search")
    plan_search(cfg, 2)
    retrain = replace(
        cfg,
        output_dir=str(tmp_path / "retrain"),
        embeddings=EmbeddingsConfig(policy="decisions", dim=16, decisions=str(decisions_path(cfg))),
    )
    (first, trained, plan), (second, _, _) = run_ranks(_search_then_retrain, 2, cfg, retrain)
    assert first["alpha"] == second["alpha"]  # alpha is replicated: same averaged gradients
    assert first["dims"] == second["dims"]
    assert first["alpha_steps"] == (first["steps"] - 2 + 1) // 2
    decisions = load_decisions(first["decisions"])
    assert {f: t.dim for f, t in decisions.tables.items()} == first["dims"]
    assert decisions.meta["valid_auc"] == first["valid_auc"]  # the search's own AUC, recorded

    assert plan["widths"] == {f: max(d, 4) for f, d in first["dims"].items()}  # 2 is raised to 4 ...
    assert len(plan["notes"]) == sum(d == 2 for d in first["dims"].values())  # ... with a note each
    assert trained["valid_auc"] is not None and trained["steps"] > 0


def test_sharded_separate_single_level_search(dataset, tmp_path):
    cfg = job(dataset, tmp_path / "search", lookup="separate", single_level=True, unify="zero_pad")
    bundle = plan_search(cfg, 2)
    assert any("stored 4 wide" in n for n in bundle.dimension_plan.notes)
    first, second = run_ranks(_search, 2, cfg)
    assert first["alpha"] == second["alpha"]
    assert first["alpha_steps"] == first["steps"] - 2
