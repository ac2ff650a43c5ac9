"""Converters on the real Criteo / ML-1M samples and on tiny hand-written fixtures."""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embshard.datasets.cli import register
from embshard.datasets.convert import convert, movielens, text
from embshard.datasets.convert.vocab import VocabularyBuilder
from embshard.datasets.profile import load_profile
from embshard.datasets.schema import SPLITS, DatasetSpec, vocabulary_file
from embshard.datasets.verify import verify_dataset
from embshard.datasets.vocabulary import Vocabulary
from embshard.errors import DataError
from tests.movielens_fixture import write_ml1m_like


def read_all(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(root / s) for s in SPLITS])


# -- Criteo ------------------------------------------------------------------------------------


def test_criteo_sample(criteo_sample: Path, tmp_path: Path) -> None:
    spec = convert("criteo", criteo_sample, tmp_path / "c")
    assert spec.rows == {"train": 8000, "valid": 1000, "test": 1000}
    assert DatasetSpec.load(tmp_path / "c") == spec
    assert len(spec.dense) == 13 and len(spec.sparse) == 26
    table = read_all(tmp_path / "c")
    assert pc.sum(table["label"]).as_py() == 2182
    for f in spec.sparse:
        ids = table[f.name].to_numpy()
        assert 2 <= f.cardinality <= 8001 and ids.min() >= 0 and ids.max() < f.cardinality
    # C22 is missing in 8,182 rows; missing -> unknown id 0 (plus unseen values in valid/test).
    assert (table["C22"].to_numpy() == 0).sum() >= 8182
    # First line: 0 1 1 5 0 1382 4 15 2 181 1 2 <empty> 2 -> DLRM's log(1 + x), empty -> 0.
    first = [table[d][0].as_py() for d in spec.dense]
    raw = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    np.testing.assert_allclose(first, np.log1p(raw), rtol=1e-6)
    # Id 1 is the most frequent train value of every feature.
    train = pq.read_table(tmp_path / "c" / "train")
    c1 = np.bincount(train["C1"].to_numpy())
    assert int(np.argmax(c1[1:])) + 1 == 1


