"""Datasets on object storage, against a real S3-compatible server (moto's, in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE, DatasetSpec
from embshard.datasets.storage import RemotePath, location
from embshard.datasets.synth import synthesize
from embshard.datasets.verify import verify_dataset
from embshard.errors import DataError, StorageError

pytestmark = pytest.mark.slow  # an external server process

ROWS = 3000


def test_location_keeps_local_paths(tmp_path) -> None:
    assert location(tmp_path) == tmp_path
    assert location(f"file://{tmp_path}") == tmp_path
    remote = location("s3://bucket/a/b")
    assert isinstance(remote, RemotePath)
    assert str(remote / "c") == "s3://bucket/a/b/c" and remote.name == "b"


def test_synth_to_bucket_reads_like_a_folder(s3, tmp_path) -> None:
    uri = s3.uri("data/synth")
    synthesize(uri, rows=ROWS, max_cardinality=500)
    local = tmp_path / "local"
    synthesize(local, rows=ROWS, max_cardinality=500)
    keys = s3.keys("data/synth/")
    assert f"data/synth/{SPEC_FILE}" in keys and "data/synth/train/part-00000.parquet" in keys
    assert replace(DatasetSpec.load(uri), id="") == replace(DatasetSpec.load(local), id="")  # each writing its id
    verify_dataset(uri)
    remote_batches = list(ParquetBatchReader(uri, "train", 256, seed=3))
    local_batches = list(ParquetBatchReader(local, "train", 256, seed=3))
    assert len(remote_batches) == len(local_batches) > 0
    for a, b in zip(remote_batches, local_batches, strict=True):
        assert a.labels.equal(b.labels) and a.sparse.values().equal(b.sparse.values())


def test_a_uri_with_options_reads_and_writes_below_it(s3, tmp_path) -> None:
    # The options went after each child's name (`data?region=us-east-1/profile`): pyarrow looked for
    # a bucket `data?region=...`, and said "A region must be set".
    from embshard.datasets.profile import write_profile

    uri = s3.uri("my%20data") + "?region=us-east-1"
    synthesize(uri, rows=ROWS, max_cardinality=500)
    verify_dataset(uri)
    assert "my data/train/part-00000.parquet" in s3.keys("my data/")
    assert len(list(ParquetBatchReader(uri, "train", 256, seed=3))) > 0
    # Its entries were named from the URI's text, options and all: no replace or profile passed.
    replaced = synthesize(uri, rows=ROWS, seed=1, max_cardinality=500, overwrite=True)
    write_profile(uri)
    assert DatasetSpec.load(uri) == replaced


def test_a_prefix_whose_own_key_is_an_object_is_refused(s3, tmp_path) -> None:
    # Its objects went below it and listed as no folder: a dataset written there could not be
    # replaced (the old one left unreadable), and a run's checkpoints there were never found (its
    # restart trained from step 0, its `keep` pruned nothing).
    from embshard.cluster.launch import plan_for_training
    from embshard.config import CheckpointConfig, DataConfig, JobConfig

    client = s3.server.client()
    client.put_object(Bucket=s3.name, Key="ds", Body=b"the user's")
    with pytest.raises(StorageError, match=rf"^--out {s3.uri('ds')}: an object is stored under this very key"):
        synthesize(s3.uri("ds"), rows=ROWS, max_cardinality=500)
    synthesize(s3.uri("data"), rows=ROWS, max_cardinality=500)
    client.put_object(Bucket=s3.name, Key="ck", Body=b"the user's")
    cfg = JobConfig(output_dir=str(tmp_path / "run"), data=DataConfig(path=s3.uri("data")),
                    checkpoint=CheckpointConfig(dir=s3.uri("ck")))
    with pytest.raises(StorageError, match=rf"^checkpoint\.dir {s3.uri('ck')}: an object is stored under this very"):
        plan_for_training(cfg)
    assert sorted(k for k in s3.keys() if not k.startswith("data/")) == ["ck", "ds"]
    assert client.get_object(Bucket=s3.name, Key="ds")["Body"].read() == b"the user's"


def test_a_second_writer_of_a_bucket_prefix_on_this_machine_is_refused(s3) -> None:
    # Two `data synth` to one new prefix both said they wrote it, and it held one of them; a
    # profile during a replace said it wrote a profile that held half of the features.
    from conftest import held_elsewhere

    from embshard.datasets.outdir import check_output
    from embshard.datasets.profile import write_profile

    uri = s3.uri("ds")
    first = synthesize(uri, rows=ROWS, max_cardinality=500)
    with held_elsewhere(f"writer_lock(location({uri!r}))") as writing:
        with pytest.raises(DataError, match=rf"^{uri}: another embshard process is writing it \(pid {writing} .*\); "
                                            "wait for it to end"):
            check_output(location(uri), overwrite=True)
        with pytest.raises(DataError, match=rf"another embshard process is writing it \(pid {writing} "):
            synthesize(uri, rows=ROWS, seed=1, max_cardinality=500, overwrite=True)
        with pytest.raises(DataError, match=rf"^{uri}: another embshard process is writing it \(pid {writing} "):
            write_profile(uri)
    new = s3.uri("new")
    with held_elsewhere(f"writer_lock(location({new!r}))"):
        with pytest.raises(DataError, match=rf"^{new}: another embshard process is writing it"):
            synthesize(new, rows=ROWS, max_cardinality=500)
    assert DatasetSpec.load(uri) == first and not s3.keys("new")
    synthesize(uri, rows=ROWS, seed=1, max_cardinality=500, overwrite=True)  # once the other has ended


def test_a_staging_prefix_a_killed_writer_left_is_named(s3, capsys) -> None:
    # SIGKILL during an upload left `.ds.partial-PID-...` in the bucket, and no later write named it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    for name in ("ds", "my%20ds"):  # a name its URI encodes was never matched
        synthesize(s3.uri(name), rows=ROWS, max_cardinality=500)
        left = f".{name}.partial-{pid}-0123abcd"
        s3.server.client().put_object(Bucket=s3.name, Key=f"{left.replace('%20', ' ')}/train/part-00000.parquet",
                                      Body=b"half")
        synthesize(s3.uri(name), rows=ROWS, seed=1, max_cardinality=500, overwrite=True)
        assert (f"warning: {s3.uri(left)}: left by an interrupted write to {s3.uri(name)} (its process {pid} is not "
                "running on this host)") in capsys.readouterr().err


def test_nothing_is_written_inside_a_dataset_in_a_bucket(s3) -> None:
    # Refused for local folders only: a synth (or sweep, or export) inside a dataset in a bucket
    # went through, and the dataset could then never be replaced.
    uri = s3.uri("data/inside")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    with pytest.raises(DataError, match=rf"--out {uri}/sub: inside the dataset {uri}, which holds its own files"):
        synthesize(f"{uri}/sub", rows=ROWS, max_cardinality=100)
    assert not [k for k in s3.keys("data/") if "sub" in k]
    synthesize(uri, rows=ROWS, seed=1, max_cardinality=100, overwrite=True)  # still replaceable


def test_an_output_named_as_a_step_among_a_buckets_checkpoint_steps_is_refused(s3) -> None:
    # Checked for local folders only: a run saving into the bucket prunes it as one of its steps.
    from embshard.datasets.outdir import check_output
    from embshard.datasets.storage import location

    s3.server.client().put_object(Bucket=s3.name, Key="ckpt/step-000004/manifest.json", Body=b'{"files": {}}')
    with pytest.raises(DataError, match=r"/ckpt/step-000099: named as a checkpoint's step, among the steps of "):
        check_output(location(s3.uri("ckpt/step-000099")), False)
    check_output(location(s3.uri("exports/step-000099")), False)


def test_a_dataset_replaced_in_a_bucket_mid_file_is_said_as_replaced(s3, monkeypatch) -> None:
    # The replaced part file's next row group read as garbage: a store's error ("Couldn't
    # deserialize thrift"), which a run would retry, instead of the dataset's replacement.
    from embshard.datasets import writer

    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 100)
    uri = s3.uri("data/moving")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    batches = iter(ParquetBatchReader(uri, "train", 50, prefetch=1))
    next(batches)
    synthesize(uri, rows=ROWS * 2, seed=7, max_cardinality=50, overwrite=True)
    with pytest.raises(DataError, match=r"the dataset was replaced while split train \(epoch 0\) read it"):
        for _ in batches:
            pass


def test_non_empty_prefix_needs_overwrite_and_a_dataset(s3) -> None:
    uri = s3.uri("data/x")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    with pytest.raises(DataError, match="--overwrite"):
        synthesize(uri, rows=ROWS, max_cardinality=100)
    before = s3.keys("data/")
    synthesize(uri, rows=ROWS, seed=5, max_cardinality=100, overwrite=True)
    assert DatasetSpec.load(uri).rows["train"] == ROWS * 8 // 10
    assert s3.keys("data/") == before  # the same objects, replaced; no staging prefix left behind
    # Nor its empty folder markers (train/, profile/, ...), which stayed in the bucket for good.
    assert not [k for k in s3.server.keys(s3.name, "data/") if ".partial-" in k]
    with pytest.raises(DataError, match="a bucket itself"):
        synthesize(f"s3://{s3.name}", rows=ROWS, max_cardinality=100)
    s3.server.client().put_object(Bucket=s3.name, Key="notes/readme.txt", Body=b"mine")
    with pytest.raises(DataError, match="no dataset"):
        synthesize(s3.uri("notes"), rows=ROWS, max_cardinality=100, overwrite=True)
    assert s3.keys("notes/") == ["notes/readme.txt"]


def test_a_stop_during_a_replace_in_a_bucket_waits_for_it(s3, monkeypatch, python_ctrl_c) -> None:
    # A stop after the old dataset's dataset.json was deleted left the prefix empty or half copied,
    # and said the new one was complete at a staging prefix that had lost its dataset.json.
    import os
    import signal

    from embshard.datasets import outdir
    from embshard.errors import Interrupted

    uri = s3.uri("data/swap")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    rmtree = outdir.rmtree

    def stopped_removal(path):
        if str(path) == uri:  # the old dataset's removal
            os.kill(os.getpid(), signal.SIGINT)
        return rmtree(path)

    monkeypatch.setattr(outdir, "rmtree", stopped_removal)
    with pytest.raises(Interrupted, match=rf"^stopped once {uri} was written whole$"):
        synthesize(uri, rows=ROWS * 2, seed=1, max_cardinality=100, overwrite=True)
    assert DatasetSpec.load(uri).rows["train"] == ROWS * 2 * 8 // 10
    verify_dataset(uri)
    assert not [k for k in s3.server.keys(s3.name, "data/") if ".partial-" in k]


def test_an_upload_stopped_midway_leaves_nothing_in_the_bucket(s3, monkeypatch) -> None:
    # Its objects were deleted, but the store kept their "folder" as an empty marker object:
    # `.data.partial-<pid>-<hex>/` in the bucket for good, without a word.
    from embshard.datasets import storage

    copy = storage.copy_file
    copied = []

    def stopped_at_the_third(*args):
        if len(copied) == 2:
            raise KeyboardInterrupt
        copied.append(args)
        return copy(*args)

    monkeypatch.setattr(storage, "copy_file", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        synthesize(s3.uri("data/new"), rows=ROWS, max_cardinality=100)
    assert not [k for k in s3.server.keys(s3.name, "data/") if ".partial-" in k]


def test_a_replace_cut_short_in_a_bucket_names_the_complete_copy(s3) -> None:
    # Killed while the new dataset was copied into place: the prefix has no dataset.json, the
    # staging prefix beside it has the whole dataset, and every later run was refused, even with
    # --overwrite, without a word of where the new dataset was.
    uri = s3.uri("data/cut")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    client = s3.server.client()
    staged = "data/.cut.partial-999999-0badc0de"
    for key in s3.keys("data/cut/"):
        client.copy_object(Bucket=s3.name, Key=staged + key[len("data/cut"):],
                           CopySource={"Bucket": s3.name, "Key": key})
    client.delete_object(Bucket=s3.name, Key=f"data/cut/{SPEC_FILE}")
    with pytest.raises(DataError, match=rf"^{uri}: holds no {SPEC_FILE}, and s3://{s3.name}/{staged} holds the "
                                        r"complete dataset a replace was copying there"):
        synthesize(uri, rows=ROWS, max_cardinality=100, overwrite=True)
    assert DatasetSpec.load(f"s3://{s3.name}/{staged}").rows["train"] == ROWS * 8 // 10


def test_prefix_without_dataset_json_is_refused(s3) -> None:
    uri = s3.uri("data/half")
    synthesize(uri, rows=ROWS, max_cardinality=100)
    s3.server.client().delete_object(Bucket=s3.name, Key=f"data/half/{SPEC_FILE}")
    with pytest.raises(DataError, match=f"{SPEC_FILE}: missing"):
        verify_dataset(uri)


def test_missing_bucket_is_one_line(s3) -> None:
    with pytest.raises(StorageError, match="s3://no-such-bucket-x/d: the bucket does not exist"):
        DatasetSpec.load("s3://no-such-bucket-x/d")
    with pytest.raises(StorageError, match="the bucket does not exist"):
        synthesize("s3://no-such-bucket-x/d", rows=ROWS, max_cardinality=100)


def test_wrong_credentials_write_nothing(s3, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="access denied"):
        synthesize(s3.uri("data/denied"), rows=ROWS, max_cardinality=100)
    with pytest.raises(StorageError, match="access denied"):
        DatasetSpec.load(s3.uri("data/denied"))
    monkeypatch.undo()
    assert s3.keys() == []


def test_unreachable_endpoint_is_one_line_from_the_cli(s3, tmp_path) -> None:
    env = {**s3.server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard port: refused
    embshard = Path(sys.executable).parent / "embshard"
    run = subprocess.run([str(embshard), "data", "synth", "--out", s3.uri("data/u"), "--rows", "1000"],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"embshard: error: {s3.uri('data/u')}: cannot reach the storage endpoint "
        "(check AWS_ENDPOINT_URL / the network)")
    assert s3.keys() == []


def test_sweep_merge_reads_and_writes_buckets(s3, capsys) -> None:
    from test_sweep_report import rising, sweep_report_of

    from embshard.cluster.cli import main

    client = s3.server.client()
    for prefix, method in (("a", "uniform"), ("b", "mde")):
        rep = sweep_report_of([p for p in rising() if p["method"] == method], [method])
        client.put_object(Bucket=s3.name, Key=f"sweeps/{prefix}/sweep-tiny.json", Body=json.dumps(rep).encode())
    args = [s3.uri("sweeps/a"), s3.uri("sweeps/b/sweep-tiny.json"), "--out", s3.uri("sweeps/merged")]
    assert main(["sweep-merge", *args]) == 0
    assert sorted(s3.keys("sweeps/merged/")) == [f"sweeps/merged/sweep-tiny.{x}" for x in ("json", "md", "png")]
    merged = json.loads(client.get_object(Bucket=s3.name, Key="sweeps/merged/sweep-tiny.json")["Body"].read())
    assert merged["claim"]["smallest"]["mde"]["ratio_vs_uniform"] == 2.0
    capsys.readouterr()
    for argv, expected in (
        (args, f"--out {s3.uri('sweeps/merged')}: not empty; pass --overwrite"),
        ([s3.uri("sweeps/a"), "--out", "s3://no-such-bucket-x/m"],
         "s3://no-such-bucket-x/m: the bucket does not exist"),
        ([s3.uri("sweeps/none"), "--out", s3.uri("m")], f"{s3.uri('sweeps/none')}: no such sweep folder or report"),
    ):
        assert main(["sweep-merge", *argv]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith(f"embshard: error: {expected}"), err
