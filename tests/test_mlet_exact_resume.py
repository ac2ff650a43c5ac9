"""MLET `exact_resume`: checkpoints keep W1 as labelled training state beside the collapsed
tables, a resumed run equals an uninterrupted one bit for bit, and the serving export never holds
the training state. One process (a world-size-1 gloo group), like test_checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth
from test_checkpoint import dcp_metadata, job

from embshard.cluster.launch import plan_for_training
from embshard.config import EmbeddingsConfig, JobConfig, MletConfig
from embshard.datasets.schema import DatasetSpec
from embshard.planner.pipeline import PlanBundle
from embshard.sharding.mlet import TRAINING_STATE_PREFIX
from embshard.trainer.build import build_sharded
from embshard.trainer.export import MANIFEST, export_serving, load_serving
from embshard.trainer.loop import checkpoint_manager, make_reader, run_worker

pytestmark = pytest.mark.usefixtures("process_group")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=6000, max_cardinality=2000)

DIM, WIDTH = 8, 32


def mlet_job(dataset: Path, out: Path, steps: int) -> JobConfig:
    mlet = MletConfig(width=WIDTH, exact_resume=True)
    return job(dataset, out, EmbeddingsConfig(dim=DIM, mlet=mlet), max_steps=steps)


def logits_from(cfg: JobConfig, checkpoint: Path) -> torch.Tensor:
    """A fresh MLET model loaded from `checkpoint` through the run's own hooks, on a fixed batch."""
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    batch = next(iter(make_reader(cfg, bundle, "valid", 0, 1)))
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    checkpoint_manager(cfg, sharded, None).load_latest(sharded.model, sharded.optimizer, [checkpoint])
    with torch.no_grad():
        return sharded.model(batch)[1]


def test_exact_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    cfg = mlet_job(dataset, tmp_path / "a", steps=4)
    first = Path(run_worker(cfg)["checkpoint"])
    shapes = {k: tuple(v.size) for k, v in dcp_metadata(first).items() if hasattr(v, "size")}
    kept = {k.removeprefix(TRAINING_STATE_PREFIX): s for k, s in shapes.items()
            if k.startswith(TRAINING_STATE_PREFIX)}
    # W1 (n x k) under the training-state label; the tables' own keys still hold W (n x d).
    assert kept and all(s[1] == WIDTH and shapes[k] == (s[0], DIM) for k, s in kept.items())

    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=8)))
    assert resumed["resumed_from"] == str(first) and resumed["steps"] == 8
    straight_cfg = mlet_job(dataset, tmp_path / "b", steps=8)
    straight = run_worker(straight_cfg)
    assert resumed["last_loss"] == straight["last_loss"]
    assert resumed["valid_logloss"] == straight["valid_logloss"]
    assert torch.equal(logits_from(cfg, Path(resumed["checkpoint"])),
                       logits_from(straight_cfg, Path(straight["checkpoint"])))


def test_export_never_holds_training_state(dataset, tmp_path):
    cfg = mlet_job(dataset, tmp_path, steps=4)
    checkpoint = Path(run_worker(cfg)["checkpoint"])
    assert any(k.startswith(TRAINING_STATE_PREFIX) for k in dcp_metadata(checkpoint))
    out = export_serving(checkpoint, tmp_path / "serving")
    assert (out / MANIFEST).is_file()
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert not any(TRAINING_STATE_PREFIX in k for k in weights)
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    batch = next(iter(make_reader(cfg, bundle, "valid", 0, 1)))
    with torch.no_grad():
        served = load_serving(out)(batch.dense, batch.sparse)
    torch.testing.assert_close(served, logits_from(cfg, checkpoint), rtol=1e-5, atol=1e-5)


def test_turning_exact_resume_on_still_loads_a_checkpoint_without_w1(dataset, tmp_path):
    plain = job(dataset, tmp_path, EmbeddingsConfig(dim=DIM, mlet=MletConfig(width=WIDTH)), max_steps=4)
    first = Path(run_worker(plain)["checkpoint"])
    assert not any(k.startswith(TRAINING_STATE_PREFIX) for k in dcp_metadata(first))
    exact = replace(plain, embeddings=EmbeddingsConfig(dim=DIM, mlet=MletConfig(width=WIDTH, exact_resume=True)),
                    train=replace(plain.train, max_steps=6))
    # The driver compares the config too: exact_resume changes no tensor the checkpoint must hold
    # (it refused this resume as "trained with another model config", and so did the workers).
    plan_for_training(exact)
    resumed = run_worker(exact)  # W1 rebuilt from W . W2+ rather than restored
    assert resumed["resumed_from"] == str(first) and resumed["steps"] == 6
    # ...and with W1 rebuilt, the model still computes what the collapsed checkpoint holds.
    torch.testing.assert_close(logits_from(exact, first), logits_from(plain, first))