def test_the_dataset_keeps_the_raw_value_of_every_id(criteo_sample: Path, tmp_path: Path) -> None:
    spec = convert("criteo", criteo_sample, tmp_path / "c")
    assert spec.vocabularies == spec.sparse_names
    train = pq.read_table(tmp_path / "c" / "train")
    lines = [line.split("\t") for line in criteo_sample.read_text().splitlines()[:8000]]  # the time split's train
    for i, feature in [(14, "C1"), (16, "C3"), (35, "C22")]:
        raw = [line[i] or None for line in lines]  # an empty field is a missing value
        counts = {v: raw.count(v) for v in set(raw)}
        vocabulary = Vocabulary.read(tmp_path / "c" / vocabulary_file(feature), spec.feature(feature).cardinality,
                                     spec.id, feature)
        # Below --min-count 2, or missing: the OOV id, which decodes to no value.
        assert vocabulary.decode(train[feature].to_numpy()).to_pylist() == \
            [v if v is not None and counts[v] >= 2 else None for v in raw]
    assert not any(p.name.startswith(".") for p in (tmp_path / "c").iterdir())
    # Checked from footers like the part files, and replaced with the dataset, but never a user's file.
    verify_dataset(tmp_path / "c")
    shutil.copy(tmp_path / "c" / vocabulary_file("C1"), tmp_path / "c" / vocabulary_file("C2"))
    with pytest.raises(DataError, match=r"vocab/C2\.parquet: written for feature 'C1', not 'C2' \(copied in from"):
        verify_dataset(tmp_path / "c")
    # Another writing of the dataset (here of the same input: the check does not compare values).
    again = convert("criteo", criteo_sample, tmp_path / "again")
    shutil.copy(tmp_path / "again" / vocabulary_file("C2"), tmp_path / "c" / vocabulary_file("C2"))
    with pytest.raises(DataError, match=rf"vocab/C2\.parquet: written for dataset id '{again.id}', not '{spec.id}'"):
        verify_dataset(tmp_path / "c")
    (tmp_path / "c" / vocabulary_file("C2")).unlink()
    with pytest.raises(DataError, match=r"vocab/C2\.parquet: missing \(dataset\.json lists 'C2' under vocabularies: "
                                        r"convert the dataset again, or take 'C2' off that list to train and serve"):
        verify_dataset(tmp_path / "c")
    (tmp_path / "c" / "vocab" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds 'vocab/notes.txt', which no dataset holds; refusing"):
        convert("criteo", criteo_sample, tmp_path / "c", overwrite=True)
    (tmp_path / "c" / "vocab" / "notes.txt").unlink()
    convert("criteo", criteo_sample, tmp_path / "c", overwrite=True)
    verify_dataset(tmp_path / "c")
    raw_spec = json.loads((tmp_path / "c" / "dataset.json").read_text())
    (tmp_path / "c" / "dataset.json").write_text(json.dumps({**raw_spec, "vocabularies": ["C1", "C99"]}))
    with pytest.raises(DataError, match=r"dataset\.json: vocabularies: 'C99' is no sparse feature$"):
        DatasetSpec.load(tmp_path / "c")
    # Written by a later embshard, with a field this one has not: said as such, not "malformed".
    (tmp_path / "c" / "dataset.json").write_text(json.dumps({**raw_spec, "hashes": {}}))
    with pytest.raises(DataError, match=r"dataset\.json: field 'hashes' is unknown to this embshard \(written by a "
                                        r"newer one\?\); upgrade embshard where it is read$"):
        DatasetSpec.load(tmp_path / "c")


def test_movielens_keeps_its_movie_and_user_ids(tmp_path: Path) -> None:
    src = write_ml1m_like(tmp_path / "ml", users=30, movies=20, per_user=8)
    spec = convert("movielens", src, tmp_path / "data", min_count=1)
    assert spec.vocabularies == spec.sparse_names
    vocab = {f: Vocabulary.read(tmp_path / "data" / vocabulary_file(f), spec.feature(f).cardinality, spec.id, f)
             for f in spec.vocabularies}
    movies = {int(m): (title, genres) for m, title, genres in
              (line.split("::") for line in (src / "movies.dat").read_text().splitlines())}
    catalog = pq.read_table(tmp_path / "data" / "items").slice(1)  # row 0: the OOV movie
    movie_ids = vocab["movieId"].decode(catalog["movieId"].to_numpy()).to_pylist()
    assert sorted(movie_ids) == sorted(movies)  # min_count 1: every movie rated in train
    for movie, year, genres in zip(movie_ids, vocab["year"].decode(catalog["year"].to_numpy()).to_pylist(),
                                   catalog["genres"].to_pylist(), strict=True):
        title, genre = movies[movie]
        assert title.endswith(f"({year})") and vocab["genres"].decode(np.array(genres)).to_pylist() == [genre]
    # Numeric codes stay numbers: a served query gives `"age": [25]`, as users.dat writes it.
    users = [line.split("::") for line in (src / "users.dat").read_text().splitlines()]
    for column, feature in ((0, "userId"), (2, "age"), (3, "occupation")):
        assert pa.types.is_integer(vocab[feature].values.type), feature
        assert set(vocab[feature].values.to_pylist()) == {int(u[column]) for u in users}, feature
    assert vocab["zip"].values.type == pa.string()


def test_criteo_min_count_shrinks_vocabularies(criteo_sample: Path, tmp_path: Path) -> None:
    full = convert("criteo", criteo_sample, tmp_path / "a")
    pruned = convert("criteo", criteo_sample, tmp_path / "b", min_count=10)
    assert all(p.cardinality <= f.cardinality for p, f in zip(pruned.sparse, full.sparse, strict=True))
    assert pruned.feature("C3").cardinality < full.feature("C3").cardinality / 5


def test_criteo_small_blocks_give_identical_output(criteo_sample: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    convert("criteo", criteo_sample, tmp_path / "one_block")
    monkeypatch.setattr(text, "BLOCK_BYTES", 10_000)  # ~40 lines per block, lines cut at block ends
    convert("criteo", criteo_sample, tmp_path / "many_blocks")
    assert read_all(tmp_path / "many_blocks").equals(read_all(tmp_path / "one_block"))


def _broken_criteo(criteo_sample: Path, tmp_path: Path, bad_lines: dict[int, str]) -> Path:
    lines = criteo_sample.read_text().splitlines()[:100]
    for number, line in bad_lines.items():
        lines[number - 1] = line
    path = tmp_path / "broken.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_criteo_malformed_lines_are_skipped_or_fatal(criteo_sample: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = criteo_sample.read_text().splitlines()[0].split("\t")
    short = "\t".join(good[:-1])
    not_int = "\t".join(good[:3] + ["x7"] + good[4:])
    path = _broken_criteo(criteo_sample, tmp_path, {51: short, 95: not_int})
    spec = convert("criteo", path, tmp_path / "out")
    assert sum(spec.rows.values()) == 98
    assert spec.rows == {"train": 79, "valid": 10, "test": 9}  # split by line position
    captured = capsys.readouterr()
    assert "skipped 2 malformed lines" in captured.out
    assert "broken.txt:51" in captured.err and "broken.txt:95" in captured.err
    with pytest.raises(DataError, match=r"broken\.txt:51: expected 40 fields"):
        convert("criteo", path, tmp_path / "strict", strict=True)
    path = _broken_criteo(criteo_sample, tmp_path, {95: not_int})
    with pytest.raises(DataError, match=r"broken\.txt:95: column 'I3': 'x7' is not an integer"):
        convert("criteo", path, tmp_path / "strict", strict=True)
    # The first malformed line, whichever check finds it: the field count is checked first, and a
    # short line 9 was named for a bad value on line 5.
    path = _broken_criteo(criteo_sample, tmp_path, {5: not_int, 9: short})
    with pytest.raises(DataError, match=r"broken\.txt:5: column 'I3': 'x7' is not an integer"):
        convert("criteo", path, tmp_path / "strict", strict=True)
    # 23 digits are an integer, but more than int64 holds: it was said to be "not an integer".
    path = _broken_criteo(criteo_sample, tmp_path, {7: "\t".join(good[:3] + ["9" * 23] + good[4:])})
    with pytest.raises(DataError, match=r"broken\.txt:7: column 'I3': '9{23}' is not an integer of at most 18 digits"):
        convert("criteo", path, tmp_path / "strict", strict=True)


def test_a_field_that_is_not_utf8_is_a_malformed_line(criteo_sample: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    lines = [line.encode() for line in _criteo_lines(criteo_sample)]
    fields = lines[40].split(b"\t")
    fields[14] = b"ab\xffcd"  # C1 in Latin-1 or worse: once a traceback that failed the conversion
    lines[40] = b"\t".join(fields)
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    spec = convert("criteo", path, tmp_path / "out")
    assert sum(spec.rows.values()) == 99
    assert "latin1.txt:41: column 'C1': not UTF-8 text; line skipped" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"latin1\.txt:41: column 'C1': not UTF-8 text"):
        convert("criteo", path, tmp_path / "strict", strict=True)


def test_a_carriage_return_inside_a_line_is_that_line_malformed(criteo_sample: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # pyarrow ends a record at a lone \r: the line reached it as two short rows, a traceback for
    # Criteo, and for MovieLens the skipped lines after it were named wrongly (or an IndexError).
    lines = _criteo_lines(criteo_sample)
    fields = lines[10].split("\t")
    fields[20] = "ab\rcd"
    lines[10] = "\t".join(fields)
    path = tmp_path / "cr.txt"
    # CRLF endings, with an empty CRLF line: neither is malformed.
    path.write_bytes(("\r\n".join([*lines[:50], "", *lines[50:]]) + "\r\n").encode())
    spec = convert("criteo", path, tmp_path / "out")
    assert sum(spec.rows.values()) == 99
    err = capsys.readouterr().err
    assert "cr.txt:11: a carriage return (\\r) inside the line; line skipped" in err
    assert err.count("line skipped") == 1
    with pytest.raises(DataError, match=r"cr\.txt:11: a carriage return \(\\r\) inside the line$"):
        convert("criteo", path, tmp_path / "strict", strict=True)

    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    good = (src / "ratings.dat").read_text().splitlines()
    user, movie, _, when = good[4].split("::")
    good[4] = f"{user}::\r{movie}::\r4::{when}"
    good[8] = good[8].rsplit("::", 2)[0] + "::9::978300000"
    (src / "ratings.dat").write_text("\n".join(good) + "\n")
    spec = convert("movielens", src, tmp_path / "ml-out", target="rating")
    assert sum(spec.rows.values()) == len(good) - 2
    err = capsys.readouterr().err
    assert "ratings.dat:5: a carriage return (\\r) inside the line; line skipped" in err
    assert "ratings.dat:9: column 'rating': '9' is not a rating" in err
    assert err.count("line skipped") == 2


def test_missing_input_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        convert("criteo", tmp_path / "nope.txt", tmp_path / "out")
    with pytest.raises(DataError, match="MovieLens"):
        convert("movielens", tmp_path, tmp_path / "out")


# -- Avazu -------------------------------------------------------------------------------------

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
                "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
                "C14,C15,C16,C17,C18,C19,C20,C21")


def _avazu_line(i: int, click: int, hour: str) -> str:
    site = ["1fbe01fe", "fe8cc448", "d6137915"][i % 3]
    return (f"{1000 + i},{click},{hour},1005,{i % 2},{site},f3845767,28905ebd,ecad2386,7801e8d9,"
            f"07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79")


def test_avazu_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_avazu_line(i, int(i % 4 == 0), f"141021{i % 24:02d}") for i in range(40)]
    rows[13] = _avazu_line(13, 0, "14102")  # a broken hour
    src = tmp_path / "train.csv"
    src.write_text("\n".join([AVAZU_HEADER, *rows]) + "\n")
    spec = convert("avazu", src, tmp_path / "out", min_count=1)  # every train value its own id
    assert spec.dense == []
    assert spec.sparse_names[:4] == ["hour_of_day", "day_of_week", "C1", "banner_pos"]
    assert "id" not in spec.sparse_names and "hour" not in spec.sparse_names
    assert spec.rows == {"train": 31, "valid": 4, "test": 4}
    assert "skipped 1 malformed lines" in capsys.readouterr().out
    # 2014-10-21 is a Tuesday: one weekday (+ unknown). Train lines 0..31 hold 23 distinct hours:
    # hour 13 only occurs on the broken line and in the test split.
    assert spec.feature("day_of_week").cardinality == 2
    assert spec.feature("hour_of_day").cardinality == 24
    assert spec.feature("site_id").cardinality == 4
    table = read_all(tmp_path / "out")
    assert pc.sum(table["label"]).as_py() == sum(1 for i in range(40) if i % 4 == 0 and i != 13)
    with pytest.raises(DataError, match=r"train\.csv:15: column 'hour': '14102' is not a YYMMDDHH hour"):
        convert("avazu", src, tmp_path / "strict", strict=True)


def test_avazu_hours_that_are_no_real_date_are_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 31 February and 29 February 2014 were read as 3 and 1 March (other weekdays), and a
    # 7-digit hour as a date, even with --strict.
    rows = [_avazu_line(i, int(i % 4 == 0), f"141021{i % 24:02d}") for i in range(40)]
    for at, hour in ((3, "14023123"), (5, "14022900"), (7, "1410210")):
        rows[at] = _avazu_line(at, 0, hour)
    src = _write_lines(tmp_path / "train.csv", [AVAZU_HEADER, *rows])
    spec = convert("avazu", src, tmp_path / "out")
    out = capsys.readouterr()
    assert "skipped 3 malformed lines" in out.out
    assert "train.csv:5: column 'hour': '14023123' is not a YYMMDDHH hour; line skipped" in out.err
    assert spec.feature("day_of_week").cardinality == 2  # only Tuesdays (+ unknown)
    with pytest.raises(DataError, match=r"train\.csv:5: column 'hour': '14023123' is not a YYMMDDHH hour"):
        convert("avazu", src, tmp_path / "strict", strict=True)


def test_avazu_header_byte_order_mark_and_clashing_names(tmp_path: Path) -> None:
    rows = [_avazu_line(i, i % 2, f"141021{i % 24:02d}") for i in range(20)]
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + ("\n".join([AVAZU_HEADER, *rows]) + "\n").encode())
    spec = convert("avazu", bom, tmp_path / "out", dedup_key="id")
    assert "id" not in spec.sparse_names and not any("\ufeff" in n for n in spec.sparse_names)
    for header, message in ((AVAZU_HEADER + ",C1", r": column name .C1. given twice"),
                            (AVAZU_HEADER + ",label", r" has a column 'label', a name the converter gives"),
                            (AVAZU_HEADER + ",hour_of_day", r" has a column 'hour_of_day'"),
                            # A feature's name is a file name in its profile and a torch module's.
                            (AVAZU_HEADER + ",../../escape", r": column name '\.\./\.\./escape': a column needs"),
                            (AVAZU_HEADER + ",site.id", r": column name 'site\.id'"),
                            # Refused after the whole conversion, as a traceback: "File name too long".
                            (AVAZU_HEADER + "," + "y" * 250,
                             r": column name 'y{40}'\.\.\. is 250 bytes long; a column name is also a file name "
                             r".* at most 247 bytes")):
        src = tmp_path / "clash.csv"
        src.write_text("\n".join([header, *(r + ",x" for r in rows)]) + "\n")
        with pytest.raises(DataError, match=r"clash\.csv: line 1 \(the header\)" + message):
            convert("avazu", src, tmp_path / "clash")


