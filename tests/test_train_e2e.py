"""End to end: `embshard data synth` then `embshard train` through Ray Train on 2 local workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EMBSHARD = [sys.executable, "-m", "embshard.cluster.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*EMBSHARD, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_train_through_ray_learns(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    synth = _run("data", "synth", "--out", str(data), "--rows", "60000", "--max-cardinality", "20000")
    assert synth.returncode == 0, synth.stderr
    train = _run(
        "train", "configs/default.yaml", "--workers", "2",
        "--set", f"data.path={data}", "--set", f"output_dir={run}",
        "--set", "data.batch_size=512", "--set", "train.log_every=5",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "validation AUC" in train.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 48000 // 2 // 512  # both ranks take the same number of full batches
    assert summary["samples"] == summary["steps"] * 512 * 2
    assert summary["last_loss"] < summary["first_loss"]
    # The hidden model's Bayes AUC is ~0.8; one short epoch must get clearly above chance.
    assert summary["valid_auc"] > 0.65
    plan = json.loads((run / "plan" / "plan.json").read_text())
    assert plan["shard_plan"]["topology"]["world_size"] == 2
