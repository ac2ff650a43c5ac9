"""Checkpoint round trip, damaged-checkpoint fallback, pruning and atomicity, in one process
(a world-size-1 gloo group)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    TrainConfig,
)
from embshard.datasets.schema import DatasetSpec
from embshard.errors import DataError, EnvironmentProblem
from embshard.planner.pipeline import PlanBundle
from embshard.planner.shard_plan import plan_sharding
from embshard.sharding.mlet import without_mlet
from embshard.trainer.build import build_sharded
from embshard.trainer.checkpoint import (
    MANIFEST,
    PRUNING_MARK,
    CheckpointError,
    CheckpointManager,
    Progress,
    complete_checkpoints,
)
from embshard.trainer.loop import checkpoint_manager, make_reader, run_worker

pytestmark = pytest.mark.usefixtures("process_group")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=6000, max_cardinality=2000)



def job(dataset: Path, out: Path, embeddings: EmbeddingsConfig | None = None, **train) -> JobConfig:
    cfg = JobConfig(
        output_dir=str(out),
        embeddings=embeddings or EmbeddingsConfig(),
        data=DataConfig(path=str(dataset), batch_size=256, eval_batch_size=1024, prefetch=2),
        train=TrainConfig(progress=False, **train),
        cluster=ClusterConfig(workers=1),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )
    plan_for_training(cfg)
    return cfg


def outputs_and_state(cfg: JobConfig, steps_dir: Path | None = None):
    """A fresh model (optionally loaded from a checkpoint): logits on a fixed batch, optimizer
    state and the reader position."""
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    reader = make_reader(cfg, bundle, "valid", 0, 1)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"))
    position = None
    if steps_dir is not None:
        manager = CheckpointManager(cfg.checkpoint_dir)
        _, progress = manager.load_latest(sharded.model, sharded.optimizer, [steps_dir])
        position = progress.reader
    batch = next(iter(reader))
    with torch.no_grad():
        logits = sharded.model(batch)[1]
    return logits, _flat_state(sharded.optimizer.state_dict()), position


def _flat_state(sd: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for key, state in sd["state"].items():
        for name, value in state.items():
            if hasattr(value, "local_shards"):
                value = torch.cat([s.tensor.flatten() for s in value.local_shards()])
            flat[f"{key}.{name}"] = torch.as_tensor(value).flatten().clone()
    return flat


def test_round_trip_restores_outputs_optimizer_and_reader(dataset, tmp_path):
    cfg = job(dataset, tmp_path / "a", max_steps=6)
    summary = run_worker(cfg)
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("step-000006")
    # the live model at the end of training, re-read through the same path as a restart
    final = Path(summary["checkpoint"])
    logits, optim, position = outputs_and_state(cfg, final)
    assert position == {"epoch": 0, "batches": 6}
    fresh_logits, _, _ = outputs_and_state(cfg)
    assert not torch.allclose(logits, fresh_logits)  # loading did change the model
    # Resume the same run for 4 more steps vs. an uninterrupted 10-step run: identical.
    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=10)))
    assert resumed["steps"] == 10 and resumed["resumed_from"] == str(final)
    straight_cfg = job(dataset, tmp_path / "b", max_steps=10)
    straight = run_worker(straight_cfg)
    a, opt_a, _ = outputs_and_state(cfg, Path(resumed["checkpoint"]))
    b, opt_b, _ = outputs_and_state(straight_cfg, Path(straight["checkpoint"]))
    torch.testing.assert_close(a, b)
    assert opt_a.keys() == opt_b.keys() and any("exp_avg" in k for k in opt_a)
    for k in opt_a:
        torch.testing.assert_close(opt_a[k], opt_b[k], msg=k)
    assert resumed["valid_logloss"] == pytest.approx(straight["valid_logloss"], rel=1e-5)


def test_damaged_checkpoint_falls_back_with_warning(dataset, tmp_path, caplog):
    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    newest, previous = complete_checkpoints(cfg.checkpoint_dir)
    assert (newest.name, previous.name) == ("step-000008", "step-000004")
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=9)))
    assert resumed["resumed_from"] == str(previous)
    assert any(str(newest) in r.getMessage() for r in caplog.records)


def test_keep_last_k_and_unfinished_folders_ignored(dataset, tmp_path, monkeypatch):
    from embshard.trainer import checkpoint

    cfg = job(dataset, tmp_path, max_steps=12)
    pruned = []

    def rmtree(path):
        # A pruned step loses its manifest before any other file: an export reading it meanwhile
        # knows it was pruned, not damaged (rmtree took files in directory order, manifest last).
        if re.fullmatch(r"step-\d+", path.name):
            pruned.append((path.name, (path / MANIFEST).exists()))
        shutil.rmtree(path, ignore_errors=True)

    monkeypatch.setattr(checkpoint, "rmtree", rmtree)
    run_worker(cfg)
    assert pruned == [("step-000004", False)]
    ckpts = complete_checkpoints(cfg.checkpoint_dir)
    assert [p.name for p in ckpts] == ["step-000012", "step-000008"]
    manifest = json.loads((ckpts[0] / MANIFEST).read_text())
    assert manifest["step"] == 12 and "progress.json" in manifest["files"]
    assert "plan/plan.json" in manifest["files"]
    # The manifest is written last: a folder still named .tmp, or one without a manifest, is
    # never a resume candidate.
    ckpts[0].rename(ckpts[0].with_name("step-000012.tmp"))
    (ckpts[1] / MANIFEST).unlink()
    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=13)))
    assert resumed["resumed_from"] is None and resumed["steps"] == 13


def test_a_step_a_killed_prune_left_without_its_manifest_is_pruned(dataset, tmp_path):
    # Killed between the manifest's delete and the folder's, a prune left a step that every later
    # prune failed on ("removing older ones failed: FileNotFoundError"), a checkpoint's disk for good.
    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    (cfg.checkpoint_dir / "step-000004" / PRUNING_MARK).write_text("")  # as a prune begins
    (cfg.checkpoint_dir / "step-000004" / MANIFEST).unlink()
    run_worker(replace(cfg, train=replace(cfg.train, max_steps=12)))
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == ["step-000008", "step-000012"]


def test_a_prune_that_fails_midway_is_finished_by_the_next(dataset, tmp_path, monkeypatch):
    # The mark went with the first files (rmtree's order): a folder a prune failed on, or was
    # killed in, had neither manifest nor mark, and no later prune took it.
    from embshard.trainer import checkpoint

    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    shard = next((cfg.checkpoint_dir / "step-000004").glob("*.distcp"))
    real_unlink = Path.unlink

    def unlink_failing_once(path, *args, **kwargs):
        if path == shard and not getattr(unlink_failing_once, "failed", False):
            unlink_failing_once.failed = True
            raise PermissionError("held open")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink_failing_once)
    with pytest.raises(PermissionError):
        checkpoint.CheckpointManager(cfg.checkpoint_dir, keep=1)._prune()
    monkeypatch.undo()
    left = {p.name for p in (cfg.checkpoint_dir / "step-000004").iterdir()}
    assert {PRUNING_MARK, shard.name} <= left and MANIFEST not in left
    checkpoint.CheckpointManager(cfg.checkpoint_dir, keep=1)._prune()
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == ["step-000008"]


def test_a_prune_deletes_neither_a_users_folder_named_as_a_step_nor_through_a_link(dataset, tmp_path, capsys):
    # A step-named folder without a manifest was taken for a prune's leftover and deleted with a
    # user's files; a link to another run's step lost that step's manifest.
    other = job(dataset, tmp_path / "other", max_steps=4)
    run_worker(other)
    cfg = job(dataset, tmp_path / "run", max_steps=8)
    run_worker(cfg)
    (cfg.checkpoint_dir / "step-000001").mkdir()
    (cfg.checkpoint_dir / "step-000001" / "notes.txt").write_text("mine")
    (cfg.checkpoint_dir / "step-000002").symlink_to(other.checkpoint_dir / "step-000004")
    run_worker(replace(cfg, train=replace(cfg.train, max_steps=12)))
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == [
        "step-000001", "step-000002", "step-000008", "step-000012"]
    assert (cfg.checkpoint_dir / "step-000001" / "notes.txt").read_text() == "mine"
    assert (other.checkpoint_dir / "step-000004" / MANIFEST).is_file()
    # Said once: it looks like what an older embshard's interrupted prune left, the user's to delete.
    out = capsys.readouterr().out
    assert out.count(f"note: {cfg.checkpoint_dir / 'step-000001'} holds no manifest: not a checkpoint a save wrote, "
                     "so pruning leaves it") == 1
    assert "step-000002 holds no manifest" not in out


def test_sigterm_finishes_the_step_checkpoints_and_stops(dataset, tmp_path):
    cfg = job(dataset, tmp_path, epochs=3)
    first = cfg.checkpoint_dir / "step-000004"

    def preempt() -> None:
        deadline = time.monotonic() + 60
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        summary = run_worker(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert summary["preempted"] and 4 <= summary["steps"] < 3 * 18
    assert summary["checkpoint"].endswith(f"step-{summary['steps']:06d}")


def test_mlet_checkpoints_hold_collapsed_tables_that_resume_exactly(dataset, tmp_path):
    cfg = job(dataset, tmp_path, EmbeddingsConfig(dim=8, mlet=MletConfig(ratio=4)), max_steps=4)
    final = Path(run_worker(cfg)["checkpoint"])
    widths = {k: v.size[1] for k, v in dcp_metadata(final).items() if k.endswith(".weight") and "ebc" in k}
    assert widths and set(widths.values()) == {8}  # n x d on disk, never n x k (32)

    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    batch = next(iter(make_reader(cfg, bundle, "valid", 0, 1)))

    def logits(model_cfg: JobConfig, plan_bundle: PlanBundle, manager_for) -> torch.Tensor:
        spec = DatasetSpec.load(model_cfg.data.path)
        sharded = build_sharded(model_cfg, plan_bundle, spec, torch.device("cpu"))
        manager_for(sharded).load_latest(sharded.model, sharded.optimizer, [final])
        with torch.no_grad():
            return sharded.model(batch)[1]

    # The MLET model rebuilt from the checkpoint (W1 = W . W2+) equals a plain d-wide model
    # that reads the same collapsed tables with no hook at all.
    mlet = logits(cfg, bundle, lambda sh: checkpoint_manager(cfg, sh, None))
    plain_plan = without_mlet(bundle.dimension_plan)
    plain_shards = plan_sharding(plain_plan, bundle.shard_plan.topology, batch_size=256, optimizer="rowwise_adagrad")
    plain_bundle = PlanBundle(plain_plan, plain_shards, bundle.memory, bundle.directory)
    plain = logits(cfg, plain_bundle, lambda sh: CheckpointManager(cfg.checkpoint_dir))
    torch.testing.assert_close(mlet, plain, rtol=1e-5, atol=1e-5)


def dcp_metadata(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    return {k.removeprefix("model."): v for k, v in FileSystemReader(path).read_metadata().state_dict_metadata.items()
            if k.startswith("model.")}


def test_a_checkpoint_without_this_models_keys_is_one_line_not_a_key_error(tmp_path):
    """A checkpoint of an embshard from before `model.arch` saved DLRM's keys one level higher
    (no TrainModel in between): resuming it must say so, not die on a KeyError in a worker."""
    from types import SimpleNamespace

    from embshard.trainer.checkpoint import _check_shapes

    state = {"model.dense_arch.weight": torch.zeros(4, 2), "model.over_arch.bias": torch.zeros(1)}
    old_layout = {f"model.{k.removeprefix('model.')}": SimpleNamespace(size=torch.Size(v.shape))
                  for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"lacks 2 of this run's tensors \(e.g. model.dense_arch.weight\)"):
        _check_shapes(tmp_path, state, old_layout)
    same_layout = {f"model.{k}": SimpleNamespace(size=torch.Size(v.shape)) for k, v in state.items()}
    _check_shapes(tmp_path, state, same_layout)  # nothing missing, nothing resized


@pytest.mark.parametrize("before, after, said", [
    ([64], [32, 64], r"the checkpoint lacks 2 of this run's tensors \(e\.g\. model\.dense_arch\.[\w.]+\): "
                     r"another model \(or the model's code changed since\)"),
    ([32, 64], [64], r"holds model parameters this run's model has no place for \('dense_arch\.[\w.]+' and 1 more\), "
                     r"which a resume would drop"),
])
def test_a_model_whose_layers_changed_since_its_checkpoint_is_refused_naming_them(dataset, tmp_path, before, after,
                                                                                   said):
    # A layer added since: "cannot be loaded (... Missing key in checkpoint state_dict: optim.state...)";
    # a layer removed since: resumed, its trained weights dropped without a word.
    from test_checkpoint_integrity import rehash

    cfg = job(dataset, tmp_path, max_steps=4)
    cfg = replace(cfg, model=replace(cfg.model, dense_arch=before))
    run_worker(cfg)
    edited = replace(cfg, model=replace(cfg.model, dense_arch=after), train=replace(cfg.train, max_steps=8))
    # The model's code changed, its config did not: the checkpoint records the config it is resumed
    # with (a config that differs is refused before any tensor is read, by name).
    step = cfg.checkpoint_dir / "step-000004"
    recorded = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**recorded, "model": {**recorded["model"], "dense_arch": after}}))
    rehash(step, "config.json")
    with pytest.raises(CheckpointError, match=said):
        run_worker(edited)
    assert (cfg.checkpoint_dir / "step-000004").is_dir()  # left as it is


def test_a_batch_larger_than_a_ranks_rows_is_one_line_not_a_run_of_no_steps(dataset, tmp_path):
    # It trained 0 steps, wrote a checkpoint of the untrained model and exited 0.
    cfg = job(dataset, tmp_path)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=100_000))
    with pytest.raises(DataError, match=r"the train split holds fewer than data\.batch_size=100000 rows for a rank "
                                        r"of 1, so not one step would train"):
        run_worker(cfg)
    assert not complete_checkpoints(cfg.checkpoint_dir)


def test_rerunning_a_finished_run_writes_no_checkpoint_again(dataset, tmp_path):
    # It rewrote the last checkpoint and kept the old one as step-N.superseded, again at every rerun.
    cfg = job(dataset, tmp_path, max_steps=6)
    first = run_worker(cfg)
    before = sorted(p.name for p in Path(cfg.checkpoint_dir).iterdir())
    again = run_worker(cfg)
    assert again["steps"] == first["steps"] == 6 and again["checkpoint"] == first["checkpoint"]
    assert sorted(p.name for p in Path(cfg.checkpoint_dir).iterdir()) == before == ["step-000004", "step-000006"]


def test_a_checkpoint_folder_that_cannot_be_written_is_said_before_training(dataset, tmp_path):
    # A read-only checkpoint.dir was found at the first save: with every_steps unset, after the
    # whole run had trained, and the model was lost.
    (tmp_path / "a-file").write_text("")
    cfg = replace(job(dataset, tmp_path / "run"), checkpoint=CheckpointConfig(dir=str(tmp_path / "a-file" / "ck")))
    with pytest.raises(EnvironmentProblem, match=rf"^checkpoint.dir {tmp_path / 'a-file' / 'ck'}: "
                                                 rf"{tmp_path / 'a-file'} is a file, not a folder$"):
        plan_for_training(cfg)
    cfg = replace(cfg, checkpoint=CheckpointConfig(dir=str(tmp_path / "new" / "ck")))
    before = sorted(tmp_path.iterdir())
    plan_for_training(cfg)
    assert sorted(tmp_path.iterdir()) == before  # probed where it exists, the probe gone, nothing made


def test_an_unfinished_write_of_an_earlier_step_goes_at_the_next_save(dataset, tmp_path):
    # A run killed mid-save left step-N.tmp, as large as a checkpoint, for good: no later save
    # was of the same step. One holding a manifest was complete and stays.
    cfg = job(dataset, tmp_path, max_steps=4)
    run_worker(cfg)
    killed, complete = cfg.checkpoint_dir / "step-000002.tmp", cfg.checkpoint_dir / "step-000003.tmp"
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"half a shard")
    complete.mkdir()
    (complete / MANIFEST).write_text("{}")
    run_worker(replace(cfg, train=replace(cfg.train, max_steps=8)))
    assert not killed.exists() and complete.is_dir()


def test_a_save_that_fails_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    # DCP's torch.save onto a full disk fails as "unexpected pos 704 vs 598", naming no disk.
    import shutil

    from embshard import errors
    from embshard.trainer import checkpoint
    from embshard.trainer.checkpoint_integrity import RankFailure

    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    failure = RankFailure(0, "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
                          False)
    with pytest.raises(CheckpointError, match=r"step-000040\.tmp: saving checkpoint step 40 failed on rank 0: the "
                                              r"disk is full \(0 bytes free; RuntimeError: .*\) \(earlier checkpoints "
                                              r"are kept\)$"):
        checkpoint._raise_save_failure((failure, None), 40, tmp_path / "step-000040.tmp")


def test_a_worker_whose_run_has_ended_publishes_nothing(dataset, tmp_path):
    # The workers of a driver killed with SIGKILL went on for seconds: they published a step and
    # pruned older ones in an output_dir that a rerun had already taken.
    from embshard.cluster.run_lock import folder_lock, owner_check, run_owner

    cfg = job(dataset, tmp_path / "a", max_steps=8)
    with folder_lock(Path(cfg.output_dir)):
        check = owner_check(run_owner([Path(cfg.output_dir)]))  # what the driver gives its workers
        assert run_worker(cfg, owner_check=check)["checkpoint"].endswith("step-000008")  # saves as ever
        bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
        sharded = build_sharded(cfg, bundle, make_reader(cfg, bundle, "valid", 0, 1).spec, torch.device("cpu"))
        manager = checkpoint_manager(cfg, sharded, None, check)  # a worker started under this run
    saved = complete_checkpoints(cfg.checkpoint_dir)
    assert [p.name for p in saved] == ["step-000008", "step-000004"]
    with folder_lock(Path(cfg.output_dir)):  # a rerun holds the folder now
        with pytest.raises(CheckpointError, match=r"saving checkpoint step 12 failed on rank 0: .*the run this "
                                                  r"worker started under has ended, and another holds it \(pid"):
            manager.save(Progress(step=12, batch_size=256), sharded.model, sharded.optimizer, {}, cfg.plan_dir)
        assert complete_checkpoints(cfg.checkpoint_dir) == saved  # nothing published, nothing pruned
        assert not (cfg.checkpoint_dir / "step-000012.tmp").exists()  # nor written: the rerun may write it
    with pytest.raises(CheckpointError, match=r"the run this worker started under has ended; nothing more"):
        manager.save(Progress(step=12, batch_size=256), sharded.model, sharded.optimizer, {}, cfg.plan_dir)
    assert complete_checkpoints(cfg.checkpoint_dir) == saved


def test_checkpoint_dir_inside_a_step_a_dataset_or_the_plan_is_refused(dataset, tmp_path):
    # In another run's step, that run's pruning deleted this run's checkpoints; in the dataset, its
    # folder held steps; in the plan folder, the first save copied the plan into itself, 1,176
    # folders deep, and failed in a 60 KB line.
    from embshard.cluster.run_lock import run_lock
    from embshard.errors import ConfigError

    other = job(dataset, tmp_path / "other", max_steps=4)
    with run_lock(other):  # as `embshard train` runs it: its folder marked as a run's
        run_worker(other)
    step = other.checkpoint_dir / "step-000004"
    cfg = job(dataset, tmp_path / "run")
    for where, said in ((step / "sub", f"inside the checkpoint step {step}"),
                        (dataset, f"inside the dataset {dataset}"),
                        (Path(cfg.plan_dir) / "ck", f"inside the run's plan folder {cfg.plan_dir}"),
                        # Another run's, while it trained: its checkpoints copied this run's lock and steps.
                        (Path(other.plan_dir) / "ck", f"inside the plan folder of a run (every checkpoint of that "
                                                      f"run copies it) {other.plan_dir}")):
        with pytest.raises(ConfigError, match=rf"^checkpoint\.dir {re.escape(str(where))}: {re.escape(said)}"):
            plan_for_training(replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(where))))
    assert not (step / "sub").exists()


def test_a_parameter_without_optimizer_state_at_the_save_resumes_with_none_beside_one_with_state(tmp_path):
    # A part of the optimizer where one parameter had stepped at the save and another had not (it
    # got no gradient yet): the load gives the whole part state first, which DCP then looked for
    # in the checkpoint ("Missing key in checkpoint state_dict: optim.state.b.exp_avg").
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from embshard.trainer.checkpoint import CheckpointManager, Progress

    def model_and_optimizer() -> tuple[torch.nn.Module, CombinedOptimizer]:
        torch.manual_seed(0)
        model = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(3)),
                                        "b": torch.nn.Parameter(torch.randn(2))})
        params = dict(model.named_parameters())
        adam = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=0.1))
        return model, CombinedOptimizer([("dense", adam)])

    model, optimizer = model_and_optimizer()
    model["a"].grad = torch.ones(3)  # `b` has no gradient: Adam gives it no state
    optimizer.step()
    assert [p.shape for p in optimizer.state] == [torch.Size([3])]
    manager = CheckpointManager(tmp_path / "ckpt")
    (tmp_path / "plan").mkdir()
    saved = manager.save(Progress(step=1), model, optimizer, {}, tmp_path / "plan")
    resumed, fresh = model_and_optimizer()
    manager.load(saved, resumed, fresh)
    assert torch.equal(resumed["a"], model["a"]) and torch.equal(resumed["b"], model["b"])
    state = {tuple(p.shape): s for p, s in fresh.state.items()}
    assert set(state) == {(3,)}  # as saved: `b` resumes with no state, `a` with its own
    assert torch.equal(state[(3,)]["exp_avg"], optimizer.state[model["a"]]["exp_avg"])


def test_a_resume_refuses_a_plan_file_it_would_not_train(dataset, tmp_path, capsys):
    # A resume trains its checkpoint's plan: sharding.plan_file was passed over without a word.
    from embshard.errors import PlanError
    from embshard.planner.pipeline import make_plan
    from embshard.planner.topology import TopologySpec

    cfg = job(dataset, tmp_path / "run", max_steps=4)
    run_worker(cfg)
    options = {"batch_size": cfg.data.batch_size, "optimizer": cfg.train.sparse_optimizer}

    def resumed_with(plan: Path) -> None:
        plan_for_training(replace(cfg, sharding=replace(cfg.sharding, plan_file=str(plan))))

    shutil.copytree(cfg.plan_dir, tmp_path / "same")
    resumed_with(tmp_path / "same" / "plan.json")  # the plan it started with: resumed as ever
    assert "note: sharding.plan_file" not in capsys.readouterr().err
    mde = EmbeddingsConfig(policy="mde", dim=cfg.embeddings.dim, mde=MdeConfig(alpha=0.4, mode="within", blocks=3))
    make_plan(mde, dataset, TopologySpec(1, "cpu"), tmp_path / "mde", **options).save()
    with pytest.raises(PlanError, match=rf"^sharding\.plan_file {tmp_path / 'mde' / 'plan.json'}: another plan than "
                                        rf"the one .*step-000004 trained, which its resume trains"):
        resumed_with(tmp_path / "mde" / "plan.json")
    # The same widths laid out otherwise on the same ranks: the resume keeps its own layout, and says so.
    make_plan(cfg.embeddings, dataset, TopologySpec(1, "cpu"), tmp_path / "cw", sharding_types=["column_wise"],
              **options).save()
    resumed_with(tmp_path / "cw" / "plan.json")
    assert "its shard layout is not the one" in capsys.readouterr().err
