"""Damaged and hostile checkpoints: verified before anything is read, kept aside rather than
replaced, a fresh start that is really fresh, and no code run from a planted pickle."""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import profiled_synth
from distributed import run_ranks

from embshard.cluster.launch import plan_for_training
from embshard.config import CheckpointConfig, ClusterConfig, DataConfig, JobConfig, TrainConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import EmbshardError, StorageError
from embshard.planner.pipeline import PlanBundle
from embshard.trainer.build import build_sharded
from embshard.trainer.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints
from embshard.trainer.checkpoint_integrity import MANIFEST, sha256_file
from embshard.trainer.export import export_serving
from embshard.trainer.loop import run_worker


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=6000, max_cardinality=2000)


def job(dataset: Path, out: Path, workers: int = 1, **train) -> JobConfig:
    cfg = JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=256, eval_batch_size=1024, prefetch=2),
        train=TrainConfig(progress=False, **train),
        cluster=ClusterConfig(workers=workers),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )
    plan_for_training(cfg)
    return cfg


def flip_a_byte(path: Path) -> bytes:
    """Same size, other content: only a content hash notices."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def rehash(folder: Path, name: str) -> None:
    """Forge the manifest entry of `name`, as someone who rewrote the folder would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


class Planted:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.usefixtures("process_group")
def test_damaged_checkpoint_is_kept_aside_and_never_overwritten(dataset, tmp_path, caplog, capsys):
    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    newest, previous = complete_checkpoints(cfg.checkpoint_dir)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    damaged = flip_a_byte(shard)
    with caplog.at_level(logging.WARNING):
        resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=9)))
    assert resumed["resumed_from"] == str(previous)
    # The rollback is said where the run is watched, not only in the log.
    assert (f"resumed from {previous} at step 4 (epoch 0); newer, not verified, kept aside as step-N.damaged: "
            f"{newest.name}: {shard.name}: content differs") in capsys.readouterr().out
    kept = newest.with_name(newest.name + ".damaged")
    assert (kept / shard.name).read_bytes() == damaged  # the user's bytes, untouched
    assert any(str(kept) in r.getMessage() and shard.name in r.getMessage() for r in caplog.records)
    # The resumed run wrote a new step 8 beside it, and pruning never touched the damaged one.
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-000009", "step-000008"]
    assert kept.is_dir()


@pytest.mark.usefixtures("process_group")
def test_no_verifiable_checkpoint_starts_really_fresh(dataset, tmp_path, capsys):
    cfg = job(dataset, tmp_path / "damaged", max_steps=8)
    run_worker(cfg)
    for ckpt in complete_checkpoints(cfg.checkpoint_dir):
        # Tables would load before the progress file failed to parse: a half-resumed model.
        progress = ckpt / "progress.json"
        progress.write_bytes(b"{" * progress.stat().st_size)
    restarted = run_worker(replace(cfg, train=replace(cfg.train, max_steps=5)))
    assert restarted["resumed_from"] is None and restarted["steps"] == 5
    assert "starting fresh" in capsys.readouterr().out
    fresh = run_worker(job(dataset, tmp_path / "fresh", max_steps=5))
    assert restarted["valid_logloss"] == fresh["valid_logloss"]  # bit for bit a fresh run
    assert restarted["first_loss"] == fresh["first_loss"]


@pytest.mark.usefixtures("process_group")
def test_a_resume_source_is_used_when_none_of_the_runs_own_verifies(dataset, tmp_path, capsys):
    # It was dropped with a note, and the run started fresh although a source was named.
    other = job(dataset, tmp_path / "other", max_steps=8)
    run_worker(other)
    cfg = job(dataset, tmp_path / "run", max_steps=8)
    run_worker(cfg)
    for ckpt in complete_checkpoints(cfg.checkpoint_dir):
        flip_a_byte(max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size))
    capsys.readouterr()
    again = replace(cfg, train=replace(cfg.train, max_steps=9),
                    checkpoint=replace(cfg.checkpoint, resume=str(other.checkpoint_dir)))
    resumed = run_worker(again)
    newest = complete_checkpoints(other.checkpoint_dir)[0]
    assert resumed["resumed_from"] == str(newest) and resumed["steps"] == 9
    out = capsys.readouterr().out
    assert f"no checkpoint in {cfg.checkpoint_dir} verifies" in out
    assert f"resuming from checkpoint.resume {other.checkpoint_dir}" in out


