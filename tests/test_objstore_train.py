"""The object-storage round trip on a real S3-compatible server (moto's, in its own process):
synth into the bucket -> train on 2 Ray workers reading from it -> checkpoints into it -> a
worker dies -> resume from the bucket -> export into the bucket. And the failures a user meets
first (missing bucket, wrong credentials, unreachable endpoint): one line, nothing half-written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import ray_with_crash
from test_checkpoint_integrity import Planted

from embshard.cluster.launch import plan_for_training, train_on_ray
from embshard.config import CheckpointConfig, ClusterConfig, DataConfig, JobConfig, TrainConfig
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.storage import location
from embshard.datasets.synth import synthesize
from embshard.errors import StorageError
from embshard.trainer.checkpoint import CheckpointManager, complete_checkpoints
from embshard.trainer.checkpoint_integrity import MANIFEST, DamagedCheckpoint, checkpoint_reader
from embshard.trainer.export import MANIFEST as SERVING_MANIFEST
from embshard.trainer.export import ExportError, export_serving, load_serving
from embshard.trainer.faults import MARKER
from embshard.trainer.loop import run_worker

pytestmark = pytest.mark.slow
ROWS = 12000  # 9,600 train rows: 9 steps of 2 x 512
CRASH_STEP = 6  # rank 1 dies after step 6; the last checkpoint before it is step 4


@pytest.fixture
def ray_session():
    with ray_with_crash(1, CRASH_STEP):
        yield


def job(data: str, checkpoints: str, out: Path, ray_storage: str | None = None) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=data, batch_size=512, eval_batch_size=2048, prefetch=2),
        train=TrainConfig(progress=False),
        cluster=ClusterConfig(workers=2, max_failures=1, storage=ray_storage),
        checkpoint=CheckpointConfig(dir=checkpoints, every_steps=4, keep=2),
    )


def test_bucket_round_trip_survives_a_worker_death(s3, tmp_path, ray_session) -> None:
    data, checkpoints, serving = s3.uri("data"), s3.uri("run/checkpoints"), s3.uri("serving")
    synthesize(data, rows=ROWS, max_cardinality=2000)
    cfg = job(data, checkpoints, tmp_path / "run", ray_storage=s3.uri("ray"))
    plan_for_training(cfg)
    summary = train_on_ray(cfg)

    assert (tmp_path / "run" / MARKER).is_file()  # rank 1 really died
    assert summary["restarts"] == 1
    assert summary["resumed_from"] == f"{checkpoints}/step-{4:06d}"
    assert summary["steps"] == ROWS * 8 // 10 // 1024  # none twice, none skipped
    assert summary["checkpoint"] == f"{checkpoints}/step-{summary['steps']:06d}"
    steps = [p.name for p in complete_checkpoints(cfg.checkpoint_dir)]
    assert steps == [f"step-{summary['steps']:06d}", "step-000008"]  # keep=2 pruned in the bucket
    assert not [k for k in s3.keys("run/") if ".tmp/" in k]  # every staging prefix went away
    assert f"run/checkpoints/step-{summary['steps']:06d}/{MANIFEST}" in s3.keys("run/")
    assert s3.keys("ray/")  # Ray Train's run state went to the bucket too

    export_serving(checkpoints, serving)
    assert f"serving/{SERVING_MANIFEST}" in s3.keys("serving/")
    model = load_serving(serving)
    batch = next(iter(ParquetBatchReader(data, "test", 256, shuffle=False)))
    with torch.no_grad():
        logits = model(batch.dense, batch.sparse)
    assert logits.shape[0] == 256 and torch.isfinite(logits).all()


def test_damaged_checkpoint_in_bucket_is_set_aside_not_deleted(s3, tmp_path, process_group) -> None:
    """A step whose files do not verify is copied aside whole (S3 has no rename) and named."""
    client, bucket = s3.server.client(), s3.name
    for name, body in ((MANIFEST, b'{"files": {"a.distcp": {"bytes": 3, "sha256": "00"}}}'),
                       ("a.distcp", b"abc")):
        client.put_object(Bucket=bucket, Key=f"ck/step-000004/{name}", Body=body)
    manager = CheckpointManager(s3.uri("ck"))
    assert manager.select(complete_checkpoints(manager.directory)) is None
    assert "a.distcp: content differs" in manager.rejected[0][1]
    assert s3.keys("ck/") == ["ck/step-000004.damaged/a.distcp", f"ck/step-000004.damaged/{MANIFEST}"]
    assert client.get_object(Bucket=bucket, Key="ck/step-000004.damaged/a.distcp")["Body"].read() == b"abc"
    assert complete_checkpoints(manager.directory) == []  # nothing left for a resume to trip over


def test_planted_metadata_in_bucket_is_refused_unread(s3, tmp_path) -> None:
    """DCP's metadata read over fsspec goes through the same restricted unpickler."""
    marker = tmp_path / "planted-ran"
    s3.server.client().put_object(Bucket=s3.name, Key="ck/step-000001/.metadata", Body=pickle.dumps(Planted(marker)))
    with pytest.raises(DamagedCheckpoint, match=r"\.metadata.*refusing to load pathlib"):
        checkpoint_reader(location(s3.uri("ck/step-000001"))).read_metadata()
    assert not marker.exists()


