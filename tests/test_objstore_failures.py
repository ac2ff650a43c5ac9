"""Object storage failing in the middle of a run, against a real S3-compatible server (moto's, in
its own process, one per test: they kill it or revoke its credentials): one line naming the URI
and what was being done, nothing half-written under a name readers look for, and every earlier
checkpoint intact."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Bucket, S3Server, s3_server

from embshard.cluster.launch import plan_for_training
from embshard.config import CheckpointConfig, ClusterConfig, DataConfig, JobConfig, TrainConfig
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.storage import location
from embshard.datasets.synth import synthesize
from embshard.errors import StorageError
from embshard.trainer.checkpoint import complete_checkpoints
from embshard.trainer.checkpoint_integrity import MANIFEST, verify
from embshard.trainer.loop import run_worker
from embshard.trainer.method import CheckpointTransforms, EmbeddingMethod

pytestmark = pytest.mark.slow  # an external server process per test
RETRY_SECONDS = 1  # the retry window of a reached store that goes away: short, but exercised


@pytest.fixture
def own_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A server of this test's own (it will be killed or have its key revoked), its variables in
    the environment, and a bucket."""
    with s3_server(tmp_path / "moto.log") as server:
        use(server, monkeypatch)
        monkeypatch.setenv("EMBSHARD_STORAGE_RETRY_SECONDS", str(RETRY_SECONDS))
        server.client().create_bucket(Bucket="failures")
        yield S3Bucket(server, "failures")


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