@pytest.mark.usefixtures("process_group")
def test_planted_metadata_pickle_runs_nothing(dataset, tmp_path, caplog):
    cfg = job(dataset, tmp_path / "run", max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    marker = tmp_path / "code-ran"
    (step / ".metadata").write_bytes(pickle.dumps(Planted(marker)))

    # The manifest's hash no longer matches: refused before the pickle is opened.
    with pytest.raises(EmbshardError, match=r"\.metadata"):
        export_serving(step, tmp_path / "serving")
    assert not marker.exists()

    # Someone who also rewrote the manifest still gets no code run: the metadata reader admits
    # only DCP's classes, and the error names the file.
    rehash(step, ".metadata")
    with pytest.raises(EmbshardError, match=r"\.metadata.*refusing to load"):
        export_serving(step, tmp_path / "serving")
    other = replace(cfg, output_dir=str(tmp_path / "other"), checkpoint=replace(cfg.checkpoint, resume=str(step)))
    plan_for_training(other)  # the driver reads only the plan and JSON files, all still vouched for
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        run_worker(other)
    assert not marker.exists()
    assert not (tmp_path / "serving").exists()


def _one_rank_cannot_restore(rank: int, world: int, dataset: Path, out: Path) -> str:
    import torch
    import torch.distributed as dist

    holder = [job(dataset, out, workers=2, max_steps=4) if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    cfg = holder[0]
    step = Path(run_worker(cfg)["checkpoint"])
    bundle = PlanBundle.load(cfg.plan_dir, cfg.train.sparse_optimizer)
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))

    def fails_on_rank_1(state: dict) -> dict:
        # Only rank 1 fails, after the tables were read. Before, rank 0 resumed and rank 1 went on
        # to the next candidate's collective load alone: a hang.
        if rank == 1:
            raise RuntimeError("this rank cannot restore")
        return state

    manager = CheckpointManager(cfg.checkpoint_dir, after_load=[fails_on_rank_1])
    try:
        manager.load_latest(sharded.model, sharded.optimizer, [step])
    except CheckpointError as e:
        return str(e)
    return "resumed"


@pytest.mark.slow
def test_a_load_failing_on_one_rank_fails_every_rank_without_hanging(dataset, tmp_path):
    messages = run_ranks(_one_rank_cannot_restore, 2, dataset, tmp_path)
    assert messages[0] == messages[1]
    assert "rank 1" in messages[0] and "step-000004" in messages[0]


def test_non_tensor_items_are_read_without_running_code(tmp_path):
    # DCP's default planner unpickles non-tensor items (optimizer step counts) with
    # weights_only=False: a rewritten .distcp could run code through them.
    import io

    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from embshard.trainer.checkpoint_integrity import DamagedCheckpoint, SafeLoadPlanner

    marker = tmp_path / "code-ran"
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.step"), torch.Size([0]),
                    MetadataIndex("optim.step"), torch.Size([0]), torch.Size([0]))
    planner = SafeLoadPlanner(flatten_state_dict=False)  # writes state_dict[fqn] as it is
    planner.set_up_planner({"optim.step": 0}, None, False)
    with pytest.raises(DamagedCheckpoint, match=r"optim\.step: refusing to load"):
        planner.load_bytes(item, io.BytesIO(pickle.dumps(Planted(marker))))
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save(7, buffer)
    planner.load_bytes(item, io.BytesIO(buffer.getvalue()))  # plain data still loads
    assert planner.state_dict["optim.step"] == 7


