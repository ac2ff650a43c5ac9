"""`train.report_at: best_valid`: the summary reports the evaluation with the best validation
metric, and the test split as measured on the model at that step, which is what a run stopped at
that step reports; the choice survives a restart (it is kept in the checkpoint's progress). One
process (a world-size-1 gloo group)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import profiled_synth

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
from embshard.trainer.checkpoint import complete_checkpoints
from embshard.trainer.evaluate import EvalResult
from embshard.trainer.loop import run_worker

pytestmark = pytest.mark.usefixtures("process_group")

STEPS = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=4000, max_cardinality=2000)


def job(dataset: Path, out: Path, report_at: str, max_steps: int, checkpoints: bool = False,
        eval_every: int = 1) -> JobConfig:
    # A learning rate high enough that validation AUC wanders, so the best is not the last step.
    return JobConfig(
        seed=3,
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=64, eval_batch_size=512, prefetch=1),
        model=ModelConfig(dense_arch=[16], over_arch=[16]),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(progress=False, max_steps=max_steps, eval_every=eval_every, test=True, report_at=report_at,
                          sparse_lr=0.5, dense_lr=0.05),
        checkpoint=CheckpointConfig(enabled=checkpoints, every_steps=STEPS if checkpoints else None),
        cluster=ClusterConfig(workers=1),
    )


def run(cfg: JobConfig) -> dict:
    plan_for_training(cfg)
    return run_worker(cfg)


def test_best_valid_reports_the_model_at_the_best_validation(dataset, tmp_path):
    best = run(job(dataset, tmp_path / "best", "best_valid", STEPS))
    last = run(job(dataset, tmp_path / "last", "last", STEPS))
    selected = best["selected_step"]
    assert last["selected_step"] == STEPS and best["steps"] == STEPS
    # The case this test is for: validation peaked before the end.
    assert selected < STEPS and best["valid_auc"] > last["valid_auc"]
    # The same seed stopped at the selected step is the same model: the same figures, test included.
    stopped = run(job(dataset, tmp_path / "stopped", "last", selected))
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss", "test_examples"):
        assert best[key] == stopped[key], key


def test_the_last_step_is_evaluated_when_eval_every_does_not_divide_the_run(dataset, tmp_path):
    # Evaluated at step 10 of 12, the run reported step 10's validation as step 12's, beside
    # step 12's test figures.
    every = run(job(dataset, tmp_path / "every", "last", STEPS))
    sparse = run(job(dataset, tmp_path / "sparse", "last", STEPS, eval_every=5))
    assert sparse["selected_step"] == every["selected_step"] == STEPS
    for key in ("valid_auc", "valid_logloss", "test_auc"):
        assert sparse[key] == every[key], key


def test_a_finished_run_extended_still_chooses_among_every_evaluation(dataset, tmp_path):
    # Its end checkpoint comes before its final evaluation (so that a failure there keeps the
    # steps): extended, the run lost that evaluation from its choice.
    longer = STEPS + 4
    straight = run(job(dataset, tmp_path / "straight", "best_valid", longer))
    best = straight["selected_step"]
    assert best < longer  # else the first run is the straight one
    run(job(dataset, tmp_path / "run", "best_valid", best, checkpoints=True))
    extended = run(job(dataset, tmp_path / "run", "best_valid", longer, checkpoints=True))
    assert extended["resumed_from"].endswith(f"step-{best:06d}")
    assert extended["selected_step"] == best
    for key in ("valid_auc", "test_auc"):
        assert extended[key] == straight[key], key


def test_a_restart_still_chooses_among_the_evaluation_at_its_checkpoints_step(dataset, tmp_path, monkeypatch):
    # A checkpoint at an evaluated step is saved before that evaluation: a group restarted from it
    # never evaluated that step, and reported a later, worse one as the best.
    from embshard.trainer import loop

    longer = STEPS + 4
    straight = run(job(dataset, tmp_path / "straight", "best_valid", longer))
    best = straight["selected_step"]
    cfg = job(dataset, tmp_path / "run", "best_valid", longer, checkpoints=True)
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, every_steps=best))
    evaluate = loop._evaluate

    def dies_evaluating(cfg, sharded, steps, reader, device, step, callbacks):
        if step == best:
            raise RuntimeError("the worker died")
        return evaluate(cfg, sharded, steps, reader, device, step, callbacks)

    monkeypatch.setattr(loop, "_evaluate", dies_evaluating)
    with pytest.raises(RuntimeError, match="the worker died"):
        run(cfg)
    monkeypatch.undo()
    restarted = run_worker(cfg)
    assert restarted["resumed_from"].endswith(f"step-{best:06d}")
    assert restarted["selected_step"] == best
    for key in ("valid_auc", "test_auc"):
        assert restarted[key] == straight[key], key


def epochs_of_four_steps(dataset: Path, out: Path, eval_every: int | None, **checkpoint) -> JobConfig:
    cfg = job(dataset, out, "best_valid", 16, checkpoints=True, eval_every=eval_every)
    return replace(cfg, data=replace(cfg.data, batch_size=800),  # 3,200 train rows: 4 steps an epoch
                   train=replace(cfg.train, epochs=4, max_steps=None),
                   checkpoint=replace(cfg.checkpoint, every_steps=4, keep=10, **checkpoint))


def evaluated_steps(monkeypatch) -> list[int]:
    from embshard.trainer import loop

    steps: list[int] = []
    evaluate = loop._evaluate

    def recorded(cfg, sharded, train_steps, reader, device, step, callbacks):
        steps.append(step)
        return evaluate(cfg, sharded, train_steps, reader, device, step, callbacks)

    monkeypatch.setattr(loop, "_evaluate", recorded)
    return steps


def test_a_checkpoint_says_an_evaluation_is_due_exactly_where_the_run_evaluates(dataset, tmp_path, monkeypatch):
    # At an epoch's end with no eval_every step in it, after an earlier evaluation, the checkpoint
    # said due, though the run never evaluates there: a restart chose among other evaluations.
    steps = evaluated_steps(monkeypatch)
    run(epochs_of_four_steps(dataset, tmp_path / "run", eval_every=9))
    assert steps == [4, 9, 16]
    due = {int(p.name[5:]): json.loads((p / "progress.json").read_text())["evaluation_due"]
           for p in complete_checkpoints(tmp_path / "run" / "checkpoints")}
    assert due == {4: True, 8: False, 12: False, 16: True}
    # Restarted from step 8 (due: no), it evaluated 8 as the end of an epoch with no evaluation of
    # this start's own: the run without the restart never did.
    eighth = next(p for p in complete_checkpoints(tmp_path / "run" / "checkpoints") if p.name == "step-000008")
    steps.clear()
    run(epochs_of_four_steps(dataset, tmp_path / "again", eval_every=9, resume=str(eighth)))
    assert steps == [9, 16]


def test_a_restart_at_an_epoch_s_end_evaluates_that_step_once(dataset, tmp_path, monkeypatch):
    # Evaluated first (due), then again as the end of an epoch it trained no step of.
    run(epochs_of_four_steps(dataset, tmp_path / "first", eval_every=None))
    eighth = next(p for p in complete_checkpoints(tmp_path / "first" / "checkpoints") if p.name == "step-000008")
    steps = evaluated_steps(monkeypatch)
    restarted = run(epochs_of_four_steps(dataset, tmp_path / "again", eval_every=None, resume=str(eighth)))
    assert restarted["resumed_from"].endswith("step-000008")
    assert steps == [8, 12, 16]


def test_best_valid_is_remembered_across_a_restart(dataset, tmp_path):
    first = run(job(dataset, tmp_path / "run", "best_valid", STEPS, checkpoints=True))
    assert first["selected_step"] < STEPS
    [saved] = complete_checkpoints(tmp_path / "run" / "checkpoints")
    progress = json.loads((saved / "progress.json").read_text())
    assert progress["best"]["step"] == first["selected_step"]
    assert EvalResult(**progress["best"]["test"]).metrics["auc"] == first["test_auc"]
    # Restarted into the same folder with nothing left to train: it evaluates the last step again,
    # which is not better, so the choice made before the restart stands.
    again = run(job(dataset, tmp_path / "run", "best_valid", STEPS, checkpoints=True))
    assert again["resumed_from"] is not None
    # This start trained nothing: no rate, and the loss is the checkpoint's (were 0 samples/s, None).
    assert again["samples_per_s"] is None and again["data_wait_share"] is None
    assert again["last_loss"] == first["last_loss"] is not None
    for key in ("selected_step", "valid_auc", "test_auc", "test_logloss"):
        assert again[key] == first[key], key
    # The same checkpoint resumed under `last` reports the last step, not the earlier choice.
    last = run(job(dataset, tmp_path / "run", "last", STEPS, checkpoints=True))
    assert last["resumed_from"] is not None and last["selected_step"] == STEPS


def test_last_reports_the_last_step(dataset, tmp_path):
    cfg = job(dataset, tmp_path, "last", 4)
    summary = run(replace(cfg, train=replace(cfg.train, eval_every=None)))
    assert summary["selected_step"] == summary["steps"] == 4


def test_a_resume_with_nothing_left_to_train_saves_where_the_reader_stood(dataset, tmp_path):
    # A `--resume` of another run's last step trained no step, then saved that step with its reader
    # at the epoch's start: continued for another epoch, it trained the first epoch again (54
    # steps where 36 belong, its weights 0.23 off the uninterrupted run's).
    first = job(dataset, tmp_path / "first", "last", STEPS, checkpoints=True)
    run(first)
    source = complete_checkpoints(first.checkpoint_dir)[-1]
    again = job(dataset, tmp_path / "again", "last", STEPS, checkpoints=True)
    run(replace(again, checkpoint=replace(again.checkpoint, resume=str(source))))
    saved = complete_checkpoints(again.checkpoint_dir)[-1]
    assert saved.name == source.name
    assert json.loads((saved / "progress.json").read_text())["reader"] == \
        json.loads((source / "progress.json").read_text())["reader"] == {"epoch": 0, "batches": STEPS}


def test_a_resume_shards_as_the_config_allows(dataset, tmp_path):
    # The checkpoint's table-wise plan was kept on a resume whose config allowed column-wise alone.
    first = job(dataset, tmp_path / "first", "last", 4, checkpoints=True)
    run(first)
    source = complete_checkpoints(first.checkpoint_dir)[-1]
    again = job(dataset, tmp_path / "again", "last", 8, checkpoints=True)
    again = replace(again, checkpoint=replace(again.checkpoint, resume=str(source)),
                    sharding=replace(again.sharding, sharding_types=["column_wise"]))
    bundle = plan_for_training(again)
    assert {ps.sharding_type for ps in bundle.shard_plan.sharding.values()} == {"column_wise"}
    assert run_worker(again)["resumed_from"] == str(source)
