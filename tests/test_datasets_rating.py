"""MovieLens' rating target (matrix factorisation's data): every rating, 3s included, is the label,
with only the user and item ids as features; the click target still drops the neutral 3s."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from movielens_fixture import write_ml1m_like

from embshard.datasets.cli import register
from embshard.datasets.convert import convert
from embshard.datasets.schema import SPLITS, DatasetSpec
from embshard.errors import DataError


def _release_with_threes(directory: Path) -> tuple[Path, np.ndarray]:
    """The fixture's release with every fifth rating rewritten to 3; -> the folder and all ratings."""
    src = write_ml1m_like(directory, users=60, movies=40, per_user=10)
    lines = (src / "ratings.dat").read_text().splitlines()
    rewritten = []
    for i, line in enumerate(lines):
        user, movie, rating, when = line.split("::")
        rewritten.append(f"{user}::{movie}::{3 if i % 5 == 0 else rating}::{when}")
    (src / "ratings.dat").write_text("\n".join(rewritten) + "\n")
    return src, np.array([float(r.split("::")[2]) for r in rewritten])


def _labels(root: Path) -> np.ndarray:
    return np.concatenate([pq.read_table(root / s, columns=["label"])["label"].to_numpy() for s in SPLITS])


def test_rating_target_keeps_every_rating_as_the_label(tmp_path: Path) -> None:
    src, ratings = _release_with_threes(tmp_path / "ml")
    spec = convert("movielens", src, tmp_path / "rating", target="rating", split="random", min_count=1)
    assert spec.target == "rating" and DatasetSpec.load(tmp_path / "rating").target == "rating"
    assert sum(spec.rows.values()) == len(ratings)
    labels = _labels(tmp_path / "rating")
    # The labels are the ratings themselves (the multiset; rows are shuffled by the split).
    np.testing.assert_array_equal(np.sort(labels), np.sort(ratings))
    assert (labels == 3).sum() == (ratings == 3).sum() > 0
    assert spec.sparse_names == ["userId", "movieId"]
    assert spec.catalog is not None and spec.catalog.features == []
    # The raw rating column agrees with the label row by row.
    table = pq.read_table(tmp_path / "rating" / "train", columns=["label", "rating"])
    np.testing.assert_array_equal(table["label"].to_numpy(), table["rating"].to_numpy())


def test_click_target_still_drops_neutral_ratings(tmp_path: Path) -> None:
    src, ratings = _release_with_threes(tmp_path / "ml")
    spec = convert("movielens", src, tmp_path / "click", split="random", min_count=1)
    assert spec.target == "click"
    assert sum(spec.rows.values()) == (ratings != 3).sum()
    assert set(np.unique(_labels(tmp_path / "click"))) == {0.0, 1.0}
    assert "genres" in spec.sparse_names


def test_rating_target_is_refused_for_click_logs(tmp_path: Path) -> None:
    log = tmp_path / "train.txt"
    log.write_text("1\t" + "\t".join(["1"] * 13 + ["0000abcd"] * 26) + "\n")
    with pytest.raises(DataError, match="target 'rating': criteo logs hold clicks"):
        convert("criteo", log, tmp_path / "c", target="rating")


def test_cli_target_rating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, ratings = _release_with_threes(tmp_path / "ml")
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "convert", "movielens", str(src), "--out", str(tmp_path / "r"),
                              "--target", "rating", "--split", "random"])
    assert args.func(args) == 0
    assert f"mean rating {ratings.mean():.3f}" in capsys.readouterr().out
    assert DatasetSpec.load(tmp_path / "r").target == "rating"
