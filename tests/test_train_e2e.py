"""End to end: `embshard data synth` then `embshard train` through Ray Train on 2 local workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import profiled_synth

from embshard.trainer.faults import MARKER
from embshard.trainer.restarts import STARTS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EMBSHARD = [sys.executable, "-m", "embshard.cluster.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
REPO = Path(__file__).resolve().parents[1]
# What Ray and the libraries print during every run; the console must show none of it.
NOISE = ("Successfully loaded", "PlacementGroupCleaner", "PreemptionWatcher", "core_worker.cc",
         "is_fx_tracing", "Setting up process group", "TrainController", "RayTrainWorker")


_BAR = re.compile(r"\s*\d+%\|")


def _said(stderr: str) -> list[str]:
    """stderr's lines but the progress bar's: a restarted group's bar takes one line or two, as
    Ray's log batches fall (a run failed once on the count of bar lines, not on what it said)."""
    return [line for line in stderr.strip().split("\n") if line.strip() and not _BAR.match(line.split("\r")[-1])]


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    done = subprocess.run([*EMBSHARD, *args], cwd=cwd, env=env, capture_output=True, timeout=600)
    # Decoded by hand: text=True would turn a progress bar's "\r" redraws into line breaks.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_train_through_ray_learns(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    synth = _run("data", "synth", "--out", str(data), "--rows", "60000", "--max-cardinality", "20000")
    assert synth.returncode == 0, synth.stderr
    train = _run(
        "train", "configs/default.yaml", "--workers", "2",
        "--set", f"data.path={data}", "--set", f"output_dir={run}",
        "--set", "data.batch_size=512", "--set", "train.log_every=5",
        # As the Helm chart sets it: the local cluster must hold the resource (else it waits forever).
        "--set", "cluster.worker_resources={embshard_rank: 1}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    # The summary line shows metrics only (the example count is not one).
    assert re.search(r"validation AUC \d\.\d{4}, logloss \d\.\d{4}; ", train.stdout), train.stdout[-2000:]
    # The console: the plan, one progress bar (its redraws share a line), evaluation lines and the
    # summary; what Ray and the libraries print goes to the run's log instead.
    console = train.stdout + train.stderr
    assert not [n for n in NOISE if n in console], console
    assert len(console.strip().split("\n")) <= 8, console
    assert "step 46: valid AUC" in train.stderr or "step 46: valid AUC" in train.stdout, console
    # The plan line's bytes: the tables', and DLRM's MLPs beside them (they were left out).
    assert re.search(r"per-rank training bytes of the tables 0: [\d.]+ MiB, 1: [\d.]+ MiB, and [\d.]+ [KM]iB of "
                     r"dense layers on every rank", train.stdout), train.stdout[:500]
    log = (run / "logs" / "embshard.log").read_text()
    assert "Successfully loaded" in log and "RayTrainWorker" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 48000 // 2 // 512  # both ranks take the same number of full batches
    assert summary["samples"] == summary["steps"] * 512 * 2
    assert summary["last_loss"] < summary["first_loss"]
    # The hidden model's Bayes AUC is ~0.8; one short epoch must get clearly above chance.
    assert summary["valid_auc"] > 0.65
    plan = json.loads((run / "plan" / "plan.json").read_text())
    assert plan["shard_plan"]["topology"]["world_size"] == 2


def _poison(data: Path, column: str, row: int, value: int) -> Path:
    """Writes `value` into one id of the first training part, the way a bad converter would."""
    part = sorted((data / "train").glob("*.parquet"))[0]
    table = pq.read_table(part)
    ids = table.column(column).to_pylist()
    ids[row] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(ids, table.schema.field(i).type))
    pq.write_table(table, part)
    return part


def test_bad_input_in_a_worker_is_one_line(tmp_path):
    data, run = profiled_synth(tmp_path / "data", rows=6000, max_cardinality=2000), tmp_path / "run"
    part = _poison(data, "C2", 123, -7)
    cardinality = next(f["cardinality"] for f in json.loads((data / "dataset.json").read_text())["sparse"]
                       if f["name"] == "C2")
    # Unlimited worker-group restarts: bad input must still end the run at once (cluster/fatal.py),
    # not be retried forever, even where the run folder takes no record (a full disk; here a file
    # where the records' folder was): the record was a file there, and Ray restarted for ever.
    run.mkdir()
    (run / "fatal").write_text("not a folder")
    train = _run("train", "configs/default.yaml", "--workers", "2", "--set", f"data.path={data}",
                 "--set", f"output_dir={run}", "--set", "data.batch_size=512", "--set", "cluster.max_failures=-1")
    lines = train.stderr.strip().split("\n")
    assert train.returncode == 2, train.stderr[-3000:]
    assert lines[-1] == f"embshard: error: {part}: column 'C2', row 123: id -7 outside [0, {cardinality})"
    assert (run / STARTS_FILE).read_text().strip() == "1"  # the restarted group did not train again
    # Nothing but a progress bar before it: no worker tracebacks, nothing from Ray.
    assert _said(train.stderr) == [lines[-1]], train.stderr
    assert not [n for n in (*NOISE, "Traceback") if n in train.stderr], train.stderr
    log = (run / "logs" / "embshard.log").read_text()
    assert "Traceback" in log and "id -7 outside" in log


