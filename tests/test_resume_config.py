"""A resumed run must train what its config says: a config that differs from the checkpoint's in
what decides the model is refused with the keys named, or, when asked, the checkpoint's is used."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import profiled_synth

from embshard.cluster.cli import main
from embshard.cluster.launch import plan_for_training, with_checkpoint_config
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.errors import ConfigError
from embshard.trainer.checkpoint import CheckpointError
from embshard.trainer.checkpoint_integrity import MANIFEST, sha256_file
from embshard.trainer.loop import run_worker
from embshard.trainer.resume_config import config_differences, plan_differences
from embshard.typed_config import to_dict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=4000, max_cardinality=1000)


def job(dataset: Path, out: Path, dim: int = 8, **train) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        embeddings=EmbeddingsConfig(dim=dim),
        data=DataConfig(path=str(dataset), batch_size=256, eval_batch_size=1024, prefetch=2),
        train=TrainConfig(progress=False, **train),
        cluster=ClusterConfig(workers=1),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )


def test_differences_are_the_model_defining_keys_only():
    saved = to_dict(JobConfig(embeddings=EmbeddingsConfig(dim=8)))
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=16, policy="mde"), train=TrainConfig(sparse_lr=0.5, epochs=3))
    assert config_differences(saved, cfg) == [("embeddings.dim", 8, 16), ("embeddings.policy", "uniform", "mde")]
    assert config_differences(saved, replace(cfg, embeddings=EmbeddingsConfig(dim=8))) == []
    sgd = replace(cfg, embeddings=EmbeddingsConfig(dim=8), train=TrainConfig(sparse_optimizer="sgd"))
    assert config_differences(saved, sgd) == [("train.sparse_optimizer", "rowwise_adagrad", "sgd")]
    # The dense one's state is saved too: another was a worker's "Missing key in checkpoint state_dict".
    adagrad = replace(cfg, embeddings=EmbeddingsConfig(dim=8), train=TrainConfig(dense_optimizer="adagrad"))
    assert config_differences(saved, adagrad) == [("train.dense_optimizer", "adam", "adagrad")]
    # A section that was empty: its new keys, not also "model.options (checkpoint {}, config None)".
    hidden = replace(cfg, embeddings=EmbeddingsConfig(dim=8), model=ModelConfig(options={"hidden": 32}))
    assert config_differences(saved, hidden) == [("model.options.hidden", None, 32)]


def test_a_resume_keeps_the_order_its_reader_position_counts_batches_of():
    # Resumed mid-epoch with another seed, the reader's batch offset was carried into the new
    # seed's shuffle: 561 of the 1,024 rows trained after the resume had been trained already.
    saved = to_dict(JobConfig())
    assert config_differences(saved, JobConfig(seed=1)) == [("seed", 0, 1)]
    assert config_differences(saved, JobConfig(data=DataConfig(shuffle=False))) == [("data.shuffle", True, False)]
    assert config_differences(saved, JobConfig(data=DataConfig(batch_size=64))) == []  # counted in rows


def test_a_search_resumes_only_on_the_schedule_its_architecture_steps_were_counted_by():
    # Resumed with another pretrain_steps, a search held its alpha still until the new end of the
    # pre-train, and recorded 300 architecture steps where it had taken 423.
    from embshard.config import AutodimConfig
    from embshard.trainer.method import get_method

    search = JobConfig(embeddings=EmbeddingsConfig(dim=16), autodim=AutodimConfig(candidates=[4, 16]))
    saved, also = to_dict(search), get_method("autodim").resume_keys
    for key, value in (("pretrain_steps", 400), ("alpha_every", 3)):
        changed = replace(search, autodim=replace(search.autodim, **{key: value}))
        assert config_differences(saved, changed, also) == [(f"autodim.{key}", getattr(search.autodim, key), value)]
        # The retrain on its decisions, resumed once the section was edited for the next search.
        assert config_differences(saved, changed, get_method("uniform").resume_keys) == []
    assert config_differences(saved, replace(search, autodim=replace(search.autodim, alpha_lr=0.5)), also) == []


def test_a_relative_decisions_path_the_workers_recorded_absolute_resumes(tmp_path, monkeypatch):
    # The workers record every path absolute (`worker_config`), and the rerun of the same command
    # was refused: "trained with another model config: embeddings.decisions (checkpoint
    # /…/d.json, config d.json)". A file moved between runs is not another model either.
    from embshard.cluster.launch import worker_config

    monkeypatch.chdir(tmp_path)
    cfg = JobConfig(output_dir="run", embeddings=EmbeddingsConfig(policy="decisions", decisions="d.json"))
    assert config_differences(to_dict(worker_config(cfg)), cfg) == []
    moved = replace(cfg, embeddings=replace(cfg.embeddings, decisions="elsewhere/d.json"))
    assert config_differences(to_dict(worker_config(cfg)), moved) == []
    assert config_differences(to_dict(worker_config(cfg)), replace(cfg, embeddings=EmbeddingsConfig())) == [
        ("embeddings.policy", "decisions", "uniform")]


def test_a_plan_is_compared_on_the_keys_it_was_made_from_only():
    # All of the checkpoint's keys were compared: a plan file was refused for another MLP, MLET
    # init, a decisions path written relative instead of absolute, or MDE knobs under uniform.
    made = JobConfig(embeddings=EmbeddingsConfig(dim=8, policy="decisions", decisions="outputs/d.json",
                                                 mlet=MletConfig(width=16)))
    same_plan = replace(made, model=ModelConfig(dense_arch=[16], over_arch=[8]),
                        embeddings=replace(made.embeddings, decisions="/abs/outputs/d.json",
                                           mlet=MletConfig(width=16, init_std=0.5), mde=MdeConfig(alpha=1.0)))
    assert plan_differences(to_dict(made), same_plan) == []
    other = replace(same_plan, embeddings=replace(same_plan.embeddings, dim=16, policy="mde", decisions=None))
    assert plan_differences(to_dict(made), other) == [
        ("embeddings.dim", 8, 16), ("embeddings.mde.alpha", 0.3, 1.0), ("embeddings.policy", "decisions", "mde")]


@pytest.mark.usefixtures("process_group")
def test_a_changed_config_is_refused_or_the_checkpoints_is_taken(dataset, tmp_path):
    first = job(dataset, tmp_path, dim=8, max_steps=4)
    plan_for_training(first)
    run_worker(first)

    wider = job(dataset, tmp_path, dim=16, max_steps=6)
    with pytest.raises(ConfigError, match=r"embeddings\.dim \(checkpoint 8, config 16\).*"
                                          r"--resume-with-checkpoint-config"):
        plan_for_training(wider)
    # Another dense architecture is named the same way, not by DCP's size-mismatch traceback.
    other_arch = replace(first, model=ModelConfig(dense_arch=[64, 32]))
    with pytest.raises(ConfigError, match=r"model\.dense_arch"):
        plan_for_training(other_arch)

    adopted = with_checkpoint_config(wider, adopt=True)
    assert adopted.embeddings.dim == 8 and adopted.train.max_steps == 6  # the rest is this config's
    plan_for_training(adopted)
    summary = run_worker(adopted)
    assert summary["resumed_from"].endswith("step-000004") and summary["steps"] == 6
    saved = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())
    assert saved["embeddings"]["dim"] == 8  # the config written beside the model describes it


@pytest.mark.usefixtures("process_group")
def test_a_model_that_differs_from_the_tensors_is_one_line(dataset, tmp_path):
    cfg = job(dataset, tmp_path, max_steps=4)
    plan_for_training(cfg)
    step = Path(run_worker(cfg)["checkpoint"])
    # A config.json that claims another dense arch than the tensors hold (edited by hand, then
    # its manifest entry too): the worker names the tensor instead of raising DCP's traceback.
    changed = replace(cfg, model=ModelConfig(dense_arch=[64, 32]))
    (step / "config.json").write_text(json.dumps(to_dict(changed)))
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"]["config.json"] = {"bytes": (step / "config.json").stat().st_size,
                                        "sha256": sha256_file(step / "config.json")}
    (step / MANIFEST).write_text(json.dumps(manifest))
    plan_for_training(changed)
    wanted = r"step-000004: this run's model differs from the checkpoint's .*dense_arch.*saved \[128"
    with pytest.raises(CheckpointError, match=wanted):
        run_worker(replace(changed, train=replace(changed.train, max_steps=5)))


def test_zero_workers_is_refused_like_a_negative_count(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")
    for count in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(config), "--workers", count])
        assert exit_info.value.code == 2
        assert f"--workers: must be >= 1, got {count}" in capsys.readouterr().err


def test_adopting_a_section_this_config_leaves_out():
    from embshard.config import PepConfig
    from embshard.trainer.resume_config import reconcile

    saved = to_dict(JobConfig(pep=PepConfig(granularity="feature")))
    adopted = reconcile(JobConfig(), saved, Path("step-000004"), adopt=True)
    assert adopted.pep is not None and adopted.pep.granularity == "feature"
    # A recorded value this schema refuses, adopted: the line named no checkpoint.
    from embshard.errors import ConfigError

    bad = {**to_dict(JobConfig()), "embeddings": "wide"}
    with pytest.raises(ConfigError, match=r"^step-000004: the config it records: embeddings: expected a mapping"):
        reconcile(JobConfig(), bad, Path("step-000004"), adopt=True)


def test_a_checkpoint_config_that_is_no_mapping_is_named(tmp_path):
    # `[]` advised --resume-with-checkpoint-config, even when it was given.
    from embshard.errors import ConfigError

    step = tmp_path / "step-000004"
    step.mkdir()
    (step / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match=rf"^{step / 'config.json'}: not a job config \(a JSON list\)$"):
        with_checkpoint_config(JobConfig(), step, adopt=True)