def test_checkpoint_dir_in_missing_bucket_is_refused_before_training(s3, tmp_path) -> None:
    data = s3.uri("data")
    synthesize(data, rows=2000, max_cardinality=100)
    cfg = job(data, "s3://no-such-bucket-ck/run", tmp_path / "run")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-ck/run: the bucket does not exist$"):
        plan_for_training(cfg)


@pytest.mark.parametrize("env, why", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the storage endpoint"),
])
def test_export_with_bad_access_is_one_line_and_writes_nothing(s3, monkeypatch, env, why) -> None:
    client = s3.server.client()
    client.put_object(Bucket=s3.name, Key=f"ck/step-000002/{MANIFEST}", Body=b"{}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match=why) as raised:
        export_serving(s3.uri("ck"), s3.uri("serving"))
    assert "\n" not in str(raised.value)
    assert s3.keys() == [f"ck/step-000002/{MANIFEST}"]


def test_export_into_a_prefix_that_is_no_export_is_refused_first(s3) -> None:
    s3.server.client().put_object(Bucket=s3.name, Key="models/notes.txt", Body=b"mine")
    # Refused before the (here missing) checkpoint is even looked at, and not advised --overwrite,
    # which would be refused too.
    with pytest.raises(ExportError, match=r"models: not empty and holds no serving\.json, so it is no export; "
                                          r"refusing to replace it$"):
        export_serving(s3.uri("no-checkpoint-here"), s3.uri("models"))
    with pytest.raises(ExportError, match=r"models: not empty and holds no serving\.json.*, even with --overwrite$"):
        export_serving(s3.uri("no-checkpoint-here"), s3.uri("models"), overwrite=True)
    assert s3.keys() == ["models/notes.txt"]


@pytest.mark.usefixtures("process_group")
def test_a_checkpoint_dir_with_a_percent_escape_saves_resumes_and_exports(s3, tmp_path) -> None:
    # pyarrow decodes `%20` and DCP's s3fs took it as it was: every step's manifest and config went
    # to `sp ace/`, its weights to `sp%20ace/`, and the step passed as whole, so the run said it
    # had saved while no resume or export could ever load it.
    from conftest import profiled_synth
    from test_objstore_failures import job

    data = profiled_synth(tmp_path / "data", rows=3000, max_cardinality=500)
    checkpoints = s3.uri("sp%20ace/ck")
    run_worker(job(data, tmp_path / "run", checkpoints, max_steps=2))
    assert {k.split("/")[0] for k in s3.keys()} == {"sp ace"}
    summary = run_worker(job(data, tmp_path / "run", checkpoints, max_steps=4))
    assert summary["resumed_from"] == f"{checkpoints}/step-000002"
    served = export_serving(checkpoints, s3.uri("sp%20ace/serving"))
    assert load_serving(served) is not None
    assert {k.split("/")[0] for k in s3.keys()} == {"sp ace"}
