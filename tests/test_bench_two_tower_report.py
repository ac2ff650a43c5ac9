"""bench/two_tower.py's report: it imports (it once imported a helper bench/quality.py no longer
has), aggregates seeds per config, draws the recall frontier, and refuses to replace its outputs."""

from __future__ import annotations

import json

import pytest
from conftest import bench_module


@pytest.fixture
def two_tower():
    return bench_module("two_tower")


def _row(config: str, seed: int, serve_bytes: int, recall10: float) -> dict:
    return {"config": config, "seed": seed, "embedding_serve_bytes": serve_bytes, "tower_bytes": 100,
            "test_recall@10": recall10, "test_recall@50": 5 * recall10,
            "test_ndcg@10": recall10 / 2, "test_ndcg@50": recall10}


def test_summary_is_mean_and_std_over_seeds_per_config(two_tower, tmp_path):
    rows = [_row("uniform-8", 0, 1000, 0.01), _row("mde-32@8", 0, 990, 0.03),
            _row("uniform-8", 1, 1000, 0.03), _row("mde-32@8", 1, 994, 0.03)]
    summary = two_tower.summarise(rows)
    assert [c["config"] for c in summary] == ["uniform-8", "mde-32@8"]
    uniform, mde = summary
    assert uniform["seeds"] == 2
    assert uniform["recall@10"]["mean"] == pytest.approx(0.02)
    assert uniform["recall@10"]["std"] == pytest.approx(0.0141421, abs=1e-6)
    assert uniform["recall@50"]["mean"] == pytest.approx(0.10)
    assert mde["recall@10"]["std"] == 0.0
    assert mde["embedding_serve_bytes"] == 992
    assert "| mde-32@8 | 992 | 2 | 0.0300 ± 0.0000 | 0.1500 ± 0.0000 |" in two_tower.table(summary)
    png = tmp_path / "frontier.png"
    two_tower.plot(summary, "test", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_replace_earlier_outputs(two_tower, tmp_path, capsys):
    earlier = tmp_path / "tt.json"
    earlier.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        two_tower.main(["--out", str(tmp_path / "tt")])
    assert exit_info.value.code == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert earlier.read_text() == "{}"


def test_rows_from_earlier_runs_are_reported_together(two_tower, tmp_path, capsys):
    first, second = tmp_path / "s0.json", tmp_path / "s1.json"
    first.write_text(json.dumps({"rows": [{**_row("uniform-8", 0, 1000, 0.01), "epochs": 1}]}))
    second.write_text(json.dumps({"rows": [{**_row("uniform-8", 1, 1000, 0.03), "epochs": 1}]}))
    two_tower.main(["--rows-from", str(first), str(second), "--out", str(tmp_path / "all")])
    report = json.loads((tmp_path / "all.json").read_text())
    assert [(r["config"], r["seed"]) for r in report["rows"]] == [("uniform-8", 0), ("uniform-8", 1)]
    assert report["configs"][0]["recall@10"]["mean"] == pytest.approx(0.02)
    assert (tmp_path / "all.png").is_file()
    assert "| uniform-8 | 1,000 | 2 | 0.0200 ± 0.0141 |" in capsys.readouterr().out


def test_rows_from_refuses_a_seed_twice(two_tower, tmp_path, capsys):
    first, again = tmp_path / "s0.json", tmp_path / "again.json"
    for path in (first, again):
        path.write_text(json.dumps({"rows": [{**_row("uniform-8", 0, 1000, 0.01), "epochs": 1}]}))
    with pytest.raises(SystemExit) as exit_info:
        two_tower.main(["--rows-from", str(first), str(again), "--out", str(tmp_path / "all")])
    assert exit_info.value.code == 2
    assert f"--rows-from: {again}: uniform-8 seed 0 is already in {first}" in capsys.readouterr().err
    assert not (tmp_path / "all.json").exists()


def test_rows_from_names_a_row_it_cannot_read(two_tower, tmp_path, capsys):
    # A row without a field was a KeyError from the report, rows of another type a TypeError.
    path = tmp_path / "rows.json"
    for rows, said in (([{"config": "uniform-8"}], "a row without 'seed'"), (5, "its rows are no list")):
        path.write_text(json.dumps({"rows": rows}))
        with pytest.raises(SystemExit) as exit_info:
            two_tower.main(["--rows-from", str(path), "--out", str(tmp_path / "all")])
        assert exit_info.value.code == 2
        assert f"--rows-from: {path}: not a bench/two_tower.py output ({said})" in capsys.readouterr().err


def test_the_converted_dataset_is_cached_per_source(two_tower, tmp_path, monkeypatch):
    # Its one cache folder served the first --data-root's conversion for every other.
    from embshard.datasets.schema import DatasetSpec
    from tests.movielens_fixture import write_ml1m_like

    monkeypatch.setattr(two_tower.quality, "CACHE", tmp_path / "cache")
    for root, users in (("a", 20), ("b", 30)):
        write_ml1m_like(tmp_path / root / "ml-1m", users=users, movies=10, per_user=5)
    first, second = (two_tower.prepare_dataset(tmp_path / root) for root in ("a", "b"))
    assert first != second and str(tmp_path / "b") in DatasetSpec.load(second).source
    assert two_tower.prepare_dataset(tmp_path / "a") == first
