"""`embshard sweep --out s3://...` on the real S3 server (moto's, tests/s3_server.py): Ray Tune's
experiment, the spec and the report land in the bucket; a missing bucket and a second fresh sweep
there are refused in one line, and --resume restores the finished sweep from the bucket (nothing
rerun) and reports again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EMBSHARD = [sys.executable, "-m", "embshard.cluster.cli"]


def test_sweep_keeps_its_experiment_and_report_in_the_bucket(tmp_path, s3):
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}  # `s3` put the server's variables in os.environ
    data, out = tmp_path / "data", s3.uri("sweeps/one")
    synth = subprocess.run([*EMBSHARD, "data", "synth", "--out", str(data), "--rows", "3000",
                            "--max-cardinality", "200"], cwd=REPO, env=env, capture_output=True)
    assert synth.returncode == 0, synth.stderr[-2000:]
    args = [*EMBSHARD, "sweep", "configs/default.yaml", "--workers", "1", "--parallel", "1",
            "--methods", "uniform", "--budgets", "1", "--seeds", "1", "--out", out,
            "--set", f"data.path={data}", "--set", "data.batch_size=256", "--set", "train.max_steps=3",
            "--set", "train.eval_max_batches=1", "--set", "metrics.enabled=false",
            "--set", f"output_dir={tmp_path / 'outputs'}"]

    missing = subprocess.run([*args, "--out", "s3://no-such-bucket/sweep"], cwd=REPO, env=env,
                             capture_output=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.decode().strip().splitlines()[-1] == \
        "embshard: error: s3://no-such-bucket/sweep: the bucket does not exist"

    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    keys = s3.keys("sweeps/one/")
    assert {"sweeps/one/sweep-data.json", "sweeps/one/sweep-data.md", "sweeps/one/sweep-data.png",
            "sweeps/one/sweep-spec.json"} <= set(keys)
    assert any(k.startswith("sweeps/one/tune/experiment_state-") for k in keys)  # Tune's own state
    assert f"{out}/sweep-data.json" in first.stdout.decode()
    points = json.loads(s3.server.client().get_object(Bucket=s3.name, Key="sweeps/one/sweep-data.json")
                        ["Body"].read())["points"]
    assert [(p["method"], p["budget"]) for p in points] == [("uniform", 1.0)] and 0 < points[0]["value"] <= 1
    # The runs themselves stay local, in a folder named after the URI.
    assert (tmp_path / "outputs" / "sweeps" / "s3" / s3.name / "sweeps" / "one" / "runs" / "uniform-b1-s0").is_dir()

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert again.returncode == 2 and f"embshard: error: --out {out}: not empty" in again.stderr.decode()

    resumed = subprocess.run([*args, "--resume"], cwd=REPO, env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "trial uniform" not in resumed.stderr.decode()  # finished in the bucket's state: not rerun
    assert "claim:" in resumed.stdout.decode()
