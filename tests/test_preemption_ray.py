"""Graceful preemption on Ray: SIGTERM to one Ray Train worker process (whose training runs in a
non-main thread) makes every rank stop after the same step with a checkpoint there, and the same
job run again resumes from it and finishes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import profiled_synth

from embshard.cluster.launch import plan_for_training, train_on_ray
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    JobConfig,
    TrainConfig,
)
from embshard.errors import Interrupted
from embshard.trainer.checkpoint import MANIFEST
from embshard.trainer.loop import SUMMARY_FILE

pytestmark = pytest.mark.slow
SIGNAL_AFTER = 20  # SIGTERM once this periodic checkpoint exists: the run is mid-epoch by then


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("data"), rows=20000, max_cardinality=5000)


@pytest.fixture(scope="module")
def ray_session():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def job(dataset: Path, out: Path) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=128, eval_batch_size=2048, prefetch=2),
        train=TrainConfig(epochs=2, progress=False),
        cluster=ClusterConfig(workers=2, max_failures=0),  # a worker that dies fails the test
        checkpoint=CheckpointConfig(every_steps=10, keep=2),
    )


def train_workers() -> list[int]:
    """Pids of the Ray Train workers under this process (the local cluster's raylet is our
    descendant), so other jobs on the machine are never signalled."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - ours
        ours |= frontier
    workers = []
    for pid in ours:
        try:
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                workers.append(pid)
        except OSError:
            continue
    return sorted(workers)


def sigterm_one_worker_after(checkpoint: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = train_workers()
    if checkpoint.exists() and workers:
        os.kill(workers[-1], signal.SIGTERM)
        killed.append(workers[-1])


def test_sigterm_to_a_worker_checkpoints_every_rank_and_resumes(dataset, tmp_path, ray_session):
    cfg = job(dataset, tmp_path)
    plan_for_training(cfg)
    killed: list[int] = []
    killer = threading.Thread(
        target=sigterm_one_worker_after,
        args=(cfg.checkpoint_dir / f"step-{SIGNAL_AFTER:06d}", killed), daemon=True)
    killer.start()
    # Stopped before its end, the run is no result: it returned one, and `train` ended 0, so a job
    # system took the part of a run for the whole.
    with pytest.raises(Interrupted, match=r"^stopped by SIGTERM to its workers \(a preempted pod\?\) after step \d+, "
                                          r"before its end; checkpoint .*; run the same command again to continue$"):
        train_on_ray(cfg)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was signalled"
    preempted = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert preempted["preempted"] and preempted["restarts"] == 0  # stopped, did not die
    assert SIGNAL_AFTER <= preempted["steps"]
    stopped_at = cfg.checkpoint_dir / f"step-{preempted['steps']:06d}"
    assert preempted["checkpoint"] == str(stopped_at)
    assert (stopped_at / MANIFEST).is_file()

    resumed = train_on_ray(cfg)  # the same job again
    assert resumed["resumed_from"] == str(stopped_at)
    assert not resumed["preempted"] and resumed["restarts"] == 0
    assert resumed["steps"] > preempted["steps"]
    assert resumed["checkpoint"].endswith(f"step-{resumed['steps']:06d}")