@pytest.mark.usefixtures("process_group")
def test_an_rng_file_of_the_old_format_does_not_block_a_resume(dataset, tmp_path, caplog):
    import numpy as np
    import torch

    cfg = job(dataset, tmp_path, max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    # Written before RNG states were plain tensors: numpy's state holds an ndarray.
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": None},
               step / "rank-00000.pt")
    rehash(step, "rank-00000.pt")
    with caplog.at_level(logging.WARNING):
        resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=5)))
    assert resumed["resumed_from"] == str(step)
    assert any("RNG state of rank 0 not restored" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("process_group")
def test_a_checkpoint_the_machine_refuses_to_read_is_one_line_and_left_as_it_is(dataset, tmp_path, monkeypatch):
    # A file of the newest checkpoint that could not be read (a permission, a failing disk) set
    # it aside as damaged and resumed from the one before, with a warning in the log alone.
    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    newest, _ = complete_checkpoints(cfg.checkpoint_dir)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)

    def refused(path: Path) -> str:
        if Path(path) == shard:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return sha256_file(path)

    monkeypatch.setattr("embshard.trainer.checkpoint_integrity.sha256_file", refused)
    with pytest.raises(StorageError, match=rf"^{shard}: Permission denied while verifying checkpoint {newest}$"):
        run_worker(replace(cfg, train=replace(cfg.train, max_steps=9)))
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-000008", "step-000004"]


@pytest.mark.usefixtures("process_group")
def test_an_export_never_lands_in_a_checkpoint_folder_and_a_stray_file_condemns_no_step(dataset, tmp_path, capsys):
    # An export written inside a step (accepted) made the next export skip that step and the next
    # resume set it aside as damaged and train its steps again: 'sub/weights.pt is not in the manifest'.
    from embshard.trainer.export import ExportError

    cfg = job(dataset, tmp_path / "run", max_steps=8)
    run_worker(cfg)
    newest, older = complete_checkpoints(cfg.checkpoint_dir)
    for source, out, step in ((newest, newest / "sub", newest), (cfg.checkpoint_dir, older / "sub" / "x", older),
                              (older, newest / "sub", newest)):
        with pytest.raises(ExportError, match=rf"^--out {out}: inside the checkpoint step {step}, which holds its "
                                              "own files alone"):
            export_serving(source, out)
        assert not out.exists()
    # Named as a step beside them, it was one to the run, whose pruning deleted it.
    for name in ("step-000099", "step-000001.tmp"):
        with pytest.raises(ExportError, match=rf"/{re.escape(name)}: named as a checkpoint's step, among the steps "
                                              rf"of {cfg.checkpoint_dir} \(step-000004\): a run saving there"):
            export_serving(newest, cfg.checkpoint_dir / name)
        assert not (cfg.checkpoint_dir / name).exists()
    # Exports named by their steps, in a folder of exports, are no checkpoint's steps.
    export_serving(newest, tmp_path / "exports" / "step-000004")
    export_serving(newest, tmp_path / "exports" / "step-000008")
    # Beside the steps, or beside a step copied out of its run, is no step's.
    export_serving(newest, cfg.checkpoint_dir / "serving")
    # A file in a step's subfolder is never read: it leaves the step good (one at its own level
    # would be unpickled unvouched for, and still condemns it).
    (newest / "plan" / "notes.pt").write_bytes(b"not a checkpoint file")
    # The driver, which checks the run's config and data against the step it resumes, chooses it
    # too: it skipped it ("not in the manifest"), and the workers resumed it unchecked.
    from embshard.trainer.checkpoint import first_usable

    assert first_usable([newest]) == (newest, [])
    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=9)))
    assert resumed["resumed_from"] == str(newest) and "damaged" not in capsys.readouterr().out


