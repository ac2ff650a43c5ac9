"""The retrieval part of the dataset contract: feature roles, the item catalog, item_frequency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_datasets_convert import ML100K_ITEMS, ML100K_RATINGS, read_all

from embshard.datasets.catalog import read_catalog
from embshard.datasets.convert import convert
from embshard.datasets.schema import ITEM_FREQUENCY, SPEC_FILE, DatasetSpec
from embshard.errors import DataError


def ml100k(tmp_path: Path) -> Path:
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML100K_RATINGS))
    (src / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n")
    (src / "u.item").write_bytes(("\n".join(ML100K_ITEMS) + "\n").encode("latin-1"))
    out = tmp_path / "out"
    convert("movielens", src, out, min_count=1)
    return out


def test_movielens_roles_catalog_and_item_frequency(tmp_path: Path) -> None:
    out = ml100k(tmp_path)
    spec = DatasetSpec.load(out)
    assert spec.with_role("query") == ["userId", "gender", "age", "occupation", "zip"]
    assert spec.with_role("item") == ["movieId", "year", "genres"]
    assert spec.catalog is not None and spec.catalog.item_id == "movieId"
    catalog = read_catalog(out, spec)
    assert catalog.num_rows == spec.feature("movieId").cardinality == 4  # OOV id 0 + 3 movies
    # Every row's movie features are its catalog row's: the catalog is the movies, by id.
    rows = read_all(out)
    for i in range(rows.num_rows):
        movie = rows["movieId"][i].as_py()
        assert movie > 0
        for name in ("year", "genres"):
            assert rows[name][i].as_py() == catalog[name][movie].as_py()
    assert catalog["genres"][0].as_py() == [] and catalog["year"][0].as_py() == 0
    # item_frequency: the share of train positives that are the row's movie, in every split.
    train = pq.read_table(out / "train")
    positives = train.filter(pc.equal(train["label"], 1.0))["movieId"].to_numpy()
    share = np.bincount(positives, minlength=4) / len(positives)
    np.testing.assert_allclose(rows[ITEM_FREQUENCY].to_numpy(), share[rows["movieId"].to_numpy()], rtol=1e-6)
    assert read_catalog(out, spec, 1, 3)["movieId"].to_pylist() == [1, 2]


def test_dataset_json_without_roles_or_catalog_still_loads(tmp_path: Path) -> None:
    out = ml100k(tmp_path)
    raw = json.loads((out / SPEC_FILE).read_text())
    del raw["catalog"]
    for f in raw["sparse"]:
        del f["role"]
    (out / SPEC_FILE).write_text(json.dumps(raw))
    spec = DatasetSpec.load(out)
    assert spec.catalog is None and all(f.role == "" for f in spec.sparse)
    with pytest.raises(DataError, match="has no item catalog"):
        read_catalog(out, spec)


def test_bad_role_and_damaged_catalog_are_one_line(tmp_path: Path) -> None:
    out = ml100k(tmp_path)
    raw = json.loads((out / SPEC_FILE).read_text())
    raw["sparse"][0]["role"] = "user"
    (out / SPEC_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"dataset.json: sparse feature 'userId': role 'user'"):
        DatasetSpec.load(out)
    raw["sparse"][0]["role"] = "query"
    (out / SPEC_FILE).write_text(json.dumps(raw))
    spec = DatasetSpec.load(out)
    catalog = read_catalog(out, spec)
    pq.write_table(catalog.slice(0, 3), out / spec.catalog.path)
    with pytest.raises(DataError, match=r"items/part-00000.parquet: 3 rows, dataset.json records 4"):
        read_catalog(out, spec)
