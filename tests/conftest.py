"""Shared fixtures. Real datasets come from ../shared/data (or $EMBSHARD_SHARED_DATA); tests
that need them skip with the reason when they are absent."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBSHARD_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (set EMBSHARD_SHARED_DATA)")
    return path


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


def predict(model, dense, sparse):
    """A TrainModel's output (sharded or not) for raw inputs: the loop's call, labels unused."""
    from embshard.datasets.reader import Batch

    return model(Batch(dense, sparse, dense.new_zeros(dense.shape[0]), {}))[1]