@pytest.mark.usefixtures("process_group")
def test_a_file_read_by_name_that_the_manifest_does_not_list_condemns_the_step(dataset, tmp_path):
    # Dropped from the manifest (or put there after it), config.json, plan.json or a remap was read
    # with no hash vouching for it: an export served two features' remaps swapped, exit 0.
    from embshard.trainer.checkpoint import first_usable

    cfg = job(dataset, tmp_path / "run", max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    written = (step / MANIFEST).read_text()
    for name in ("config.json", "progress.json", "plan/plan.json"):
        manifest = json.loads(written)
        del manifest["files"][name]
        (step / MANIFEST).write_text(json.dumps(manifest))
        assert first_usable([step]) == (None, [(step, f"{name} is not in the manifest")])
        assert first_usable([step], every_file=True) == (None, [(step, f"{name} is not in the manifest")])
    (step / MANIFEST).write_text(written)
    (step / "plan" / "t_C1.0123.remap.npy").write_bytes(b"put there after the manifest")
    assert first_usable([step]) == (None, [(step, "plan/t_C1.0123.remap.npy is not in the manifest")])


@pytest.mark.usefixtures("process_group")
def test_a_verified_checkpoint_that_cannot_be_read_is_one_export_line(dataset, tmp_path):
    # Its hashes made over damaged or foreign files: export was a traceback (EOFError, KeyError,
    # TypeError) where a resume says one line.
    from embshard.trainer.export import ExportError

    cfg = job(dataset, tmp_path / "run", max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    shard = max(step.glob("*.distcp"), key=lambda p: p.stat().st_size)
    for name, content, said in ((shard.name, shard.read_bytes()[:1000], r"EOFError|Error"),
                                ("plan/plan.json", b"{}", r"KeyError: 'dimension_plan'"),
                                ("config.json", b'{"a": 1}', r"TypeError")):
        original = (step / name).read_bytes()
        (step / name).write_bytes(content)
        rehash(step, name)
        with pytest.raises(ExportError, match=rf"^checkpoint {step} cannot be exported \(.*({said}).*\); it was left "
                                              "as it is$"):
            export_serving(step, tmp_path / "serving")
        assert (step / name).read_bytes() == content and not (tmp_path / "serving").exists()
        (step / name).write_bytes(original)
        rehash(step, name)


def test_a_staging_folder_the_machine_refuses_is_one_line(tmp_path):
    from embshard.datasets.outdir import make_staging
    from embshard.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match=r"^/proc/embshard-export: cannot be written \("):
        make_staging(Path("/proc/embshard-export"))


@pytest.mark.usefixtures("process_group")
def test_export_says_a_skipped_step_in_one_line_of_its_own(dataset, tmp_path):
    # FBGEMM's import-time logging.info gave the root logger basicConfig's handler: a skipped step
    # was `WARNING:embshard.trainer.checkpoint:...`, and when none verified, the error said it again.
    import subprocess
    import sys

    cfg = job(dataset, tmp_path / "run", max_steps=8)
    run_worker(cfg)
    newest, older = complete_checkpoints(cfg.checkpoint_dir)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])

    def export(source: Path, out: Path) -> tuple[int, list[str]]:
        done = subprocess.run([sys.executable, "-c", "from embshard.cluster.cli import main; raise SystemExit(main())",
                               "export", str(source), "--out", str(out)], capture_output=True, text=True)
        return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]

    code, err = export(cfg.checkpoint_dir, tmp_path / "a")
    assert code == 0 and err == [f"warning: checkpoint {newest}: skipped, {shard.name} has 1000 bytes, the manifest "
                                 f"says {json.loads((newest / MANIFEST).read_text())['files'][shard.name]['bytes']}"]
    code, err = export(newest, tmp_path / "b")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"embshard: error: {newest}: no checkpoint there verifies")