def test_a_worker_crash_is_one_line_and_a_log(tmp_path):
    data, run = profiled_synth(tmp_path / "data", rows=6000, max_cardinality=2000), tmp_path / "run"
    train = _run("train", "configs/default.yaml", "--workers", "2", "--set", f"data.path={data}",
                 "--set", f"output_dir={run}", "--set", "data.batch_size=512",
                 env={**ENV, "EMBSHARD_CRASH_AT": "1:2"})  # rank 1 dies (os._exit) after step 2
    lines = train.stderr.strip().split("\n")
    log = run / "logs" / "embshard.log"
    assert train.returncode == 1, train.stderr[-3000:]
    # Rank 1 died; rank 0 only lost its peer: the line names the cause, not the echo.
    assert lines[-1].startswith("embshard: crashed: rank 1: "), train.stderr
    assert lines[-1].endswith(f"(full traceback: {log.resolve()})")
    assert _said(train.stderr) == [lines[-1]] and "Traceback" not in train.stderr, train.stderr
    assert "Traceback" in log.read_text()
    # Nor the raylet's 900-character paragraph on stdout ("(raylet) A worker died or was killed ...").
    assert "A worker died" not in train.stdout, train.stdout


BUGGY_MODEL = """
from torch import nn


class Buggy(nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings
        self.out = nn.Linear(1, 1)
        self.calls = 0

    def forward(self, dense, sparse):
        self.calls += 1
        if self.calls == 3:
            raise TypeError("a bug on the third batch")
        return self.out(self.embeddings(sparse).values().sum(dim=1, keepdim=True)).squeeze(-1)


def build(embeddings, spec, options):
    return Buggy(embeddings)
"""


def test_a_bug_in_a_forward_is_retried_once_not_for_ever(tmp_path):
    # Under `max_failures: -1` a model that raises on its third batch restarted the worker group
    # for ever: every restart resumed and raised again at the same step.
    data, run = profiled_synth(tmp_path / "data", rows=6000, max_cardinality=2000), tmp_path / "run"
    (tmp_path / "buggy.py").write_text(BUGGY_MODEL)
    train = _run("train", "configs/default.yaml", "--workers", "2", "--set", f"data.path={data}",
                 "--set", f"output_dir={run}", "--set", "data.batch_size=512", "--set", "model.arch=buggy:build",
                 "--set", "cluster.max_failures=-1", "--set", "checkpoint.every_steps=100",
                 env={**ENV, "PYTHONPATH": str(tmp_path)})
    lines = train.stderr.strip().split("\n")
    assert train.returncode == 2, train.stderr[-3000:]
    where = re.escape(f"{tmp_path / 'buggy.py'}:15")
    assert re.fullmatch(rf"embshard: error: rank [01]: TypeError: a bug on the third batch at {where}; "
                        r"raised again the same way after Ray restarted the worker group, so it is not retried "
                        r"\(a bug, not a lost worker\)", lines[-1]), lines[-1]
    # The first group and one restart; one more where Ray ended a rank before it could say its
    # crash (each rank compares only its own).
    assert int((run / STARTS_FILE).read_text()) in (2, 3)
    assert _said(train.stderr) == [lines[-1]] and "Traceback" not in train.stderr, train.stderr


def test_a_hung_worker_ends_the_run_in_one_line(tmp_path):
    # A stopped or stuck worker (SIGSTOP, a deadlock) held the run for good: the other rank waited
    # in its collective with Ray's 30-minute default and nothing said why.
    data, run = profiled_synth(tmp_path / "data", rows=6000, max_cardinality=2000), tmp_path / "run"
    train = _run("train", "configs/default.yaml", "--workers", "2", "--set", f"data.path={data}",
                 "--set", f"output_dir={run}", "--set", "data.batch_size=512",
                 "--set", "cluster.collective_timeout_s=5",
                 env={**ENV, "EMBSHARD_CRASH_AT": "1:2:hang"})  # rank 1 stops after step 2
    lines = train.stderr.strip().split("\n")
    assert train.returncode == 1, train.stderr[-3000:]
    assert lines[-1].startswith("embshard: crashed: rank 0: waited 5 s in a collective for a rank that did not "
                                "come (a worker hung, stopped or far slower; cluster.collective_timeout_s)"), lines[-1]
    assert _said(train.stderr) == [lines[-1]] and "Traceback" not in train.stderr, train.stderr
    assert (run / MARKER).is_file()  # the injected hang, not some earlier wait, timed out


def test_verbose_shows_what_the_log_keeps(tmp_path):
    data, run = profiled_synth(tmp_path / "data", rows=6000, max_cardinality=2000), tmp_path / "run"
    train = _run("train", "configs/default.yaml", "--workers", "2", "--set", f"data.path={data}",
                 "--set", f"output_dir={run}", "--set", "data.batch_size=512", "--set", "train.max_steps=2",
                 "--verbose")
    assert train.returncode == 0, train.stderr[-3000:]
    console = train.stdout + train.stderr
    assert "(RayTrainWorker pid=" in console and "Successfully loaded" in console
    assert "validation AUC" in train.stdout
    assert "Successfully loaded" in (run / "logs" / "embshard.log").read_text()