# -- MovieLens ---------------------------------------------------------------------------------


def test_ml1m(ml1m_dir: Path, tmp_path: Path) -> None:
    spec = convert("movielens", ml1m_dir, tmp_path / "ml")
    assert spec.name == "ml-1m"
    assert sum(spec.rows.values()) == 487_650 - 127_216 == 360_434
    assert spec.sparse_names == ["userId", "movieId", "gender", "age", "occupation", "zip", "year", "genres"]
    assert spec.dense == [] and spec.extra == ["rating", "item_frequency"]
    genres = spec.feature("genres")
    assert genres.multi_hot and genres.cardinality == 19
    assert spec.feature("gender").cardinality == 3 and spec.feature("age").cardinality == 8
    table = read_all(tmp_path / "ml")
    assert pc.sum(table["label"]).as_py() == 170_579 + 108_545
    assert set(np.unique(table["rating"].to_numpy())) == {1.0, 2.0, 4.0, 5.0}
    lengths = pc.list_value_length(table["genres"]).to_numpy()
    assert lengths.min() >= 1 and lengths.max() <= 6
    assert (pc.list_flatten(table["genres"]).to_numpy() > 0).all()
    assert table.schema.field("genres").type == pa.list_(pa.int64())


ML100K_ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "3|Café Society (1996)|||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
]
ML100K_RATINGS = [  # user item rating timestamp; deliberately not in time order
    (1, 1, 5, 50), (1, 2, 3, 10), (2, 1, 4, 20), (2, 3, 1, 30), (3, 2, 2, 40),
    (3, 1, 4, 60), (1, 3, 5, 70), (2, 2, 4, 80), (3, 3, 2, 90), (1, 1, 5, 100),
    (2, 3, 4, 110), (3, 2, 5, 120),
]


def test_ml100k_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML100K_RATINGS))
    (src / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n")
    (src / "u.item").write_bytes(("\n".join(ML100K_ITEMS) + "\n").encode("latin-1"))
    spec = convert("movielens", src, tmp_path / "out")
    assert spec.name == "ml-100k"
    assert sum(spec.rows.values()) == 11  # one 3-star rating dropped
    # Counted as repeats and malformed lines are (a quarter of ML-1M's ratings are 3s): it was not.
    assert "dropped 1 neutral ratings (above 2 and below 4)" in capsys.readouterr().out
    assert spec.rows == {"train": 8, "valid": 1, "test": 2}
    assert spec.feature("occupation").cardinality == 4 and spec.feature("year").cardinality == 3
    table = read_all(tmp_path / "out")
    # Sorted by timestamp: first (t=20) user 2 / Toy Story, last (t=120) user 3 / GoldenEye.
    np.testing.assert_array_equal(table["rating"].to_numpy(), [4, 1, 2, 5, 4, 5, 4, 2, 5, 4, 5])
    np.testing.assert_array_equal(table["label"].to_numpy(), [1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1])
    lengths = pc.list_value_length(table["genres"]).to_numpy()
    np.testing.assert_array_equal(lengths[:3], [3, 1, 3])  # Toy Story, Café Society, GoldenEye
    age = Vocabulary.read(tmp_path / "out" / vocabulary_file("age"), spec.feature("age").cardinality, spec.id, "age")
    assert sorted(age.values.to_pylist()) == [23, 24, 53]  # ages in years, integers as u.user writes them


def test_ml20m_csv_fixture(tmp_path: Path) -> None:
    src = tmp_path / "ml-20m"
    src.mkdir()
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4.5,1000\n1,20,3.5,1001\n2,10,2.5,999\n2,30,0.5,1002\n3,20,5.0,998\n"
        "3,30,4.0,1003\n4,10,1.0,1004\n4,20,3.0,1005\n5,30,4.0,1006\n5,10,2.0,1007\n6,20,5.0,1008\n"
        "6,30,4.0,1009\n6,10,1.0,1010\n")
    (src / "movies.csv").write_text(
        "movieId,title,genres\n"
        '10,"American President, The (1995)",Comedy|Drama|Romance\n'
        "20,Heat (1995),Action||Crime|Thriller\n"
        "30,Untitled,(no genres listed)\n")
    spec = convert("movielens", src, tmp_path / "out")
    assert spec.name == "ml-20m"
    assert spec.sparse_names == ["userId", "movieId", "year", "genres"]
    assert spec.rows == {"train": 8, "valid": 1, "test": 1}  # 2.5, 3.5 and 3.0 are neutral
    table = read_all(tmp_path / "out")
    np.testing.assert_array_equal(table["rating"].to_numpy(), [5.0, 4.5, 0.5, 4.0, 1.0, 4.0, 2.0, 5.0, 4.0, 1.0])
    # The csv releases' "(no genres listed)" is no genre, nor the empty name of "a||b": each was an id.
    np.testing.assert_array_equal(pc.list_value_length(table["genres"]).to_numpy(), [3, 3, 0, 0, 3, 0, 3, 3, 0, 3])
    genres = Vocabulary.read(tmp_path / "out" / vocabulary_file("genres"), spec.feature("genres").cardinality,
                             spec.id, "genres")
    assert set(genres.values.to_pylist()) == {
        "Action", "Comedy", "Crime", "Drama", "Romance", "Thriller"}
    # "Untitled" has no year -> unknown id 0.
    assert table["year"].to_numpy()[2] == 0


@pytest.mark.parametrize("odd", ["ratings.dat", "users.dat"])
def test_a_movielens_file_that_is_no_regular_file_is_named(tmp_path: Path, odd: str) -> None:
    # A folder (or broken link) as ratings.dat was "no u.data, ratings.dat or ratings.csv: not a
    # MovieLens release folder"; as users.dat, "no users.dat".
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    (src / odd).unlink()
    (src / odd).mkdir()
    with pytest.raises(DataError, match=rf"^{re.escape(str(src / odd))}: not a regular file \(a folder, a pipe or a "
                                        r"broken link\); MovieLens reads it as one$"):
        convert("movielens", src, tmp_path / "out")