@pytest.mark.usefixtures("process_group")
def test_export_of_a_run_whose_data_was_written_again_with_more_ids_is_one_line(tmp_path):
    # The arch is rebuilt from the data at data.path: written again with more ids than the
    # tables hold, the export went through on the new spec.
    import shutil

    from embshard.errors import PlanError

    data = profiled_synth(tmp_path / "data", rows=3000, max_cardinality=200)
    cfg = job(data, tmp_path / "run", max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    export_serving(step, tmp_path / "serving")
    shutil.rmtree(data)
    profiled_synth(data, rows=3000, max_cardinality=2000)
    with pytest.raises(PlanError, match=rf"^{step}: its plan and the dataset at {data}: feature '.*' takes [\d,]+ ids, "
                                        r"table '.*' has [\d,]+ rows: the plan was made for other data$"):
        export_serving(step, tmp_path / "again")
    # Written again with as few ids: the export carried the other dataset's spec beside these weights.
    from embshard.trainer.export import ExportError

    shutil.rmtree(data)
    profiled_synth(data, rows=3000, seed=9, max_cardinality=200)
    with pytest.raises(ExportError, match=rf"^{step}: trained on another dataset than {data} holds now"):
        export_serving(step, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.usefixtures("process_group")
def test_a_dataset_json_edited_in_place_since_the_run_trained_is_refused_by_resume_and_export(tmp_path):
    # Its id kept, the dense features reversed: a resume fed them to the dense layers in the other
    # order, and an export's serving.json told its clients that order, both with exit 0.
    from embshard.errors import DataError
    from embshard.trainer.export import ExportError

    data = profiled_synth(tmp_path / "data", rows=3000, max_cardinality=200)
    cfg = job(data, tmp_path / "run", max_steps=4)
    step = Path(run_worker(cfg)["checkpoint"])
    spec = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**spec, "dense": spec["dense"][::-1]}))
    with pytest.raises(ExportError, match=rf"^{step}: the dataset.json at {data} was edited since the run trained "
                                          r"\(its label, dense features, their order"):
        export_serving(step, tmp_path / "serving")
    with pytest.raises(DataError, match=rf"^{data}: its dataset.json was edited since {step} \(resumed\) was made"):
        plan_for_training(cfg)
    assert not (tmp_path / "serving").exists()


@pytest.mark.usefixtures("process_group")
def test_a_checkpoint_of_a_newer_embshard_is_refused_and_left_in_place(dataset, tmp_path):
    # Its manifest's version was not read: a newer format was read as this one's, or, failing
    # that, set aside as damaged, and the run went on from an older step or from scratch.
    from embshard.cluster.launch import resume_source
    from embshard.trainer.checkpoint_integrity import MANIFEST_VERSION, NewerCheckpoint

    cfg = job(dataset, tmp_path, max_steps=8)
    run_worker(cfg)
    newest, _ = complete_checkpoints(cfg.checkpoint_dir)
    manifest = json.loads((newest / MANIFEST).read_text())
    (newest / MANIFEST).write_text(json.dumps(manifest | {"version": MANIFEST_VERSION + 1}))
    said = (rf"{newest / MANIFEST}: version {MANIFEST_VERSION + 1}, newer than this embshard reads "
            rf"\({MANIFEST_VERSION}\): written by a newer embshard; upgrade embshard where it is read$")
    with pytest.raises(NewerCheckpoint, match="^" + said):
        resume_source(cfg)
    # On a worker too (the driver refuses it first, but a worker can reach it alone): "newer", not
    # "rank 0: ... damaged".
    with pytest.raises(NewerCheckpoint, match="^" + said):
        run_worker(replace(cfg, train=replace(cfg.train, max_steps=9)))
    with pytest.raises(NewerCheckpoint, match="^" + said):
        export_serving(cfg.checkpoint_dir, tmp_path / "export")
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-000008", "step-000004"]
    assert not (tmp_path / "export").exists()


@pytest.mark.usefixtures("process_group")
def test_the_driver_checks_the_checkpoint_the_workers_fall_back_to(dataset, tmp_path):
    # Every checkpoint of the run's own damaged, and checkpoint.resume naming another run's: the
    # workers resumed that one, the driver looked at it only while the run had none, and so never
    # compared its config and data with this run's.
    from embshard.cluster.launch import resume_source

    other = job(dataset, tmp_path / "other", max_steps=4)
    run_worker(other)
    cfg = job(dataset, tmp_path / "run", max_steps=4)
    run_worker(cfg)
    for step in complete_checkpoints(cfg.checkpoint_dir):
        flip_a_byte(step / "config.json")
    resumed = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(other.checkpoint_dir)))
    assert resume_source(resumed) == complete_checkpoints(other.checkpoint_dir)[0]
    assert resume_source(cfg) is None


