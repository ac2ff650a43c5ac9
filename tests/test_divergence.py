"""A loss or output that turns NaN ends the run with one line before anything of it is kept: it
exited 0 with `logloss nan`, an AUC of 0.47 computed on NaN scores, and NaN weights saved as the
newest checkpoint (the one a rerun resumes from)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import profiled_synth
from distributed import run_ranks
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.schema import DatasetSpec
from embshard.errors import TrainingDiverged
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.checkpoint import complete_checkpoints
from embshard.trainer.loop import run_worker


class TurnsNan(nn.Module):
    """A linear model over the embeddings whose output turns NaN: in training from its
    `from_step`-th step on, or in evaluation only."""

    def __init__(self, embeddings: EmbeddingModule, num_dense: int, from_step: int | None,
                 only_rank: int | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.head = nn.Linear(sum(embeddings.feature_dims.values()) + num_dense, 1)
        self.from_step, self.steps, self.only_rank = from_step, 0, only_rank

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.head(torch.cat([dense, self.embeddings(sparse).values()], dim=1)).squeeze(-1)
        if self.training:
            self.steps += 1
        turned = self.steps >= self.from_step if self.from_step is not None else not self.training
        if self.only_rank is not None and dist.get_rank() != self.only_rank:
            turned = False
        return out * float("nan") if turned else out


def nan_from_step_3(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return TurnsNan(embeddings, len(spec.dense), from_step=3)


def nan_on_rank_1_from_step_3(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return TurnsNan(embeddings, len(spec.dense), from_step=3, only_rank=1)


def nan_from_step_1(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return TurnsNan(embeddings, len(spec.dense), from_step=1)


def nan_in_evaluation(embeddings: EmbeddingModule, spec: DatasetSpec, options: Mapping[str, Any]) -> nn.Module:
    return TurnsNan(embeddings, len(spec.dense), from_step=None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("diverge") / "data", rows=2000, max_cardinality=200, seed=3)


def job(dataset: Path, out: Path, builder: str) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=512, prefetch=1),
        model=ModelConfig(arch=f"test_divergence:{builder}"),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(progress=False, eval_max_batches=1, max_steps=6),
        checkpoint=CheckpointConfig(every_steps=1),
    )


def test_a_loss_turned_nan_stops_before_its_checkpoint(dataset, tmp_path, process_group) -> None:
    cfg = job(dataset, tmp_path / "run", "nan_from_step_3")
    plan_for_training(cfg)
    with pytest.raises(TrainingDiverged, match=r"^training diverged: the loss became NaN or infinite between "
                                               r"step 2 and step 3, found before a checkpoint; nothing of it was "
                                               r"checkpointed \(lower train.dense_lr or train.sparse_lr; if it recurs "
                                               r"at lower rates, look in the model for a log, division or exp"):
        run_worker(cfg)
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-000002", "step-000001"]
    # Found at a logging step too, where no checkpoint is due.
    cfg = replace(cfg, output_dir=str(tmp_path / "logged"), checkpoint=CheckpointConfig(enabled=False),
                  train=replace(cfg.train, log_every=4))
    plan_for_training(cfg)
    with pytest.raises(TrainingDiverged, match=r"between step 1 and step 4, found before the loss was logged"):
        run_worker(cfg)


def test_a_loss_nan_from_the_first_step_is_not_blamed_on_a_learning_rate(dataset, tmp_path, process_group) -> None:
    # "between step 0 and step 1 ... (lower train.dense_lr or train.sparse_lr)": no update had run.
    cfg = job(dataset, tmp_path / "run", "nan_from_step_1")
    plan_for_training(cfg)
    with pytest.raises(TrainingDiverged, match=r"^the loss of the first step is NaN or infinite, on the initial "
                                               r"weights: before any update, so no learning rate's doing"):
        run_worker(cfg)
    assert not complete_checkpoints(cfg.checkpoint_dir)


def test_nan_outputs_are_no_metric(dataset, tmp_path, process_group) -> None:
    cfg = job(dataset, tmp_path / "run", "nan_in_evaluation")
    plan_for_training(cfg)
    with pytest.raises(TrainingDiverged, match=r"^the model's outputs on the valid split hold 200 NaN or infinite "
                                               r"values of 200: no metric is computed on them$"):
        run_worker(cfg)


def _diverged_message(rank: int, world: int, cfg: JobConfig) -> str:
    try:
        run_worker(cfg)
    except TrainingDiverged as e:
        return str(e)
    return "trained on"


@pytest.mark.slow
def test_a_loss_turned_nan_on_one_rank_stops_every_rank_at_the_same_step(dataset, tmp_path) -> None:
    # The flag is all-reduced: rank 0, whose own loss is still finite at step 3, must not go on to
    # checkpoint the weights rank 1's NaN gradients reach, nor wait for it in a collective.
    cfg = replace(job(dataset, tmp_path / "run", "nan_on_rank_1_from_step_3"), cluster=ClusterConfig(workers=2))
    plan_for_training(cfg)
    messages = run_ranks(_diverged_message, 2, cfg)
    assert messages[0] == messages[1] and "between step 2 and step 3, found before a checkpoint" in messages[0]
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-000002", "step-000001"]
