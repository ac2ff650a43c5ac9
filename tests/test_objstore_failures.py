"""Object storage failing in the middle of a run, against a real S3-compatible server (moto's, in
its own process, one per test: they kill it or revoke its credentials): one line naming the URI
and what was being done, nothing half-written under a name readers look for, and every earlier
checkpoint intact."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import s3fs
from conftest import bucket_name, profiled_synth
from s3_server import S3Bucket, S3Server, s3_server

from embshard.cluster.launch import plan_for_training
from embshard.config import CheckpointConfig, ClusterConfig, DataConfig, JobConfig, TrainConfig, load_job_config
from embshard.datasets import storage
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.storage import copytree, location
from embshard.datasets.synth import synthesize
from embshard.errors import ConfigError, StorageError
from embshard.trainer import export
from embshard.trainer.checkpoint import CheckpointManager, complete_checkpoints
from embshard.trainer.checkpoint_integrity import verify
from embshard.trainer.loop import run_worker
from embshard.trainer.method import CheckpointTransforms, EmbeddingMethod

pytestmark = pytest.mark.slow  # an external server process per test
RETRY_SECONDS = 1  # the retry window of a reached store that goes away: short, but exercised


@pytest.fixture
def own_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[S3Bucket]:
    """A server of this test's own (it will be killed or have its key revoked), its variables in
    the environment, and a bucket."""
    # s3fs (DCP's checkpoint I/O) keeps one client per process, built from the environment of its
    # first use: one of another test's server would point at that (dead) endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    with s3_server(tmp_path / "moto.log") as server:
        use(server, monkeypatch)
        monkeypatch.setenv("EMBSHARD_STORAGE_RETRY_SECONDS", str(RETRY_SECONDS))
        bucket = bucket_name(request)
        server.client().create_bucket(Bucket=bucket)
        yield S3Bucket(server, bucket)
    s3fs.S3FileSystem.clear_instance_cache()


def use(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)


def test_server_killed_while_reading_batches_is_one_line(own_s3: S3Bucket) -> None:
    uri = own_s3.uri("data")
    synthesize(uri, rows=35000, max_cardinality=500)  # 28,000 train rows: 4 row groups of 8,192
    reader = ParquetBatchReader(uri, "train", 512, prefetch=1)
    batches = iter(reader)
    next(batches)  # the first row group is read; the second is read only after 16 batches
    own_s3.server.kill()
    with pytest.raises(StorageError) as raised:
        for _ in batches:
            pass
    message = str(raised.value)
    assert message.startswith(f"{uri}/train/part-00000.parquet: cannot reach the storage endpoint "
                              "(check AWS_ENDPOINT_URL / the network) while reading batch 17 of split train")
    assert "\n" not in message


def job(data: Path, out: Path, checkpoints: str | None, max_steps: int) -> JobConfig:
    """A one-rank run of `max_steps` steps of 256 rows, checkpointing every 2 steps; planned."""
    cfg = JobConfig(output_dir=str(out),
                    data=DataConfig(path=str(data), batch_size=256, eval_batch_size=1024, prefetch=2),
                    train=TrainConfig(progress=False, max_steps=max_steps), cluster=ClusterConfig(workers=1),
                    checkpoint=CheckpointConfig(dir=checkpoints, every_steps=2, keep=2))
    plan_for_training(cfg)
    return cfg


class StoreFailsAtSave(EmbeddingMethod):
    """The planned method, whose `at_save`-th checkpoint makes the store fail once the step's
    `.tmp` prefix is started, just before DCP writes the model state into it."""

    def __init__(self, fail: Callable[[], None], at_save: int) -> None:
        self.fail, self.at_save, self.saves = fail, at_save, 0

    def checkpoint_transforms(self, cfg: JobConfig, sharded: Any, metrics: Any) -> CheckpointTransforms:
        transforms = super().checkpoint_transforms(cfg, sharded, metrics)
        return replace(transforms, before_save=[*transforms.before_save, self._save])

    def _save(self, state: dict[str, Any]) -> dict[str, Any]:
        self.saves += 1
        if self.saves == self.at_save:
            self.fail()
        return state


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("failure", ["revoke", "kill"])
def test_store_failing_while_saving_a_checkpoint_is_one_line_and_the_earlier_one_resumes(
        own_s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    data = profiled_synth(tmp_path / "data", rows=3000, max_cardinality=500)  # local: only checkpoints fail
    checkpoints = own_s3.uri("run/checkpoints")
    cfg = job(data, tmp_path / "run", checkpoints, max_steps=4)
    server = own_s3.server
    with pytest.raises(StorageError) as raised:
        run_worker(cfg, method=StoreFailsAtSave(server.revoke if failure == "revoke" else server.kill, at_save=2))
    why = ("access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" if failure == "revoke" else
           "cannot reach the storage endpoint (check AWS_ENDPOINT_URL / the network)")
    assert str(raised.value).startswith(f"{checkpoints}/step-000004.tmp")
    assert str(raised.value).endswith(f": {why} while saving checkpoint step 4 (earlier checkpoints are kept)")
    if failure == "kill":
        return  # moto keeps its objects in memory: they went with the process

    use(server.grant(), monkeypatch)  # the store is back, with a new key
    s3fs.S3FileSystem.clear_instance_cache()  # as a rerun's new process: no client holding the old key
    assert not [k for k in own_s3.keys("run/") if "step-000004/" in k]  # nothing under the final name
    directory = location(checkpoints)
    assert [p.name for p in complete_checkpoints(directory)] == ["step-000002"]
    verify(directory / "step-000002")
    summary = run_worker(cfg)
    assert summary["resumed_from"] == f"{checkpoints}/step-000002"
    assert summary["steps"] == 4 and summary["checkpoint"] == f"{checkpoints}/step-000004"


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory: pytest.TempPathFactory, process_group: None) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cfg = job(profiled_synth(root / "data", rows=3000, max_cardinality=500), root / "run", None, max_steps=2)
    run_worker(cfg)
    return Path(cfg.checkpoint_dir) / "step-000002"


@pytest.mark.usefixtures("process_group")
def test_store_failing_while_a_checkpoint_is_verified_sets_nothing_aside(
        own_s3: S3Bucket, local_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume's verification meets a refusing store: that is the error, not a damaged checkpoint."""
    step = location(own_s3.uri("ck/step-000002"))
    copytree(local_checkpoint, step)
    keys = own_s3.keys("ck/")
    own_s3.server.revoke()
    with pytest.raises(StorageError, match=rf"^{step}/\S+: access denied \(check AWS_ACCESS_KEY_ID / "
                                           rf"AWS_SECRET_ACCESS_KEY\) while verifying checkpoint {step}$"):
        CheckpointManager(step.parent).select([step])
    use(own_s3.server.grant(), monkeypatch)
    assert own_s3.keys("ck/") == keys  # still step-000002, not set aside as damaged
    assert CheckpointManager(step.parent).select([step]) == step


