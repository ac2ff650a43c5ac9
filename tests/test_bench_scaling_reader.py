"""bench/scaling.py and bench/reader.py (with --s3) run end to end in their --quick modes and print valid JSON."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    out = tmp_path / "scaling"
    done = _bench("scaling.py", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    *points, summary = _json_lines(done.stdout)
    assert [(p["curve"], p["x"]) for p in points] == [("rows", 20_000), ("rows", 50_000), ("mlet", 50_000)]
    for p in points:
        assert p["torchrec"]["samples_per_s"] > 0 and p["embshard"]["samples_per_s"] > 0
        # --quick runs 2 interleaved pairs; the ratio is the median of the per-pair ratios.
        tr, es = p["torchrec"]["samples_per_s_per_pass"], p["embshard"]["samples_per_s_per_pass"]
        assert len(tr) == len(es) == len(p["pair_ratios"]) == 2
        assert p["pair_ratios"] == pytest.approx([e / t for t, e in zip(tr, es, strict=True)], abs=1e-3)
        assert p["ratio"] == pytest.approx(statistics.median(p["pair_ratios"]), abs=1e-3)
        assert p["ratio_min"] == min(p["pair_ratios"]) and p["ratio_max"] == max(p["pair_ratios"])
        low, high = p["load_avg_1m"]
        assert 0 <= low <= high
        assert p["foreseen_step_bytes_per_rank"] > 0
        for side in ("torchrec", "embshard"):
            assert len(p[side]["peak_rss_per_rank"]) == len(p[side]["step_peak_above_built_per_rank"]) == 2
            assert all(b <= k for b, k in zip(p[side]["built_rss_per_rank"], p[side]["peak_rss_per_rank"], strict=True))
        assert p["embshard"]["planned_within_5pct"], p["embshard"]
    collapse = points[-1]["embshard"]["collapse"]
    assert collapse["no_foreign_gather"] and collapse["checkpoint_bytes"] > 0
    assert summary["bench"] == "scaling_summary"
    assert summary["ratio_ranges"]["rows@20000"] == [points[0]["ratio_min"], points[0]["ratio_max"]]
    assert summary["load_avg_1m"][0] <= summary["load_avg_1m"][1]
    assert set(summary["growth_exponents"]["rows"]) >= {"torchrec_samples_per_s", "embshard_peak_rss_per_rank"}
    assert [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] == [*points, summary]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the script imports torch and TorchRec before it reads its arguments
def test_scaling_refuses_to_replace_results(tmp_path):
    out = tmp_path / "scaling"
    out.with_suffix(".png").write_bytes(b"an earlier plot")
    done = _bench("scaling.py", "--quick", "--out", str(out), timeout=300)
    assert done.returncode == 2
    assert "scaling.png exists; pass --overwrite" in done.stderr.strip().splitlines()[-1]
    assert out.with_suffix(".png").read_bytes() == b"an earlier plot"


@pytest.mark.slow  # imports torch and plans every point before it refuses
def test_scaling_refuses_a_point_it_foresees_over_the_memory_budget(tmp_path):
    out = tmp_path / "scaling"
    done = _bench("scaling.py", "--quick", "--curve", "tables", "--max-memory", "100M", "--out", str(out),
                  timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("scaling.py: error: tables x=3 (torchrec): foreseen "), line
    assert "dot interaction of 4 features at batch 64" in line and "--max-memory" in line
    assert not _json_lines(done.stdout)  # refused before any point ran
    assert not out.with_suffix(".jsonl").exists() and not out.with_suffix(".png").exists()


@pytest.mark.slow
def test_reader_quick():
    done = _bench("reader.py", "--quick", "--s3")  # --s3: its own moto server, as the tests start it
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = _json_lines(done.stdout)
    assert result["bench"] == "reader"
    assert result["reader_rows_per_s"] > 0 and result["reader_prefetch_1_rows_per_s"] > 0
    assert result["trainer_steps"] == 10 and result["trainer_samples_per_s"] > 0
    assert 0 <= result["trainer_data_wait_share"] < 1
    expected = result["reader_rows_per_s"] / result["trainer_samples_per_s"]
    assert result["ratio"] == pytest.approx(expected, rel=0.01, abs=0.01)
    assert result["s3_reader_rows_per_s"] > 0
    assert result["s3_ratio"] == pytest.approx(result["s3_reader_rows_per_s"] / result["trainer_samples_per_s"],
                                               rel=0.01, abs=0.01)
