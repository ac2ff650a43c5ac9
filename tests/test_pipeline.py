"""Training through TorchRec's TrainPipelineSparseDist (`train.pipeline: sparse_dist`): every
method's modules are pipelined and train exactly as the unpipelined loop does; evaluation mid-flight
runs on the model's own forwards; a model TorchRec cannot trace trains unpipelined with one note;
checkpoints save the reader position of the batches trained, not of those fetched ahead. One
process (a world-size-1 gloo group), like test_checkpoint."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth
from distributed import run_ranks
from movielens_fixture import write_ml1m_like
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    PepConfig,
    TrainConfig,
)
from embshard.datasets.convert import convert
from embshard.datasets.reader import Batch
from embshard.datasets.schema import DatasetSpec
from embshard.planner.pipeline import PlanBundle
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.sharding.planned_embedding import PlannedEmbeddingBags
from embshard.trainer.build import ShardedModel, build_sharded
from embshard.trainer.checkpoint import CheckpointManager, complete_checkpoints
from embshard.trainer.evaluate import evaluate_pointwise
from embshard.trainer.loop import make_reader, run_worker
from embshard.trainer.method import EmbeddingMethod, get_method, method_name
from embshard.trainer.pipeline import TrainSteps

pytestmark = pytest.mark.usefixtures("process_group")

STEPS = 6
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=4000, max_cardinality=2000)


# name -> (method, embeddings, extra config sections)
CASES: dict[str, tuple[str | None, EmbeddingsConfig, dict]] = {
    "uniform": (None, EmbeddingsConfig(dim=8), {}),
    "mde_within": (None, EmbeddingsConfig(dim=8, policy="mde", mde=MdeConfig(mode="within", blocks=3)), {}),
    "mde_across": (None, EmbeddingsConfig(dim=8, policy="mde"), {}),
    "mlet": (None, EmbeddingsConfig(dim=8, mlet=MletConfig(width=16)), {}),
    "pep_pooled": ("pep", EmbeddingsConfig(dim=8), {"pep": PepConfig(pooled_lookup=True)}),
    "pep_unpooled": ("pep", EmbeddingsConfig(dim=8), {"pep": PepConfig(pooled_lookup=False)}),
    "autodim_single_level": ("autodim", EmbeddingsConfig(dim=8),
                             {"autodim": AutodimConfig(candidates=[2, 4, 8], single_level=True)}),
    "autodim_separate": ("autodim", EmbeddingsConfig(dim=8),
                         {"autodim": AutodimConfig(candidates=[2, 4, 8], single_level=True, lookup="separate")}),
}


def job(dataset: Path, out: Path, embeddings: EmbeddingsConfig, **sections) -> JobConfig:
    model = sections.pop("model", ModelConfig(dense_arch=[16], over_arch=[16]))
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=512, prefetch=1),
        model=model,
        embeddings=embeddings,
        train=TrainConfig(progress=False, pipeline="sparse_dist"),
        checkpoint=CheckpointConfig(enabled=False),
        cluster=ClusterConfig(workers=1),
        **sections,
    )


def build(cfg: JobConfig, method: str | None) -> ShardedModel:
    bundle = plan_for_training(cfg, method)
    return build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), CPU,
                         method=get_method(method or method_name(cfg)))


def batches(cfg: JobConfig, split: str = "train", n: int = STEPS) -> list[Batch]:
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    return list(islice(iter(make_reader(cfg, bundle, split, 0, 1)), n))


def steps_of(kind: str, cfg: JobConfig, method: str | None, notes: list[str]) -> TrainSteps:
    sharded = build(cfg, method)
    return TrainSteps(kind, sharded.model, sharded.optimizer, CPU, notes.append)


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_steps_equal_unpipelined(dataset, tmp_path, case):
    method, embeddings, sections = CASES[case]
    cfg = job(dataset, tmp_path, embeddings, **sections)
    notes: list[str] = []
    plain = steps_of("none", cfg, method, notes)
    piped = steps_of("sparse_dist", cfg, method, notes)
    data = batches(cfg)
    expected = [s.loss.item() for s in plain.run(iter(data))]
    got = [(s.loss.item(), s.rows) for s in piped.run(iter(data))]
    assert [rows for _, rows in got] == [b.labels.numel() for b in data]
    assert [loss for loss, _ in got] == expected
    # No note: every collection was pipelined (the trace found its input in the batch).
    assert notes == []


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ml")
    convert("movielens", write_ml1m_like(tmp / "raw"), tmp / "data", min_count=1)
    return tmp / "data"


# Every built-in arch over mixed widths (MDE within tables, MLET): their towers, cross nets and key
# reorders must leave the collection's input where TorchRec's trace finds it.
ARCHS = {
    "dlrm_dcn": ModelConfig(arch="dlrm_dcn", dense_arch=[16], over_arch=[16], options={"dcn_low_rank_dim": 8}),
    "two_tower": ModelConfig(arch="two_tower", options={"hidden": [16], "out_dim": 8, "k": [5]}),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_pipelined_equals_unpipelined(dataset, movielens, tmp_path, arch):
    embeddings = EmbeddingsConfig(dim=8, policy="mde", mde=MdeConfig(mode="within", blocks=2),
                                  mlet=MletConfig(width=16))
    cfg = job(movielens if arch == "two_tower" else dataset, tmp_path, embeddings, model=ARCHS[arch])
    notes: list[str] = []
    plain = steps_of("none", cfg, None, notes)
    piped = steps_of("sparse_dist", cfg, None, notes)
    data = batches(cfg)
    expected = [s.loss.item() for s in plain.run(iter(data))]
    assert [s.loss.item() for s in piped.run(iter(data))] == expected
    assert notes == []


def test_evaluation_mid_flight_sees_the_trained_model_and_training_continues_exactly(dataset, tmp_path):
    method, embeddings, sections = CASES["mde_within"]
    cfg = job(dataset, tmp_path, embeddings, **sections)
    plain = steps_of("none", cfg, method, [])
    piped = steps_of("sparse_dist", cfg, method, [])
    data = batches(cfg)
    valid = make_reader(cfg, PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer), "valid", 0, 1)

    def losses_and_eval(steps: TrainSteps) -> tuple[list[float], float]:
        run = steps.run(iter(data))
        losses = [next(run).loss.item() for _ in range(3)]
        # The pipeline now holds batches 4 and 5, batch 4's ids already distributed.
        with steps.paused() as model:
            result = evaluate_pointwise(model, valid, CPU, max_batches=2)
        return losses + [s.loss.item() for s in run], result.metrics

    assert losses_and_eval(piped) == losses_and_eval(plain)


class BranchingBags(PlannedEmbeddingBags):
    """A user's embedding module that branches on its input's values: FX cannot trace it."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.values().numel() == 0:
            raise ValueError("an empty batch")
        return super().forward(features)


