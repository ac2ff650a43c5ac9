"""Shared fixtures. Real datasets come from ../shared/data (or $EMBSHARD_SHARED_DATA); tests
that need them skip with the reason when they are absent."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBSHARD_SHARED_DATA", REPO.parent / "shared" / "data"))

# Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s, which
# leaves every run idle for ~5 s after its last step; the suite makes ~25 Ray Train runs on 2
# cores. A local cluster looks more often by itself (launch.local_cluster_env), a `ray start` head
# (tests/test_jobs.py) does not. Set before any test builds a subprocess environment or starts
# Ray, so every run sees it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `make test` runs two pytest workers (pytest-xdist, --dist loadgroup): half the suite's time
    # on 2 cores was idle, waiting on Ray's and the workers' starts. Two Ray tests at once on 2
    # cores (load average 26) starved each other's timing, so the tests that start Ray run one
    # after another, in one worker, beside the rest.
    for item in items:
        if item.get_closest_marker("ray") is not None or "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (set EMBSHARD_SHARED_DATA)")
    return path


def bench_module(name: str) -> ModuleType:
    """A bench/ script imported as a module; bench/ is on the path only while it loads (the scripts
    import their siblings, e.g. `common`)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture
def ml1m_dir() -> Path:
    return shared_file("ml-1m")


@pytest.fixture
def criteo_sample() -> Path:
    return shared_file("criteo-kaggle-sample", "train_sample.txt")


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group on loopback, for in-process tests of distributed code."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def profiled_synth(directory: Path, rows: int, max_cardinality: int, seed: int = 0) -> Path:
    """A small synthetic dataset with its id profile, as `embshard data synth` writes it."""
    from embshard.datasets.synth import synthesize

    synthesize(directory, rows=rows, seed=seed, max_cardinality=max_cardinality)
    return directory


def plan_spec(plan, num_dense: int):
    """The dataset spec an arch builds from, for tests whose plans have no dataset on disk."""
    from embshard.datasets.schema import DatasetSpec, SparseFeature

    return DatasetSpec("test", [f"I{i + 1}" for i in range(num_dense)],
                       [SparseFeature(f, t.num_embeddings) for t in plan.tables for f in t.features])


def uniform_tables(model) -> dict:
    """A uniform plan's tables by feature: one plain table per feature, its rows the vectors."""
    return {k.split(".")[-2].removeprefix("t_"): v
            for k, v in model.state_dict().items() if ".ebc.embedding_bags." in k}


def predict(model, dense, sparse):
    """A TrainModel's output (sharded or not) for raw inputs: the loop's call, labels unused."""
    from embshard.datasets.reader import Batch

    return model(Batch(dense, sparse, dense.new_zeros(dense.shape[0]), {}))[1]


@pytest.fixture(scope="session")
def s3_server_session(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server in its own process (see s3_server.py), shared by a session's tests."""
    from s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("moto") / "server.log") as server:
        yield server


def bucket_name(request: pytest.FixtureRequest) -> str:
    """A bucket named after the test: object-store writes lock their URI on this machine, whatever
    the server, so tests in two pytest-xdist workers, each with its own server, must not share one."""
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")


@pytest.fixture
def s3(s3_server_session, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """The S3 server's variables in this process's environment and a fresh bucket named after the test."""
    from s3_server import S3Bucket

    for name, value in s3_server_session.env.items():
        monkeypatch.setenv(name, value)
    bucket = bucket_name(request)
    s3_server_session.client().create_bucket(Bucket=bucket)
    return S3Bucket(s3_server_session, bucket)


@contextmanager
def ray_with_crash(rank: int, step: int) -> Iterator[None]:
    """A fresh local Ray session whose training workers kill rank `rank` after step `step`
    (trainer/faults.py): ray.init forwards the variable to the workers."""
    import ray

    from embshard.trainer.faults import ENV

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ[ENV] = f"{rank}:{step}"
    if ray.is_initialized():
        ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()
        del os.environ[ENV]


@contextmanager
def held_elsewhere(lock: str) -> Iterator[int]:
    """Another process holding `lock` (a context manager expression over `folder_lock`,
    `file_lock`, `run_lock`, `writer_lock`, `load_job_config`, `location` and `Path`) until the
    block ends, as a command at work there would; yields its pid."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom pathlib import Path\n"
                               "from embshard.cluster.run_lock import file_lock, folder_lock, run_lock\n"
                               "from embshard.config import load_job_config\n"
                               "from embshard.datasets.outdir import writer_lock\n"
                               "from embshard.datasets.storage import location\n"
                               f"with {lock}:\n    print('held', flush=True)\n    time.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def writer_refused(out: Path) -> bool:
    """Whether another process that would write `out` now is refused, as writing it already
    (`writer_lock`, after its wait)."""
    import subprocess

    tried = subprocess.run([sys.executable, "-c", "from pathlib import Path\n"
                            "from embshard.datasets.outdir import writer_lock\n"
                            f"with writer_lock(Path({str(out)!r})):\n    pass\n"],
                           capture_output=True, text=True, timeout=120)
    return tried.returncode != 0 and "another embshard process is writing it" in tried.stderr


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever an earlier test in
    this process left in its place (ray.init installs handlers of its own)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