def test_a_movielens_time_past_2100_or_before_1970_is_a_malformed_line(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Any 18 digits were taken: the rating sorted last (first) in the time split, into test (train).
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    good = (src / "ratings.dat").read_text().splitlines()
    (src / "ratings.dat").write_text("\n".join(["1::7::4::999999999999999999", "1::8::4::-978300001", *good]) + "\n")
    spec = convert("movielens", src, tmp_path / "out", target="rating")
    assert sum(spec.rows.values()) == len(good)
    err = capsys.readouterr().err
    for line, value in ((1, "999999999999999999"), (2, "-978300001")):
        assert (f"ratings.dat:{line}: column 'timestamp': '{value}' is not an integer Unix time from 1970 to 2100; "
                "line skipped") in err


def test_movielens_bad_values_are_malformed_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    good = (src / "ratings.dat").read_text().splitlines()
    # Once: NaN and 99 became labels (99 a positive click), a header or a word a traceback; blank
    # lines must not shift the line numbers reported.
    bad = ["UserID::MovieID::Rating::Timestamp", "1::1::nan::978300000", "1::2::99::978300000", "",
           "1::3::-4::978300000", "bob::1::4::978300000", "1::4::4::", "1::5::4::yesterday", "1::6::inf::978300000"]
    (src / "ratings.dat").write_text("\n".join(bad + good) + "\n")
    spec = convert("movielens", src, tmp_path / "out", target="rating")
    assert sum(spec.rows.values()) == len(good)
    captured = capsys.readouterr()
    err = captured.err
    for line, message in ((1, "column 'userId': 'UserID' is not an integer of at most 18 digits"),
                          (2, "column 'rating': 'nan' is not a rating from 0.5 to 5"),
                          (3, "column 'rating': '99' is not a rating from 0.5 to 5"),
                          (5, "column 'rating': '-4' is not a rating from 0.5 to 5"),
                          (6, "column 'userId': 'bob' is not an integer of at most 18 digits")):
        assert f"ratings.dat:{line}: {message}; line skipped" in err
    assert "skipped 8 malformed lines" in captured.out
    labels = read_all(tmp_path / "out")["label"].to_numpy()
    assert labels.min() >= 1 and labels.max() <= 5
    (src / "ratings.dat").write_text("\n".join(good[:3] + ["1::4::4::"] + good[3:]) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:4: column 'timestamp': missing, expected an integer"):
        convert("movielens", src, tmp_path / "strict", strict=True, target="rating")
    (src / "ratings.dat").write_text("\n".join(good[:3] + ["1::4::4::", "1::5", *good[3:]]) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:4: column 'timestamp': missing, expected an integer"):
        convert("movielens", src, tmp_path / "strict", strict=True, target="rating")  # not line 5's count
    # A file none of whose lines is well formed, e.g. saved with commas for `::`.
    (src / "movies.dat").write_text("garbage\n" * 10)
    with pytest.raises(DataError, match=r"movies\.dat: no well-formed lines \(10 malformed lines skipped\)"):
        convert("movielens", src, tmp_path / "garbage")


def test_movielens_byte_order_mark_and_a_line_over_a_mebibyte(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # movies.dat saved again as UTF-8 with a byte-order mark: read as Latin-1, the mark was part
    # of movie 1's id and the movie was skipped (its year and genres lost; --strict refused the
    # file). And one line over pyarrow's 1 MiB block failed the whole file ("straddling object").
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    expected = convert("movielens", src, tmp_path / "plain")
    movies = src / "movies.dat"
    movies.write_bytes(codecs.BOM_UTF8 + movies.read_bytes())
    capsys.readouterr()
    spec = convert("movielens", src, tmp_path / "bom", strict=True)
    assert "movies.dat:1" not in capsys.readouterr().err
    assert spec.sparse == expected.sparse and read_all(tmp_path / "bom").equals(read_all(tmp_path / "plain"))
    ratings = (src / "ratings.dat").read_text().splitlines()
    ratings.insert(5, "1::" + "9" * (2 << 20) + "::5::978300760")
    (src / "ratings.dat").write_text("\n".join(ratings) + "\n")
    spec = convert("movielens", src, tmp_path / "long")
    assert "ratings.dat:6: column 'movieId': '999" in capsys.readouterr().err
    assert read_all(tmp_path / "long").equals(read_all(tmp_path / "plain"))


def test_users_or_movies_missing_from_their_files_are_said(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Without users.dat an ML-1M folder was read as ML-10M, its users' features gone; ratings of a
    # user or movie the release's files do not list got unknown features; neither said a word.
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    with (src / "ratings.dat").open("a") as f:
        f.write("".join(f"99999::{m}::5::978300000\n" for m in (1, 2, 3)) + "5::88888::1::978300001\n")
    convert("movielens", src, tmp_path / "out")
    err = capsys.readouterr().err
    assert (f"warning: {src}: 1 ratings (1.0%) are of 1 movie(s) that movies.dat does not list (e.g. movieId "
            "88888), whose year, genres are unknown") in err
    assert f"{src}: 3 ratings (2.9%) are of 1 user(s) that users.dat does not list (e.g. userId 99999)" in err
    with pytest.raises(DataError, match=r"1 ratings \(1\.0%\) are of 1 movie\(s\) that movies\.dat does not list"):
        convert("movielens", src, tmp_path / "strict", strict=True)
    convert("movielens", src, tmp_path / "rating", target="rating")  # a rating model reads the ids alone
    assert "does not list" not in capsys.readouterr().err
    (src / "users.dat").unlink()
    with pytest.raises(DataError, match=rf"^{src}: no users\.dat, which ML-1M ships .* nor ML-10M's tags\.dat"):
        convert("movielens", src, tmp_path / "no-users")
    (src / "tags.dat").write_text("")
    assert convert("movielens", src, tmp_path / "ml-10m").name == "ml-10m"


def test_a_stray_quote_in_a_movielens_csv_loses_its_own_line_only(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The csv parser read on from it to the next quote: the ratings between became one malformed
    # record, and "1 malformed line" was said of a thousand.
    src = tmp_path / "ml-x"
    src.mkdir()
    ratings = [f"{u},{m},{(u + m) % 5 + 1}.0,{1000 + 10 * u + m}" for u in range(1, 41) for m in (10, 20, 30)]
    ratings[50] = '7,"20,4.0,1070'
    ratings[90] = '9,30,"4.0,1090'
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(ratings) + "\n")
    (src / "movies.csv").write_text('movieId,title,genres\n10,"Heat, The (1995)",Action\n20,Up (2009)",Drama\n'
                                    "30,Alien (1979),Horror\n")
    spec = convert("movielens", src, tmp_path / "out", target="rating")
    assert sum(spec.rows.values()) == len(ratings) - 2
    err = capsys.readouterr().err
    for where in ("ratings.csv:52:", "ratings.csv:92:", "movies.csv:3:"):
        assert f"{where} a quote (\") it does not close; line skipped" in err
    # Two quotes on the line, one within a field (a character) and one opening the next: the
    # opened field ran on to the file's end, and 39 ratings went with it, said as 1 line.
    ratings[50], ratings[90] = '7,2"x,"4.0,1070', '9,30,"4.0",1090'
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(ratings) + "\n")
    spec = convert("movielens", src, tmp_path / "even", target="rating")
    assert sum(spec.rows.values()) == len(ratings) - 1  # a quoted field closed on its own line is no error
    assert 'ratings.csv:52: a quote (") that opens a field it does not close; line skipped' in capsys.readouterr().err
    header = "userId,movieId,rating,timestamp,rating"
    (src / "ratings.csv").write_text(header + "\n" + "\n".join(r + ",1" for r in ratings) + "\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: the header names column 'rating' twice"):
        convert("movielens", src, tmp_path / "twice")


@pytest.mark.parametrize(("name", "line", "message"), [
    ("movies.dat", "1::Toy Story (1995)::Horror|Western", "movieId 1 is on 2 lines"),
    ("users.dat", "1::M::25::10::99999", "userId 1 is on 2 lines")])
def test_a_movie_or_user_on_two_lines_is_refused(tmp_path: Path, name: str, line: str, message: str) -> None:
    # Ratings took a repeated movie's first genres and the item catalog its last, without a word.
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    with (src / name).open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=rf"{name}: {message}; each user or movie needs one"):
        convert("movielens", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_rating_given_twice_is_kept_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A ratings file given twice put a rating in train and its copy in test, without a word.
    src = write_ml1m_like(tmp_path / "ml", users=20, movies=10, per_user=5)
    once = convert("movielens", src, tmp_path / "once", split="random")
    ratings = (src / "ratings.dat").read_text()
    (src / "ratings.dat").write_text(ratings + ratings)
    capsys.readouterr()
    twice = convert("movielens", src, tmp_path / "twice", split="random")
    assert twice.rows == once.rows
    said = capsys.readouterr()
    assert f"{src}: 100 ratings repeat an earlier one (user, movie, rating and time); only the first of each " \
           "kept" in said.err
    # Each repeated line parsed: they are no malformed lines, and the summary says what was dropped.
    assert "malformed" not in said.out and "dropped 100 ratings repeating an earlier one" in said.out
    for split in ("train", "valid", "test"):
        assert pq.read_table(tmp_path / "twice" / split).equals(pq.read_table(tmp_path / "once" / split))
    with pytest.raises(DataError, match="100 ratings repeat an earlier one"):
        convert("movielens", src, tmp_path / "strict", strict=True)


def test_movielens_csv_needs_its_columns(tmp_path: Path) -> None:
    src = tmp_path / "ml-x"
    src.mkdir()
    (src / "ratings.csv").write_text("userId,movieId,rating\n1,10,4.0\n")
    (src / "movies.csv").write_text("movieId,title,genres\n10,Heat (1995),Action\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: the header has no column 'timestamp' "
                                         r"\(it has userId, movieId, rating\)"):
        convert("movielens", src, tmp_path / "out")
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,5\n")
    (src / "movies.csv").write_text("10,Heat (1995),Action\n")  # no header
    with pytest.raises(DataError, match=r"movies\.csv:1: the header has no column 'movieId'"):
        convert("movielens", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_writes_profile(criteo_sample: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "convert", "criteo", str(criteo_sample), "--out", str(tmp_path / "c"),
                              "--min-count", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "criteo" in out and "profile" in out
    assert load_profile(tmp_path / "c").counts("C1").sum() == 8000
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "convert", "--help"])
    assert "--min-count" in capsys.readouterr().out


# -- never lose a dataset, never silently short -------------------------------------------------


def _criteo_lines(criteo_sample: Path, n: int = 100) -> list[str]:
    return criteo_sample.read_text().splitlines()[:n]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_failed_convert_leaves_the_existing_dataset_untouched(criteo_sample: Path, tmp_path: Path) -> None:
    good = _write_lines(tmp_path / "good.txt", _criteo_lines(criteo_sample))
    out = tmp_path / "data" / "criteo"
    convert("criteo", good, out)
    before = _snapshot(out)
    assert "dataset.json" in before and "profile/profile.json" in before
    ratings = _write_lines(tmp_path / "ratings.dat", ["1::1193::5::978300760", "1::661::3::978302109"] * 20)
    with pytest.raises(DataError, match=r"ratings\.dat: does not look like Criteo TSV: line 1 has 1 fields"):
        convert("criteo", ratings, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["criteo"]  # no staging folder left behind


def test_non_empty_out_needs_overwrite(criteo_sample: Path, tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "train.txt", _criteo_lines(criteo_sample))
    out = tmp_path / "c"
    out.mkdir()  # an empty folder is fine
    first = convert("criteo", src, out, min_count=1)
    with pytest.raises(DataError, match=r"c: not empty; pass --overwrite"):
        convert("criteo", src, out, min_count=2)
    assert DatasetSpec.load(out) == first
    second = convert("criteo", src, out, min_count=2, overwrite=True)
    assert DatasetSpec.load(out) == second != first
    assert load_profile(out).counts("C1").size == second.feature("C1").cardinality
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "train.txt"]
    # A folder that holds something other than a dataset is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"notes: not empty and holds no dataset\.json"):
        convert("criteo", src, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


def test_overwrite_replaces_only_a_dataset_and_never_an_input(criteo_sample: Path, tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "train.txt", _criteo_lines(criteo_sample))
    out = tmp_path / "ds"
    convert("criteo", src, out)
    # The input inside the dataset folder it would replace: the replacement would delete it.
    (out / "raw").mkdir()
    inside = _write_lines(out / "raw" / "train.txt", _criteo_lines(criteo_sample))
    with pytest.raises(DataError, match=r"raw/train\.txt: an input inside --out .*ds; replacing .* would delete it"):
        convert("criteo", inside, out, overwrite=True)
    with pytest.raises(DataError, match=r"ds: holds 'raw', which no dataset holds; refusing"):
        convert("criteo", src, out, overwrite=True)
    links = tmp_path / "links"  # a folder of links to files inside --out: the same, one step removed
    links.mkdir()
    (links / "day0.txt").symlink_to(inside)
    with pytest.raises(DataError, match=r"links/day0\.txt: an input inside --out"):
        convert("criteo", links, out, overwrite=True)
    shutil.rmtree(links)
    assert inside.is_file()
    shutil.move(out / "raw", tmp_path / "raw")
    (out / ".profile.partial-123-abcd").mkdir()  # what a `data profile` killed mid-write leaves
    convert("criteo", src, out, overwrite=True)
    inside = tmp_path / "raw" / "train.txt"
    # Another tool's folder with a dataset.json of its own.
    other = tmp_path / "nnunet"
    (other / "imagesTr").mkdir(parents=True)
    (other / "imagesTr" / "case1.nii").write_text("scan")
    (other / "dataset.json").write_text('{"name": "other tool"}')
    with pytest.raises(DataError, match=r"nnunet: not an embshard dataset \(.*version None.*\); refusing"):
        convert("criteo", src, other, overwrite=True)
    assert (other / "imagesTr" / "case1.nii").read_text() == "scan"
    # Where the folder cannot be made: said before the input is read.
    with pytest.raises(DataError, match=r"train\.txt/ds: cannot be created: .*train\.txt is not a directory"):
        convert("criteo", src, src / "ds")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"dangling: a symbolic link"):
        convert("criteo", src, tmp_path / "dangling")
    # A hard link is the same file: it would put every row in twice.
    (tmp_path / "again.txt").hardlink_to(src)
    with pytest.raises(DataError, match=r"again\.txt: given more than once \(directly, through its folder or a link\)"):
        convert("criteo", [src, tmp_path / "again.txt"], tmp_path / "twice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.txt", "dangling", "ds", "nnunet", "raw", "train.txt"]


def test_gzip_input_detected_by_magic_bytes(criteo_sample: Path, tmp_path: Path) -> None:
    lines = _criteo_lines(criteo_sample)
    plain = _write_lines(tmp_path / "plain.txt", lines)
    convert("criteo", plain, tmp_path / "plain")
    named = tmp_path / "train.txt.gz"
    named.write_bytes(gzip.compress(plain.read_bytes()))
    unnamed = tmp_path / "train.txt"  # gzip data under a plain name
    unnamed.write_bytes(named.read_bytes())
    for src, out in ((named, "named"), (unnamed, "unnamed")):
        spec = convert("criteo", src, tmp_path / out)
        assert spec.rows == {"train": 80, "valid": 10, "test": 10}
        assert read_all(tmp_path / out).equals(read_all(tmp_path / "plain"))


def test_avazu_gzip(tmp_path: Path) -> None:
    rows = [_avazu_line(i, int(i % 4 == 0), f"141021{i % 24:02d}") for i in range(40)]
    src = tmp_path / "train.gz"
    src.write_bytes(gzip.compress(("\n".join([AVAZU_HEADER, *rows]) + "\n").encode()))
    assert convert("avazu", src, tmp_path / "out").rows == {"train": 32, "valid": 4, "test": 4}


def test_text_in_another_encoding_is_one_line(criteo_sample: Path, tmp_path: Path) -> None:
    # UTF-16 was 201 malformed lines of 200 ('\x000\x00' is not 0 or 1), said five times over. A
    # UTF-8 mark (a spreadsheet's save) is read past, as it was already.
    text = "\n".join(_criteo_lines(criteo_sample)) + "\n"
    for encoding, said in (("utf-16", "UTF-16 text"), ("utf-16-be", "UTF-16 text"), ("utf-32", "UTF-32 text"),
                           ("utf-16-le", "UTF-16 text"), ("utf-32-be", "UTF-32 text")):  # the last two: no mark
        src = tmp_path / f"{encoding}.txt"
        src.write_bytes(text.encode(encoding))
        with pytest.raises(DataError, match=rf"{encoding}\.txt: {said}; the converters read UTF-8: convert it first "
                                             rf"\(iconv -f {said[:6]} -t UTF-8\)$"):
            convert("criteo", src, tmp_path / "out")
        src.write_bytes(gzip.compress(text.encode(encoding)))
        with pytest.raises(DataError, match=rf"{encoding}\.txt: {said}"):
            convert("criteo", src, tmp_path / "out")
    numbers = tmp_path / "numbers.bin"  # int16s: every other byte NUL, but no text between
    numbers.write_bytes(np.arange(1, 200, dtype="<i2").tobytes())
    with pytest.raises(DataError, match=r"numbers\.bin: does not look like Criteo TSV"):
        convert("criteo", numbers, tmp_path / "out")
    plain = convert("criteo", _write_lines(tmp_path / "plain.txt", _criteo_lines(criteo_sample)), tmp_path / "plain")
    marked = tmp_path / "marked.txt"
    marked.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert convert("criteo", marked, tmp_path / "marked").rows == plain.rows
    assert read_all(tmp_path / "marked").equals(read_all(tmp_path / "plain"))
    rows = [_avazu_line(i, int(i % 4 == 0), f"141021{i % 24:02d}") for i in range(40)]
    avazu = tmp_path / "avazu.csv"
    avazu.write_bytes(codecs.BOM_UTF8 + ("\n".join([AVAZU_HEADER, *rows]) + "\n").encode())
    assert convert("avazu", avazu, tmp_path / "avazu").rows == {"train": 32, "valid": 4, "test": 4}
    assert not (tmp_path / "out").exists()


def test_tar_archive_must_be_unpacked_first(criteo_sample: Path, tmp_path: Path) -> None:
    plain = _write_lines(tmp_path / "train.txt", _criteo_lines(criteo_sample))
    archive = tmp_path / "dac.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(plain, arcname="train.txt")
    with pytest.raises(DataError, match=r"dac\.tar\.gz: a tar archive; unpack it first"):
        convert("criteo", archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_split_without_rows_is_an_error(criteo_sample: Path, tmp_path: Path) -> None:
    lines = _criteo_lines(criteo_sample, 20)
    bad_labels = _write_lines(tmp_path / "labels.txt", ["7" + line[1:] for line in lines])
    with pytest.raises(DataError, match=r"labels\.txt: 0 train rows \(train 0, valid 0, test 0; 20 malformed "
                                         r"lines skipped\); nothing written"):
        convert("criteo", bad_labels, tmp_path / "out")
    one_line = _write_lines(tmp_path / "one.txt", lines[:1])
    with pytest.raises(DataError, match=r"one\.txt: 0 train rows"):
        convert("criteo", one_line, tmp_path / "out")
    # Five lines give valid no row: a dataset a run could only refuse once its cluster is up.
    five = _write_lines(tmp_path / "five.txt", lines[:5])
    with pytest.raises(DataError, match=r"five\.txt: 0 valid rows \(train 4, valid 0, test 1\)"):
        convert("criteo", five, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.txt", "labels.txt", "one.txt"]


def test_a_split_of_one_label_is_warned_of(criteo_sample: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Written with exit 0, and a run trained every step, then stopped at its first evaluation:
    # "every one of the 200 rows evaluated has label 1".
    lines = _criteo_lines(criteo_sample, 100)
    clicks = _write_lines(tmp_path / "clicks.txt", [line if i < 80 else "1" + line[1:] for i, line in enumerate(lines)])
    convert("criteo", clicks, tmp_path / "out")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'out'}: every one of the 10 {split} rows has label 1, so a pointwise "
                        "model's AUC there is undefined (a run evaluating it stops at its first evaluation); is the "
                        "input sorted by label? Split it otherwise (--split random)" for split in ("valid", "test")]
    convert("criteo", _write_lines(tmp_path / "mixed.txt", lines), tmp_path / "mixed")
    assert "warning" not in capsys.readouterr().err


def test_wrong_format_fails_at_once(criteo_sample: Path, tmp_path: Path) -> None:
    criteo = _write_lines(tmp_path / "criteo.txt", _criteo_lines(criteo_sample))
    with pytest.raises(DataError, match=r"criteo\.txt: does not look like Avazu CSV: line 1 \(the header\) "
                                         r"has no column 'click'"):
        convert("avazu", criteo, tmp_path / "out")
    tsv = _write_lines(tmp_path / "u.data", ["196\t242\t3\t881250949", "186\t302\t3\t891717742"] * 10)
    with pytest.raises(DataError, match=r"u\.data: does not look like Criteo TSV: line 1 has 4 fields, "
                                         r"expected 40"):
        convert("criteo", tsv, tmp_path / "out")
    # One good line among the first few is enough: the rest are skipped as malformed, as before.
    mostly_bad = _write_lines(tmp_path / "mostly.txt", ["a\tb"] * 4 + _criteo_lines(criteo_sample))
    assert sum(convert("criteo", mostly_bad, tmp_path / "ok").rows.values()) == 100


def test_skipped_lines_are_counted_and_warned_once(criteo_sample: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = criteo_sample.read_text().splitlines()[0].split("\t")
    short = "\t".join(good[:-1])
    # Lines 82, 90 and 95 lie beyond the train split (lines 1-80), in the block the first pass reads.
    path = _broken_criteo(criteo_sample, tmp_path, {10: short, 82: short, 90: short, 95: short})
    spec = convert("criteo", path, tmp_path / "out")
    assert sum(spec.rows.values()) == 96
    captured = capsys.readouterr()
    assert "skipped 4 malformed lines" in captured.out
    for number in (10, 82, 90, 95):
        assert captured.err.count(f"broken.txt:{number}:") == 1


def test_cli_overwrite_flag(criteo_sample: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    src = _write_lines(tmp_path / "train.txt", _criteo_lines(criteo_sample))
    argv = ["data", "convert", "criteo", str(src), "--out", str(tmp_path / "c")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    args = parser.parse_args(argv)
    with pytest.raises(DataError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args([*argv, "--overwrite"])
    assert args.func(args) == 0


# -- several input files -----------------------------------------------------------------------


def test_folder_of_criteo_files_equals_their_concatenation(criteo_sample: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    lines = _criteo_lines(criteo_sample, 300)
    lines[104] = "broken"  # line 5 of the second file
    whole = _write_lines(tmp_path / "whole.txt", lines)
    days = tmp_path / "days"
    days.mkdir()
    for i, name in enumerate(["day0.txt", "day1.txt", "day2.txt"]):
        _write_lines(days / name, lines[100 * i:100 * (i + 1)])
    (days / ".DS_Store").write_text("not data")  # hidden files are not inputs
    expected = convert("criteo", whole, tmp_path / "a", split="random", seed=4)
    capsys.readouterr()
    spec = convert("criteo", days, tmp_path / "b", split="random", seed=4)
    assert "skipped 1 malformed lines" in capsys.readouterr().out
    assert spec.rows == expected.rows and spec.sparse == expected.sparse and spec.oov_share == expected.oov_share
    assert read_all(tmp_path / "b").equals(read_all(tmp_path / "a"))
    # The same files named one by one; a malformed line is named by its own file and line.
    with pytest.raises(DataError, match=r"day1\.txt:5: expected 40 fields"):
        convert("criteo", sorted(days.glob("day*.txt")), tmp_path / "c", strict=True)


def test_a_folder_of_day_files_is_read_in_the_days_order(criteo_sample: Path, tmp_path: Path) -> None:
    # Criteo's day_0 ... day_23 were read as day_0, day_1, day_10, day_11, day_2, ...: the time
    # split of days 0-11 tested on days 8 and 9 after training on days 10 and 11.
    lines = _criteo_lines(criteo_sample, 300)
    days = tmp_path / "days"
    days.mkdir()
    for i in range(12):
        _write_lines(days / f"day_{i}", lines[25 * i:25 * (i + 1)])
    expected = convert("criteo", _write_lines(tmp_path / "whole.txt", lines), tmp_path / "a")
    assert convert("criteo", days, tmp_path / "b").rows == expected.rows
    assert read_all(tmp_path / "b").equals(read_all(tmp_path / "a"))
    from embshard.datasets.convert.inputs import _name_order

    # A digit int() does not read ('\u00b2' passes str.isdigit) orders as text, not a traceback.
    assert sorted(["day_\u00b2", "day_10", "day_2"], key=lambda n: _name_order(Path(n))) == \
        ["day_2", "day_10", "day_\u00b2"]


@pytest.mark.parametrize("change", ["replaced", "appended", "removed"])
def test_an_input_changed_between_passes_is_one_line_not_a_wrong_dataset(criteo_sample: Path, tmp_path: Path,
                                                                          monkeypatch, change: str) -> None:
    # Each file is read in several passes: one replaced after its lines were counted gave the
    # vocabulary of one file to the rows of another (every train id OOV, exit 0); one removed
    # was a FileNotFoundError traceback.
    from embshard.datasets.convert import stream

    lines = _criteo_lines(criteo_sample, 200)
    src = _write_lines(tmp_path / "day.txt", lines)
    counted = stream.count_lines

    def then_changed(path: Path) -> int:
        n = counted(path)
        if change == "replaced":
            _write_lines(tmp_path / "new.txt", [line.replace("\t", "\tx", 3) for line in lines]).replace(src)
        elif change == "appended":
            with src.open("a") as f:
                f.write(lines[0] + "\n")
        else:
            src.unlink()
        return n

    monkeypatch.setattr(stream, "count_lines", then_changed)
    said = "removed while it was being converted" if change == "removed" else (
        "changed while it was being converted (replaced, rewritten or appended to); convert it once it is complete")
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}: {re.escape(said)}$"):
        convert("criteo", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parent", ["there", "made for it"])
def test_a_second_writer_while_a_conversion_reads_its_input_is_refused(criteo_sample: Path, tmp_path: Path,
                                                                      monkeypatch, parent: str) -> None:
    # --out was locked from the staging folder on: a second `--overwrite` writer that started while
    # the first read its input passed both checks, both said they wrote --out, and it held one's.
    import subprocess
    import sys

    from embshard.datasets.convert import stream

    out = tmp_path / "out" if parent == "there" else tmp_path / "new" / "out"
    src = _write_lines(tmp_path / "day.txt", _criteo_lines(criteo_sample, 200))
    counted, seconds = stream.count_lines, []

    def another_writer_meanwhile(path: Path) -> int:
        seconds.append(subprocess.run([sys.executable, "-m", "embshard.cluster.cli", "data", "synth", "--out",
                                       str(out), "--rows", "100", "--max-cardinality", "20", "--overwrite"],
                                      capture_output=True, text=True, timeout=300))
        return counted(path)

    monkeypatch.setattr(stream, "count_lines", another_writer_meanwhile)
    spec = convert("criteo", src, out, overwrite=True)
    [second] = seconds
    assert second.returncode == 2 and re.search(rf"{re.escape(str(out))}: another embshard process is writing it "
                                                r"\(pid \d+ .*\); wait for it to end", second.stderr), second.stderr
    assert DatasetSpec.load(out) == spec and sum(spec.rows.values()) == 200
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "day.txt") == ["out"]  # no lock file left


def test_a_min_count_no_value_reaches_is_a_warning(criteo_sample: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Said only as 100% OOV in the table, and accepted by `plan` and `train`.
    src = _write_lines(tmp_path / "day.txt", _criteo_lines(criteo_sample, 200))
    convert("criteo", src, tmp_path / "out", min_count=1_000_000)
    assert ("warning: no train value of C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11, C12, C13, C14, C15, C16, "
            "C17, C18, C19, C20, C21, C22, C23, C24, C25, C26 occurs --min-count 1000000 times: each of its ids is "
            "the OOV id, and it tells the model nothing; lower --min-count") in capsys.readouterr().err


def test_a_failed_conversion_leaves_no_folder_it_made_for_its_out(criteo_sample: Path, tmp_path: Path) -> None:
    # The folders above --out are made for its lock before the input is read.
    src = _write_lines(tmp_path / "day.txt", ["not\ta\tcriteo\tline"])
    with pytest.raises(DataError):
        convert("criteo", src, tmp_path / "new" / "a" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day.txt"]


def test_input_lists_are_checked(criteo_sample: Path, tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "train.txt", _criteo_lines(criteo_sample))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder without criteo input files"):
        convert("criteo", [src, tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty").rmdir()  # a folder inside an input folder is refused on its own
    with pytest.raises(DataError, match=r"train\.txt: given more than once"):
        convert("criteo", [src, tmp_path], tmp_path / "out")
    with pytest.raises(DataError, match=r"--dedup-key 'id': criteo input has no such column"):
        convert("criteo", src, tmp_path / "out", dedup_key="id")
    with pytest.raises(DataError, match=r"movielens: give one release folder"):
        convert("movielens", [tmp_path, tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["dangling link", "link loop", "folder"])
def test_a_folder_entry_that_is_no_regular_file_is_one_line_not_rows_left_out(criteo_sample: Path, tmp_path: Path,
                                                                             entry: str) -> None:
    # Skipped without a word: a day of a time-ordered log whose link pointed at an unmounted disk
    # was missing from the data, exit 0.
    days = tmp_path / "days"
    days.mkdir()
    _write_lines(days / "day_0.txt", _criteo_lines(criteo_sample, 100))
    odd = days / "day_1.txt"
    if entry == "dangling link":
        odd.symlink_to("/mnt/unmounted/day_1.txt")
    elif entry == "link loop":
        odd.symlink_to(odd.name)
    else:
        odd.mkdir()
    with pytest.raises(DataError, match=rf"^{re.escape(str(odd))}: in the input folder, not a regular file "
                                        r"\(a broken link, a folder or a pipe\): its rows would be left out; "
                                        r"remove it, or name the criteo input files to read$"):
        convert("criteo", days, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_avazu_header_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    # Its bytes became U+FFFD: two files whose headers differ there were read as one log, and a
    # feature was named "site_\ufffdd".
    rows = [_avazu_line(i, i % 2, f"141021{i % 24:02d}") for i in range(20)]
    src = tmp_path / "a.csv"
    src.write_bytes(AVAZU_HEADER.replace("site_id", "site_\xe9d").encode("latin-1") + b"\n"
                    + "\n".join(rows).encode() + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}: line 1 \(the header\) is not UTF-8 text "
                                        r"\(byte \d+: b'\\xe9'\); save it as UTF-8$"):
        convert("avazu", src, tmp_path / "out")


def test_avazu_files_deduplicated_on_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = [_avazu_line(i, int(i % 4 == 0), f"141021{i % 24:02d}") for i in range(30)]
    # The second file overlaps the first by 10 rows (ids 1020..1029) and adds 20 new ones.
    second = [_avazu_line(i, int(i % 4 == 0), f"141022{i % 24:02d}") for i in range(20, 50)]
    a = _write_lines(tmp_path / "a.csv", [AVAZU_HEADER, *first])
    b = _write_lines(tmp_path / "b.csv", [AVAZU_HEADER, *second])
    both = convert("avazu", [a, b], tmp_path / "both")
    assert sum(both.rows.values()) == 60
    capsys.readouterr()
    spec = convert("avazu", [a, b], tmp_path / "dedup", dedup_key="id")
    assert "dropped 10 rows repeating an earlier row's 'id'" in capsys.readouterr().out
    assert sum(spec.rows.values()) == 50 and "first row per 'id'" in spec.source
    # The split is fixed by position before repeats are dropped: train holds positions 0..47, i.e.
    # all 30 (Tuesday) rows of a.csv and b.csv's rows at 40..47 (Wednesday); 30..39 were repeats.
    train = pq.read_table(tmp_path / "dedup" / "train")["day_of_week"].to_numpy()
    assert np.bincount(train).tolist() == [0, 30, 8]
    with pytest.raises(DataError, match=r"c\.csv: line 1 \(the header\) differs from that of .*a\.csv"):
        c = _write_lines(tmp_path / "c.csv", [AVAZU_HEADER.replace("C1,", "C0,"), *second])
        convert("avazu", [a, c], tmp_path / "bad")
    # A file given twice under two names leaves splits empty: the error said 0 rows, not why.
    twin = _write_lines(tmp_path / "twin.csv", [AVAZU_HEADER, *first])
    with pytest.raises(DataError,
                       match=r"\(train 30, valid 0, test 0; dropped 30 rows repeating an earlier row's 'id'\)"):
        convert("avazu", [a, twin], tmp_path / "twins", dedup_key="id")


def test_cli_several_inputs_and_dedup_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("embshard.progress.is_terminal", lambda stream: True)  # bars as a terminal shows them
    rows = [_avazu_line(i, i % 2, f"141021{i % 24:02d}") for i in range(25)]
    a = _write_lines(tmp_path / "a.csv", [AVAZU_HEADER, *rows[:20]])
    b = _write_lines(tmp_path / "b.csv", [AVAZU_HEADER, *rows[:5], *rows[20:]])
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "convert", "avazu", str(a), str(b), "--out", str(tmp_path / "o"),
                              "--dedup-key", "id"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "dropped 5 rows repeating an earlier row's 'id'" in out
    # each file's progress bar says which of how many it is
    assert "avazu: encoding [1/2] a.csv" in err and "avazu: encoding [2/2] b.csv" in err
    assert sum(DatasetSpec.load(tmp_path / "o").rows.values()) == 25


def test_movielens_read_in_small_blocks_gives_identical_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Files are read block by block (read whole, ratings peaked at 4x their typed size).
    dat = write_ml1m_like(tmp_path / "ml-1m", users=30, movies=12, per_user=6)
    ratings = (dat / "ratings.dat").read_text().splitlines()
    (dat / "ratings.dat").write_text("\n".join(ratings[:50] + ["", "7::x::4::978300000"] + ratings[50:]) + "\n")
    csv = tmp_path / "ml-20m"
    csv.mkdir()
    (csv / "ratings.csv").write_text("\n\nuserId,movieId,rating,timestamp\n" + "".join(
        f"{u},{10 * (u % 3 + 1)},{(u * 7) % 10 / 2 + 0.5},{1000 + u}\n" for u in range(60)) + "1,10,4\n")
    (csv / "movies.csv").write_text('movieId,title,genres\n10,"President, The (1995)",Comedy|Drama\n'
                                    "20,Heat (1995),Action\n30,Untitled,(no genres listed)\n")
    warnings = []
    for src in (dat, csv):
        convert("movielens", src, tmp_path / f"{src.name}-whole")
        whole = capsys.readouterr().err
        with monkeypatch.context() as m:
            m.setattr(text, "BLOCK_BYTES", 64)  # a few lines a block
            convert("movielens", src, tmp_path / f"{src.name}-blocks")
        assert read_all(tmp_path / f"{src.name}-blocks").equals(read_all(tmp_path / f"{src.name}-whole"))
        blocks = capsys.readouterr().err
        reported = [line for line in whole.splitlines() if line.startswith("warning:")]  # each on its own line
        assert reported == [line for line in blocks.splitlines() if line.startswith("warning:")]
        warnings += reported
    assert [w.split("/")[-1] for w in warnings] == [
        "ratings.dat:52: column 'movieId': 'x' is not an integer of at most 18 digits; line skipped",
        "ratings.csv:64: expected 4 fields, found 3; line skipped",
        # Each of its 60 users rates once: fewer times than the default --min-count 2.
        "warning: no train value of userId occurs --min-count 2 times: each of its ids is the OOV id, and it tells "
        "the model nothing; lower --min-count"]


def test_movielens_features_counted_per_user_and_movie_as_per_rating(tmp_path: Path) -> None:
    src = write_ml1m_like(tmp_path / "ml", users=40, movies=15, per_user=8)
    (src / "movies.dat").write_text((src / "movies.dat").read_text().replace("::Horror", "::Horror|Drama"))
    release = movielens.load_release(src, text.Malformed(src, False))
    table = movielens._labelled(release, "click")
    train = movielens.split_plan(table, "random", 3).codes(np.arange(table.num_rows)) == 0
    encoded, vocabs = movielens._encoded_features(release, table, "click", train, min_count=2)
    for owner, key, names in ((release.users, "userId", movielens.USER_FEATURES),
                              (release.movies, "movieId", movielens.MOVIE_FEATURES)):
        at = pc.index_in(table[key], value_set=owner[key])
        for name in names:
            per_rating = owner[name].take(at).filter(pa.array(train))
            builder = VocabularyBuilder()
            builder.add(pc.list_flatten(per_rating) if name == "genres" else per_rating)
            want = builder.build(min_count=2)
            assert vocabs[name].values.equals(want.values), name
            per_rating_ids = movielens._encode(want, owner[name].take(at).combine_chunks())
            assert encoded[name].to_pylist() == per_rating_ids.to_pylist()


def test_dedup_keeps_the_first_row_of_each_key_and_every_keyless_row(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Keys are held as 128-bit digests (Arrow's group_by on the strings took ~275 bytes a row): the
    # earliest row of each key must still win, wherever its repeats fall, and keyless rows all stay.
    lines = [_avazu_line(i, i % 2, "14102100") for i in range(12)]
    keyless = [",".join(["", *line.split(",")[1:]]) for line in lines[:3]]
    repeats = [line.replace("14102100", "14102200", 1) for line in (lines[2], lines[7], lines[7])]
    path = _write_lines(tmp_path / "a.csv", [AVAZU_HEADER, lines[0], *keyless, *lines[1:6], repeats[0],
                                             *lines[6:], *repeats[1:]])
    spec = convert("avazu", path, tmp_path / "out", dedup_key="id", split="random")
    assert "dropped 3 rows repeating an earlier row's 'id'" in capsys.readouterr().out
    assert sum(spec.rows.values()) == 15
    # The repeats (Wednesday rows) are gone: each key kept its first (Tuesday) row.
    assert set(read_all(tmp_path / "out")["day_of_week"].to_numpy()) == {1}


def test_dedup_on_a_column_no_row_fills_keeps_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [",".join(["", *_avazu_line(i, i % 2, "14102100").split(",")[1:]]) for i in range(10)]
    spec = convert("avazu", _write_lines(tmp_path / "a.csv", [AVAZU_HEADER, *lines]), tmp_path / "out", dedup_key="id")
    assert sum(spec.rows.values()) == 10 and "dropped 0 rows" in capsys.readouterr().out


def test_an_input_that_is_no_regular_file_and_a_uri_with_one_slash_are_named(tmp_path: Path) -> None:
    # /dev/null was "input file not found"; `s3:/b/x` wrote a local folder named `s3:`.
    from embshard.datasets.storage import location
    from embshard.errors import StorageError

    with pytest.raises(DataError, match=r"^/dev/null: not a regular file; give a criteo input file$"):
        convert("criteo", Path("/dev/null"), tmp_path / "out")
    for typo in ("s3:/bucket/x", "S3:/bucket/x", "hdfs:/user/x"):
        with pytest.raises(StorageError, match=rf"^{typo}: a URI with one '/' after its scheme; a location is"):
            location(typo)
    assert location("file:/tmp/x") == Path("/tmp/x") == location("file:///tmp/x")  # RFC 8089 allows both
    assert isinstance(location("data:x/y"), Path) and isinstance(location("c:/x"), Path)
