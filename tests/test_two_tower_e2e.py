"""End to end: `embshard train` with model.arch two_tower on local Ray (2 workers), then
`embshard export` of its checkpoint and the served retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from movielens_fixture import write_ml1m_like
from test_train_e2e import _run

from embshard.datasets.convert import convert
from embshard.datasets.schema import DatasetSpec
from embshard.trainer.models.two_tower_serving import load_retrieval

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_train_two_tower_through_ray_and_serve(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    convert("movielens", write_ml1m_like(tmp_path / "ml"), data, min_count=1)
    train = _run("train", "configs/two-tower-movielens.yaml", "--workers", "2",
                 "--set", f"data.path={data}", "--set", f"output_dir={run}", "--set", "data.batch_size=256",
                 "--set", "train.epochs=3", "--set", "embeddings.dim=16", "--set", "checkpoint.enabled=true")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "validation recall@10" in train.stdout + train.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["valid_primary"] == "recall@10"
    assert summary["last_loss"] < summary["first_loss"]
    # Users love one genre: a model that learned it ranks far better than chance (K / items).
    items = DatasetSpec.load(data).feature("movieId").cardinality
    assert summary["valid_recall@10"] > 2 * 10 / items
    assert summary["valid_recall@10"] <= summary["valid_recall@50"]

    export = _run("export", str(run / "checkpoints"), "--out", str(run / "serving"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert "; it takes raw values of 8 features (vocab/)" in export.stdout
    retrieval = load_retrieval(run / "serving", data)
    assert retrieval.item_vectors.shape == (items - 1, 32)  # every movie but the OOV row
    torch.testing.assert_close(retrieval.item_vectors.norm(dim=1), torch.ones(items - 1))
    # The export carries the dataset's vocabularies: each vector is named by MovieLens' own movie id.
    movies = (tmp_path / "ml" / "movies.dat").read_text().splitlines()
    assert sorted(retrieval.item_values) == sorted(int(line.split("::")[0]) for line in movies)
    assert sorted(p.name for p in (run / "serving" / "vocab").iterdir()) == sorted(
        f"{f}.parquet" for f in DatasetSpec.load(data).sparse_names)


def test_bad_two_tower_config_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    convert("movielens", write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5), data, min_count=1)
    plan = _run("plan", "configs/two-tower-movielens.yaml", "--set", f"data.path={data}",
                "--set", "model.options.item_features=[movieId, rating_count]")
    assert plan.returncode == 2
    assert plan.stderr.strip().splitlines() == [
        "embshard: error: model.options.item_features: unknown feature 'rating_count' (dataset 'ml-1m' has "
        "userId, movieId, gender, age, occupation, zip, year, genres)"]
