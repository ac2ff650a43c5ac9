"""Fault tolerance on Ray: a worker process dies mid-epoch and the job finishes from its last
checkpoint as if nothing happened; a 2-worker checkpoint resumes on 1 worker (resharded)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth, ray_with_crash
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from embshard.cluster.launch import (
    plan_for_training,
    plan_from_checkpoint,
    train_on_ray,
)
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    JobConfig,
    TrainConfig,
)
from embshard.trainer.build import build_sharded, build_unsharded
from embshard.trainer.checkpoint import CheckpointManager
from embshard.trainer.faults import MARKER
from embshard.trainer.loop import make_reader, run_worker

pytestmark = pytest.mark.slow
CRASH_STEP = 10  # rank 1 dies after step 10; the last checkpoint before it is step 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=20000, max_cardinality=5000)


@pytest.fixture(scope="module")
def ray_session():
    with ray_with_crash(1, CRASH_STEP):
        yield


def job(dataset: Path, out: Path, workers: int = 2) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=512, eval_batch_size=2048, prefetch=2),
        train=TrainConfig(progress=False),
        cluster=ClusterConfig(workers=workers, max_failures=1),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )


def train(cfg: JobConfig) -> dict:
    plan_for_training(cfg)
    return train_on_ray(cfg)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory, ray_session) -> tuple[JobConfig, dict]:
    cfg = job(dataset, tmp_path_factory.mktemp("straight"))
    (Path(cfg.output_dir) / MARKER).write_text("never crash this run\n")
    return cfg, train(cfg)


def test_worker_death_resumes_from_checkpoint(dataset, tmp_path, uninterrupted):
    _, straight = uninterrupted
    cfg = job(dataset, tmp_path)
    crashed = train(cfg)
    assert (tmp_path / MARKER).is_file()  # rank 1 really died
    assert crashed["restarts"] == 1 and straight["restarts"] == 0
    assert crashed["resumed_from"].endswith("step-000008")
    assert crashed["steps"] == straight["steps"] == 15  # none twice, none skipped
    assert crashed["samples"] == straight["samples"]
    assert crashed["valid_logloss"] == pytest.approx(straight["valid_logloss"], rel=1e-4)
    assert crashed["valid_auc"] == pytest.approx(straight["valid_auc"], abs=1e-4)



def test_a_resume_with_another_batch_size_trains_the_rest_of_every_epoch(dataset, tmp_path, uninterrupted):
    # Steps are numbered in batches of the run that saved them; compared with a total in this
    # run's batches, a resume with fewer, larger batches per epoch once skipped the rest of the
    # data (here: 2 steps of the 8 left, the second epoch all but dropped), with exit 0.
    two, straight = uninterrupted
    source = Path(straight["checkpoint"]).parent / "step-000012"
    cfg = replace(job(dataset, tmp_path), data=replace(two.data, batch_size=1024),
                  train=replace(two.train, epochs=2), checkpoint=replace(two.checkpoint, resume=str(source)))
    resumed = train(cfg)
    assert resumed["resumed_from"].endswith("step-000012")
    # 16,000 train rows: 7 batches of 2 x 1,024 an epoch. The checkpoint stood at 12 batches of
    # 2 x 512, 6 of these: 1 left in the first epoch, 7 in the second, numbered on from 12.
    assert resumed["steps"] == 12 + 1 + 7
    assert resumed["samples"] == 12 * 2 * 512 + 8 * 2 * 1024


def test_a_resume_on_another_world_in_the_middle_of_an_epoch_says_it_is_not_the_rest(dataset, tmp_path, uninterrupted,
                                                                                    process_group, capsys):
    # Each rank reads a contiguous share of the epoch: resumed on 1 rank from 2 ranks' step 12 of
    # 15, half the rows trained after it had been trained already, and the README said "the rest".
    two, straight = uninterrupted
    source = Path(straight["checkpoint"]).parent / "step-000012"
    one = replace(job(dataset, tmp_path, workers=1), train=replace(two.train, max_steps=13),
                  checkpoint=replace(two.checkpoint, resume=str(source)))
    plan_for_training(one)
    run_worker(one)
    assert ("note: the checkpoint was saved in the middle of epoch 0 by a world of 2 ranks, and this one has 1: the "
            "rest of the epoch trains as many rows as were left, not the same ones") in capsys.readouterr().out


def test_two_worker_checkpoint_resumes_on_one(dataset, tmp_path, uninterrupted, process_group):
    two, straight = uninterrupted
    source = Path(straight["checkpoint"])
    one = replace(job(dataset, tmp_path, workers=1), checkpoint=replace(two.checkpoint, resume=str(source)))
    bundle = plan_from_checkpoint(one, source)
    assert bundle.shard_plan.topology.world_size == 1
    reader = make_reader(one, bundle, "valid", 0, 1)
    sharded = build_sharded(one, bundle, reader.spec, torch.device("cpu"))
    progress = CheckpointManager(one.checkpoint_dir).load(source, sharded.model, sharded.optimizer)
    assert progress.step == 15 and progress.world_size == 2
    # Reference: the same checkpoint read whole, without any process group, into a plain model.
    full = tmp_path / "full.pt"
    dcp_to_torch_save(source, full)
    reference = build_unsharded(one, bundle, reader.spec, torch.device("cpu"))
    reference.load_state_dict(torch.load(full, weights_only=False)["model"])
    batch = next(iter(reader))
    with torch.no_grad():
        torch.testing.assert_close(sharded.model(batch)[1], reference(batch)[1])
