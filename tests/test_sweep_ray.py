"""`embshard sweep` on local Ray Tune: two trials side by side, the sweep killed (SIGKILL) after
the first one finished, then resumed: the finished trial is not rerun and the report is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
EMBSHARD = [sys.executable, "-m", "embshard.cluster.cli"]


def sweep_args(data: Path, out: Path, *extra: str) -> list[str]:
    # uniform trains once; autodim searches, then retrains: the longer trial, still running when
    # uniform's is done.
    return [*EMBSHARD, "sweep", "configs/default.yaml", "--workers", "1", "--parallel", "2",
            "--methods", "uniform,autodim", "--budgets", "1", "--seeds", "1", "--out", str(out),
            "--set", f"data.path={data}", "--set", "data.batch_size=256", "--set", "metrics.enabled=false",
            "--set", f"output_dir={out.parent / 'unused'}", *extra]


def test_sweep_runs_trials_in_parallel_and_resumes_after_a_kill(tmp_path):
    data, out = tmp_path / "data", tmp_path / "sweep"
    synth = subprocess.run([*EMBSHARD, "data", "synth", "--out", str(data), "--rows", "6000",
                            "--max-cardinality", "500", "--planted"], cwd=REPO, env=ENV, capture_output=True)
    assert synth.returncode == 0, synth.stderr[-2000:]
    uniform_points = out / "runs" / "uniform-b1-s0" / "points.json"
    autodim_points = out / "runs" / "autodim-b1-s0" / "points.json"

    first = subprocess.Popen(sweep_args(data, out), cwd=REPO, env=ENV, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not uniform_points.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert uniform_points.exists(), first.communicate(timeout=60)[0].decode()[-3000:]
        # Both trials started together: the second one's runs exist already.
        assert (out / "runs" / "autodim-b1-s0" / "search").is_dir()
        time.sleep(4)  # Tune records a finished trial within a second or so (sweep_run.STATE_EVERY_S)
        assert not autodim_points.exists(), "the longer trial finished before the kill; nothing was tested"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = uniform_points.stat().st_mtime_ns

    resumed = subprocess.run(sweep_args(data, out, "--resume"), cwd=REPO, env=ENV, capture_output=True,
                             timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert uniform_points.stat().st_mtime_ns == finished  # the finished trial was not run again
    assert "trial uniform" not in resumed.stderr.decode()
    assert "trial autodim seed 0: budget 1: AUC" in resumed.stderr.decode()
    rep = json.loads((out / "sweep-data.json").read_text())
    assert sorted((p["method"], p["budget"]) for p in rep["points"]) == [("autodim", 1.0), ("uniform", 1.0)]
    assert all(0.5 < p["value"] <= 1 for p in rep["points"])
    assert rep["planted"]["bayes_auc"] > 0.5 and len(rep["planted"]["configs"]) == 2
    assert (out / "sweep-data.png").is_file() and (out / "sweep-data.md").is_file()
    assert list((out / "tune").glob("experiment_state-*.json"))  # Ray Tune's own experiment folder
