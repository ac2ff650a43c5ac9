"""Converters' OOV id and splits: the OOV row trains by default, OOV shares are reported and
recorded, and the time / random / leave-last / official ML-100K splits put rows where they say."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embshard.datasets.cli import register
from embshard.datasets.convert import convert
from embshard.datasets.schema import SPLITS, DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.errors import DataError


def _criteo_file(path: Path, rows: int, seed: int = 0) -> Path:
    """Criteo-shaped lines whose C1 values follow a long tail: many values occur once."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        dense = [str(int(x)) for x in rng.integers(0, 50, 13)]
        tail = int(rng.zipf(1.5)) % 10_000
        cats = [f"{tail:08x}"] + [f"{int(rng.integers(0, 4)):08x}" for _ in range(25)]
        lines.append("\t".join([str(int(i % 3 == 0)), *dense, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _ids(root: Path, split: str, column: str) -> np.ndarray:
    return pq.read_table(root / split, columns=[column])[column].to_numpy()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# -- the OOV id ------------------------------------------------------------------------------


def test_default_min_count_trains_the_oov_row(tmp_path: Path) -> None:
    src = _criteo_file(tmp_path / "train.txt", 400)
    spec = convert("criteo", src, tmp_path / "default")
    # Values seen once in train share id 0, so training rows use (and train) it.
    train = _ids(tmp_path / "default", "train", "C1")
    assert (train == 0).any()
    values, counts = np.unique(train, return_counts=True)
    assert (counts[values != 0] >= 2).all()
    assert spec.oov_share["train"]["C1"] == pytest.approx(np.mean(train == 0))


def test_min_count_1_warns_that_the_oov_row_never_trains(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = _criteo_file(tmp_path / "train.txt", 400)
    spec = convert("criteo", src, tmp_path / "c", min_count=1)
    out = capsys.readouterr().out
    assert spec.oov_share["train"]["C1"] == 0.0 and spec.oov_share["test"]["C1"] > 0.0
    assert "warning: C1: no train row uses the OOV id 0" in out
    # C2 has 4 values, all seen in train: nothing to warn about.
    assert "warning: C2" not in out


def test_oov_share_is_recorded_per_split_and_feature(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = _criteo_file(tmp_path / "train.txt", 300)
    spec = convert("criteo", src, tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert raw["oov_share"] == spec.oov_share and DatasetSpec.load(tmp_path / "c") == spec
    for split in SPLITS:
        for f in spec.sparse_names:
            assert spec.oov_share[split][f] == pytest.approx(np.mean(_ids(tmp_path / "c", split, f) == 0))
    test_c1 = spec.oov_share["test"]["C1"]
    assert f"test: C1 {test_c1:.1%}" in capsys.readouterr().out


# -- splits on text logs ---------------------------------------------------------------------


def test_random_split_is_seeded_exact_and_not_by_order(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = _criteo_file(tmp_path / "train.txt", 200)
    lines = src.read_text().splitlines()
    lines[150] = "broken"  # a malformed line is still counted once, whichever pass reads it
    src.write_text("\n".join(lines) + "\n")
    a = convert("criteo", src, tmp_path / "a", split="random", seed=1)
    assert "skipped 1 malformed lines" in capsys.readouterr().out
    b = convert("criteo", src, tmp_path / "b", split="random", seed=1)
    convert("criteo", src, tmp_path / "c", split="random", seed=2)
    assert a.split == "random" and a.rows == b.rows
    assert sum(a.rows.values()) == 199 and a.rows["train"] in (159, 160)
    # The first dense column identifies a row well enough to compare where rows went.
    test_a, test_b, test_c = (pq.read_table(d / "test")["I1"].to_numpy() for d in (tmp_path / "a", tmp_path / "b",
                                                                                   tmp_path / "c"))
    np.testing.assert_array_equal(test_a, test_b)
    assert not np.array_equal(test_a, test_c)
    time = convert("criteo", src, tmp_path / "t")
    assert time.split == "time"
    assert not np.array_equal(pq.read_table(tmp_path / "t" / "test")["I1"].to_numpy(), test_a)


def test_user_and_official_splits_are_refused_for_click_logs(tmp_path: Path) -> None:
    src = _criteo_file(tmp_path / "train.txt", 50)
    with pytest.raises(DataError, match=r"split 'leave-last' needs a user column: criteo has none"):
        convert("criteo", src, tmp_path / "c", split="leave-last")
    with pytest.raises(DataError, match=r"split 'u1' is MovieLens-100K's own split: avazu has none"):
        convert("avazu", src, tmp_path / "c", split="u1")
    with pytest.raises(DataError, match=r"unknown split 'u6'"):
        convert("movielens", src, tmp_path / "c", split="u6")
    assert not (tmp_path / "c").exists()


# -- MovieLens -------------------------------------------------------------------------------

# (user, item, rating, timestamp); no neutral 3s, so every rating is kept.
RATINGS = [(u, i, 4 + (i + u) % 2 if i % 3 else 1, 100 * i + u) for u in (1, 2, 3) for i in range(1, 9)]


def _ml100k(root: Path, ratings: list[tuple[int, int, int, int]] = RATINGS) -> Path:
    root.mkdir()
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n")
    items = [f"{i}|Movie {i} (199{i})|01-Jan-199{i}||http://x|" + "|".join("1" if g == i else "0" for g in range(19))
             for i in range(1, 10)]
    (root / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return root


def _rows(root: Path, split: str) -> pa.Table:
    return pq.read_table(root / split, columns=["userId", "movieId", "rating"])


def test_leave_last_puts_each_users_last_rating_in_test(tmp_path: Path) -> None:
    # User 4 has a single rating: it is the user's last, so it goes to test (a cold-start user).
    src = _ml100k(tmp_path / "ml-100k", RATINGS + [(4, 2, 5, 5)])
    (src / "u.user").write_text((src / "u.user").read_text() + "4|30|F|writer|10001\n")
    spec = convert("movielens", src, tmp_path / "out", split="leave-last", min_count=1)
    assert spec.split == "leave-last" and spec.rows == {"train": 18, "valid": 3, "test": 4}
    # By timestamp, item 8 is every user's last rating and item 7 the one before.
    movie_ids = {s: pq.read_table(tmp_path / "out" / s)["movieId"].to_numpy() for s in SPLITS}
    test_users = pq.read_table(tmp_path / "out" / "test")["userId"].to_numpy()
    assert len(set(test_users)) == 4
    assert spec.oov_share["test"]["userId"] == pytest.approx(1 / 4)  # only user 4 is unseen
    assert spec.oov_share["valid"]["userId"] == 0.0
    # Movies: ids by train frequency; items 7 and 8 never occur in train, so they are OOV.
    assert (movie_ids["valid"] == 0).all() and (movie_ids["train"] > 0).all()


def test_time_split_makes_late_users_cold_and_leave_last_does_not(ml1m_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    time = convert("movielens", ml1m_dir, tmp_path / "time")
    last = convert("movielens", ml1m_dir, tmp_path / "last", split="leave-last")
    # Users who start rating late have no train rows under the time split.
    assert time.oov_share["valid"]["userId"] > 0.3
    assert last.oov_share["valid"]["userId"] < 0.01 and last.oov_share["test"]["userId"] < 0.01
    # Every user's last rating, and only that, is in test.
    users = pq.read_table(tmp_path / "last" / "test")["userId"].to_numpy()
    assert len(np.unique(users)) == len(users) == last.rows["test"]
    out = capsys.readouterr().out
    assert "warning: userId: no train row uses the OOV id 0" in out  # the time split's, not leave-last's
    assert out.count("warning: userId") == 1


def test_official_split_reads_base_and_test_files(tmp_path: Path) -> None:
    src = _ml100k(tmp_path / "ml-100k")
    test = [r for r in RATINGS if r[1] in (2, 5)]
    base = [r for r in RATINGS if r not in test]
    (src / "u1.base").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in base))
    (src / "u1.test").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in test))
    (src / "u.data").write_text("garbage the official split must not read\n")
    spec = convert("movielens", src, tmp_path / "out", split="u1", min_count=1)
    assert spec.split == "u1" and "u1.base/u1.test" in spec.source
    # 18 base rows: the latest tenth (1 row: user 3, item 8) is valid.
    assert spec.rows == {"train": 17, "valid": 1, "test": 6}
    test_rows = _rows(tmp_path / "out", "test")
    assert sorted(test_rows["rating"].to_numpy()) == sorted(float(r[2]) for r in test)
    # Items 2 and 5 occur only in u1.test: OOV there, and the report says so.
    assert (test_rows["movieId"].to_numpy() == 0).all() and spec.oov_share["test"]["movieId"] == 1.0
    # The valid row is the latest base rating, user 3's item 8 (5 stars).
    assert _rows(tmp_path / "out", "valid")["rating"].to_numpy().tolist() == [5.0]


def test_official_split_needs_ml100k_and_its_files(ml1m_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split 'ua' needs MovieLens-100K's ua\.base and ua\.test"):
        convert("movielens", ml1m_dir, tmp_path / "a", split="ua")
    src = _ml100k(tmp_path / "ml-100k")
    with pytest.raises(DataError, match=r"u2\.base: missing from the MovieLens folder"):
        convert("movielens", src, tmp_path / "b", split="u2")
    # A folder or a pipe where a split's file goes was "missing" too, as a release file's is not.
    (src / "u2.base").mkdir()
    with pytest.raises(DataError, match=r"u2\.base: not a regular file \(a folder, a pipe or a broken link\)"):
        convert("movielens", src, tmp_path / "c", split="u2")


def test_a_folder_of_two_releases_is_refused(ml1m_dir: Path, tmp_path: Path) -> None:
    # ML-100K's u.data beside ML-1M's ratings.dat: the first found was converted, the other left out unsaid.
    src = _ml100k(tmp_path / "mix")
    for name in ("ratings.dat", "users.dat", "movies.dat"):
        (src / name).write_bytes((ml1m_dir / name).read_bytes())
    with pytest.raises(DataError, match=rf"^{src}: holds the ratings of 2 MovieLens releases "
                                        r"\(u\.data, ratings\.dat\); give a folder of one release$"):
        convert("movielens", src, tmp_path / "out")


def test_cli_split_and_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ml100k(tmp_path / "ml-100k")
    assert _cli(["data", "convert", "movielens", str(src), "--out", str(tmp_path / "r"),
                 "--split", "random", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "OOV share" in out and "test: userId" in out
    spec = DatasetSpec.load(tmp_path / "r")
    assert spec.split == "random" and "seed 3" in spec.source and spec.rows == {"train": 19, "valid": 2, "test": 3}
    with pytest.raises(SystemExit) as e:
        _cli(["data", "convert", "movielens", str(src), "--out", str(tmp_path / "x"), "--split", "users"])
    assert e.value.code == 2


def test_synth_records_no_oov_share(tmp_path: Path) -> None:
    # Synth's id 0 is an ordinary value: counting it as OOV would report cold start that is not there.
    assert synthesize(tmp_path / "s", rows=200, max_cardinality=10).oov_share == {}
