"""bench/quality.py's converted-dataset cache is keyed by the source data: another source (or the
same file with new content) is converted again instead of reusing whatever the cache holds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import bench_module

from embshard.datasets.schema import DatasetSpec


@pytest.fixture
def quality(tmp_path, monkeypatch):
    module = bench_module("quality")
    monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    return module


def criteo_tsv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(rows):
        dense = [str(rng.randrange(100)) for _ in range(13)]
        sparse = [f"{rng.randrange(20):08x}" for _ in range(26)]
        lines.append("\t".join([str(rng.randrange(2)), *dense, *sparse]))
    path.write_text("\n".join(lines) + "\n")


def test_cache_follows_the_source_data(quality, tmp_path):
    root = tmp_path / "data"
    source = root.joinpath("criteo-kaggle-sample", "train_sample.txt")
    criteo_tsv(source, 300, seed=0)
    first = quality.prepare_dataset("criteo-sample", root)
    assert DatasetSpec.load(first).rows["train"] == 240
    assert quality.prepare_dataset("criteo-sample", root) == first  # same source: reused

    criteo_tsv(source, 500, seed=1)  # the same file name, other data
    second = quality.prepare_dataset("criteo-sample", root)
    assert DatasetSpec.load(second).rows["train"] == 400
    assert DatasetSpec.load(first).rows["train"] == 240  # the other source's conversion is kept


def test_the_benchmark_config_is_a_valid_job_config(quality, tmp_path):
    import argparse

    import yaml

    from embshard.config import load_job_config
    from embshard.typed_config import to_dict

    args = argparse.Namespace(dim=64, alpha=0.3, epochs=2)
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(to_dict(quality.job_config("movielens-1m", tmp_path / "data", args))))
    cfg = load_job_config(path, [])
    assert cfg.embeddings.dim == 64 and cfg.embeddings.mde.mode == "within" and cfg.data.batch_size == 1024
    assert cfg.train.epochs == 2 and cfg.model.over_arch == [128, 64]
