"""bench/two_tower.py's report: it imports (it once imported a helper bench/quality.py no longer
has), aggregates seeds per config, draws the recall frontier, and refuses to replace its outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_tower():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import two_tower as module
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


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