@pytest.mark.parametrize("when", ["reading the checkpoint", "uploading"])
def test_server_killed_during_export_is_one_line(own_s3: S3Bucket, local_checkpoint: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], when: str) -> None:
    """`embshard export` from a checkpoint in the bucket (the server dies as DCP starts reading it),
    or from a local one into the bucket (it dies after the first object is uploaded)."""
    serving = own_s3.uri("serving")
    source: Any = local_checkpoint
    if when == "uploading":
        copy = storage.copy_file

        def copy_then_die(*args: Any) -> None:
            copy(*args)
            own_s3.server.kill()

        monkeypatch.setattr(storage, "copy_file", copy_then_die)
    else:
        source = location(own_s3.uri("ck/step-000002"))
        copytree(local_checkpoint, source)
        reader = export.checkpoint_reader

        def die_then_read(path: Any) -> Any:
            own_s3.server.kill()
            return reader(path)

        monkeypatch.setattr(export, "checkpoint_reader", die_then_read)
    with pytest.raises(StorageError) as raised:
        export.export_serving(str(source), serving)
    message = str(raised.value)
    # An export is uploaded to a staging prefix beside --out, and copied into place once complete.
    where = own_s3.uri(".serving.partial-") if when == "uploading" else str(source)
    assert message.startswith(where), message
    assert ": cannot reach the storage endpoint (check AWS_ENDPOINT_URL / the network)" in message
    assert message.endswith(f" while exporting {source} to {serving}") and "\n" not in message
    if when == "uploading":  # the clean-up cannot reach the store either: said once
        [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
        assert warning.startswith(f"warning: {where}") and warning.endswith(
            ": 1 objects of an unfinished upload left (without serving.json, so nothing reads them)"), warning


def test_output_dir_as_a_uri_is_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("output_dir: s3://bkt/run\n")
    with pytest.raises(ConfigError, match=rf"^{config}: output_dir: 's3://bkt/run' is a URI, but the run folder "
                                          r"\(plan, summary, logs\) must be a local or shared folder"):
        load_job_config(config)


@pytest.mark.ray
def test_server_killed_while_ray_workers_read_is_one_line_on_the_console(own_s3: S3Bucket, tmp_path: Path) -> None:
    """`embshard train` on a Ray worker reading from the bucket; the server dies once step 2 is
    checkpointed (locally), while the worker still has row groups to read."""
    data = own_s3.uri("data")
    synthesize(data, rows=35000, max_cardinality=500)  # 28,000 train rows: 4 row groups, 32 batches each
    checkpoints = tmp_path / "checkpoints"
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n"
                      f"data: {{path: {data}, batch_size: 256, eval_batch_size: 1024, prefetch: 1}}\n"
                      f"train: {{progress: false}}\ncluster: {{workers: 1}}\n"
                      f"checkpoint: {{dir: {checkpoints}, every_steps: 2}}\n")
    embshard = Path(sys.executable).parent / "embshard"
    with subprocess.Popen([str(embshard), "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=tmp_path) as run:
        deadline = time.monotonic() + 300
        # Any checkpoint: step 2's was pruned (keep) before this loop saw it on a fast run, which
        # then read every row group, ended 0, and only then was its server killed.
        while not any(checkpoints.glob("step-*")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        own_s3.server.kill()
        _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    assert "Traceback" not in err
    assert re.fullmatch(
        rf"embshard: error: {data}/train/part-00000\.parquet: cannot reach the storage endpoint \(check "
        r"AWS_ENDPOINT_URL / the network\) while reading batch \d+ of split train \(epoch 0\)",
        err.strip().splitlines()[-1]), err


def test_a_gcs_store_is_retried_for_the_retry_budget_not_pyarrows_fifteen_minutes(monkeypatch) -> None:
    # `--out gs://...` without a network once printed nothing for 15 minutes. (Asking a real GCS
    # endpoint is off limits in tests, so this checks what the file system is built from.)
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    assert storage._bounded("gs://b/x") == "gs://b/x?retry_limit_seconds=2"
    assert storage._bounded("gs://b/x?scheme=http") == "gs://b/x?scheme=http&retry_limit_seconds=2"
    assert storage._bounded("gs://b/x?retry_limit_seconds=9") == "gs://b/x?retry_limit_seconds=9"
    assert storage._bounded("s3://b/x") == "s3://b/x"
    assert storage.RemotePath("gs://b/x").path == "b/x"  # pyarrow takes the bounded URI