@pytest.mark.usefixtures("process_group")
def test_an_explicit_resume_nothing_verifies_in_is_refused_before_ray_starts(dataset, tmp_path):
    # The driver warned and went on: Ray started, the run's folders were made, and only the
    # workers refused. Two such sources: a step pruned since (said as "the write did not finish"),
    # and a step a run set aside whose damage lies in a file the driver does not read.
    from embshard.cluster.launch import resume_source

    other = job(dataset, tmp_path / "other", max_steps=8)
    run_worker(other)
    newest, previous = complete_checkpoints(other.checkpoint_dir)
    damaged = newest.rename(newest.with_name(newest.name + ".damaged"))
    flip_a_byte(max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size))
    gone = previous.with_name("step-000002")
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=other.data, train=other.train, cluster=other.cluster,
                    checkpoint=other.checkpoint)
    for source, said in ((gone, r"no checkpoint found \(no such folder\)"),
                         (damaged, rf"no checkpoint there verifies \({damaged.name}: __\d_\d\.distcp: content")):
        resumed = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(source)))
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(source))}: {said}"):
            resume_source(resumed)
    assert resume_source(replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(previous)))) == previous


@pytest.mark.usefixtures("process_group")
def test_the_workers_refuse_a_fallback_of_another_model_than_the_driver_planned_for(dataset, tmp_path):
    # The driver planned from the run's newest step, whose tensors only the workers read; their
    # check refused it, and they resumed checkpoint.resume, which the driver never compared: a
    # size mismatch for another model config, a silently wrong model where only rows moved.
    from embshard.cluster.launch import resume_source
    from embshard.config import EmbeddingsConfig

    narrower = replace(job(dataset, tmp_path / "narrower", max_steps=4), embeddings=EmbeddingsConfig(dim=8))
    plan_for_training(narrower)
    run_worker(narrower)
    elsewhere = profiled_synth(tmp_path / "data2", rows=6000, max_cardinality=500)
    other_data = job(elsewhere, tmp_path / "other-data", max_steps=4)
    run_worker(other_data)
    another_config = r"was trained with another model config: embeddings\.dim \(checkpoint 8, config 16\)"
    for source, said in ((narrower, another_config),
                         (other_data, "holds another embedding plan than the run's")):
        cfg = job(dataset, tmp_path / f"run-{source.output_dir[-5:]}", max_steps=4)
        run_worker(cfg)
        for step in complete_checkpoints(cfg.checkpoint_dir):
            flip_a_byte(max(step.glob("*.distcp"), key=lambda p: p.stat().st_size))
        again = replace(cfg, train=replace(cfg.train, max_steps=6),
                        checkpoint=replace(cfg.checkpoint, resume=str(source.checkpoint_dir)))
        assert resume_source(again) == complete_checkpoints(cfg.checkpoint_dir)[0]  # its own files verify
        fallback = complete_checkpoints(source.checkpoint_dir)[0]
        with pytest.raises(EmbshardError, match=f"^{re.escape(str(fallback))}:? {said}"):
            run_worker(again)


@pytest.mark.usefixtures("process_group")
def test_a_step_pruned_while_it_is_loaded_is_said_so(dataset, tmp_path):
    # `--resume` of a run still saving (keep 1): "cannot be loaded (rank 0: FileNotFoundError ...);
    # it was left as it is", of a step that run's pruning had removed.
    import torch

    cfg = job(dataset, tmp_path / "run", max_steps=4)
    run_worker(cfg)
    step = complete_checkpoints(cfg.checkpoint_dir)[0]

    def pruned_meanwhile(state):  # as the other run's prune does: the manifest first, then the files
        (step / MANIFEST).unlink()
        for shard in step.glob("*.distcp"):
            shard.unlink()
        return state

    cfg2 = replace(cfg, output_dir=str(tmp_path / "again"), checkpoint=replace(cfg.checkpoint, dir=None))
    sharded = build_sharded(cfg2, PlanBundle.load(cfg.plan_dir, "rowwise_adagrad"), DatasetSpec.load(dataset),
                            torch.device("cpu"))
    manager = CheckpointManager(tmp_path / "unused", before_load=[pruned_meanwhile])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(step))}: removed while it was being loaded \(a run "
                                              r"still saving into .* keeps only its newest steps\); resume from "):
        manager.load_latest(sharded.model, sharded.optimizer, [step])