class Branching(EmbeddingMethod):
    def embeddings(self, cfg: JobConfig, plan: DimensionPlan, spec: DatasetSpec,
                   device: torch.device) -> EmbeddingModule:
        return BranchingBags(plan, device=device)


def test_a_model_torchrec_cannot_trace_trains_unpipelined_with_one_note(dataset, tmp_path):
    cfg = job(dataset, tmp_path, EmbeddingsConfig(dim=8))
    plain = steps_of("none", cfg, None, [])  # plans the run
    data = batches(cfg)
    expected = [s.loss.item() for s in plain.run(iter(data))]
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), CPU, method=Branching())
    notes: list[str] = []
    steps = TrainSteps("sparse_dist", sharded.model, sharded.optimizer, CPU, notes.append)
    assert [s.loss.item() for s in steps.run(iter(data))] == expected
    assert len(notes) == 1 and notes[0].startswith("train.pipeline sparse_dist: training unpipelined")


def test_bilevel_autodim_trains_unpipelined_and_says_why(dataset, tmp_path, capsys):
    cfg = job(dataset, tmp_path, EmbeddingsConfig(dim=8), autodim=AutodimConfig(candidates=[2, 4, 8], alpha_every=2))
    cfg = replace(cfg, train=replace(cfg.train, max_steps=3))
    plan_for_training(cfg, "autodim")
    summary = run_worker(cfg, method="autodim")
    assert summary["steps"] == 3
    out = capsys.readouterr().out
    assert out.count("train.pipeline sparse_dist: training unpipelined: AutoDim's architecture steps") == 1


def test_checkpoints_save_the_position_of_batches_trained_not_fetched(dataset, tmp_path):
    cfg = job(dataset, tmp_path, EmbeddingsConfig(dim=8))
    cfg = replace(cfg, train=replace(cfg.train, max_steps=5, eval_every=2),
                  checkpoint=CheckpointConfig(every_steps=2, keep=5))
    plan_for_training(cfg)
    assert run_worker(cfg)["steps"] == 5
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    positions = {}
    for folder in complete_checkpoints(cfg.checkpoint_dir):
        sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), CPU)
        _, progress = CheckpointManager(cfg.checkpoint_dir).load_latest(sharded.model, sharded.optimizer, [folder])
        positions[progress.step] = progress.reader
    # When step 2 and 4 were saved the pipeline had fetched two batches more.
    assert positions == {s: {"epoch": 0, "batches": s} for s in (2, 4, 5)}


def test_the_test_split_after_a_pipelined_run_sees_the_model_not_the_pipeline(dataset, tmp_path):
    """`train.test` evaluates after the last step, while the pipeline still holds the rewritten
    collections: it must see the same model the unpipelined loop trained."""
    summaries = {}
    for kind in ("none", "sparse_dist"):
        cfg = job(dataset, tmp_path / kind, EmbeddingsConfig(dim=8))
        cfg = replace(cfg, train=replace(cfg.train, pipeline=kind, max_steps=4, test=True))
        plan_for_training(cfg)
        summaries[kind] = run_worker(cfg)
    assert summaries["sparse_dist"]["test_auc"] == summaries["none"]["test_auc"]
    assert summaries["sparse_dist"]["test_examples"] == summaries["none"]["test_examples"] > 0


def _train(rank: int, world: int, cfg: JobConfig) -> dict:
    summary = run_worker(cfg)
    return {k: summary[k] for k in ("steps", "samples", "first_loss", "last_loss", "valid_auc", "valid_logloss")}


@pytest.mark.slow
def test_two_ranks_pipelined_with_evaluations_mid_flight_equal_unpipelined(dataset, tmp_path):
    # Two ranks: the input dist really moves ids between ranks, and every evaluation pauses the
    # pipeline with the next batch's ids already distributed.
    method, embeddings, sections = CASES["mde_within"]
    summaries = {}
    for kind in ("sparse_dist", "none"):
        cfg = job(dataset, tmp_path / kind, embeddings, **sections)
        cfg = replace(cfg, cluster=ClusterConfig(workers=2),
                      train=replace(cfg.train, pipeline=kind, max_steps=6, eval_every=2, eval_max_batches=2))
        plan_for_training(cfg, method)
        summaries[kind] = run_ranks(_train, 2, cfg)
    assert summaries["sparse_dist"] == summaries["none"]
    assert summaries["none"][0]["steps"] == 6 and summaries["none"][0]["last_loss"] is not None