@pytest.mark.parametrize("name", ["../step-000008/progress.json", "/etc/hostname", "a/./b", "a//b", "a\\b"])
def test_a_manifest_listing_a_file_outside_its_step_does_not_verify(tmp_path, name):
    # Read as listed: a step vouched for another step's file (locally), and in a bucket the key
    # `../` was "access denied", which stopped every resume and export there for good.
    import hashlib

    from embshard.trainer.checkpoint_integrity import DamagedCheckpoint, verify

    other = tmp_path / "ck" / "step-000008" / "progress.json"
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    step = tmp_path / "ck" / "step-000004"
    step.mkdir()
    entry = {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    (step / MANIFEST).write_text(json.dumps({"version": 2, "files": {name: entry}}))
    with pytest.raises(DamagedCheckpoint, match=rf"^{MANIFEST} lists {re.escape(repr(name))}, which names no file "
                                                "of this step$"):
        verify(step)


@pytest.mark.usefixtures("process_group", "python_ctrl_c")
def test_a_stop_once_the_export_is_in_place_says_so(dataset, tmp_path, monkeypatch, capsys):
    # Ctrl-C as the export's line was made: "embshard: interrupted", exit 130, of an export written whole.
    import os
    import signal

    from embshard.cluster.cli import main
    from embshard.trainer import export

    cfg = job(dataset, tmp_path / "run", max_steps=4)
    run_worker(cfg)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the loop's stays, as in a worker process
    read_manifest = export.read_manifest

    def stopped_as_it_is_read(directory):
        os.kill(os.getpid(), signal.SIGINT)
        return read_manifest(directory)

    monkeypatch.setattr(export, "read_manifest", stopped_as_it_is_read)
    out = tmp_path / "serving"
    assert main(["export", str(cfg.checkpoint_dir), "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"embshard: stopped once {out} was written whole"
    assert f"written to {out}" in captured.out
    monkeypatch.undo()
    assert read_manifest(out).weights == "weights.pt"


@pytest.mark.usefixtures("process_group")
def test_a_step_whose_manifest_or_progress_holds_no_counts_is_damaged(dataset, tmp_path, capsys):
    # A manifest size of 1e999 was an OverflowError traceback out of every resume and export. A
    # progress.json of step -5 (its hash made again) resumed at -5, and its folder's name kept it
    # the newest: each later run resumed it again and pruned the steps it had trained since.
    from embshard.trainer.checkpoint import problem

    cfg = job(dataset, tmp_path / "run", max_steps=8)
    run_worker(cfg)
    newest, older = complete_checkpoints(cfg.checkpoint_dir)
    manifest = (newest / MANIFEST).read_text()
    progress = json.loads((newest / "progress.json").read_text())
    assert progress["step"] == 8
    for edit, why in (
        (lambda: (newest / MANIFEST).write_text(re.sub(r'"bytes": \d+', '"bytes": 1e999', manifest, count=1)),
         r"unreadable manifest\.json \(ValueError: a file's entry \{'bytes': inf"),
        (lambda: (newest / "progress.json").write_text(json.dumps({**progress, "step": -5})),
         r"progress\.json: step -5 is no count of at least 0"),
        (lambda: (newest / "progress.json").write_text(json.dumps({**progress, "step": 4})),
         r"progress\.json is of step 4, manifest\.json of step 8"),
        (lambda: (newest / "progress.json").write_text(json.dumps({**progress, "world_size": 0})),
         r"progress\.json: world_size 0 is no count of at least 1")):
        (newest / MANIFEST).write_text(manifest)
        edit()
        if not (newest / MANIFEST).read_text().count("1e999"):
            rehash(newest, "progress.json")  # as one who rewrote the step would
        assert re.match(why, problem(newest) or "")
    # Resumed, the run sets it aside and goes on from the older step.
    resumed = run_worker(replace(cfg, train=replace(cfg.train, max_steps=12)))
    assert resumed["resumed_from"] == str(older)
    assert "progress.json: world_size 0 is no count" in capsys.readouterr().out
