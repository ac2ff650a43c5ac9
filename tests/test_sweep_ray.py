"""`embshard sweep` on local Ray Tune with `--out` in a bucket of the real S3 server (moto's,
tests/s3_server.py): two trials side by side, the sweep killed (SIGKILL) after the first one
finished, then resumed from the bucket: the finished trial is not rerun, and Ray Tune's
experiment, the spec and the complete report land in the bucket. A missing bucket and a second
fresh sweep there are refused in one line. One sweep covers both the kill/resume and the bucket:
each Tune sweep costs a Ray start and its trials' worker groups, the suite's largest share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
EMBSHARD = [sys.executable, "-m", "embshard.cluster.cli"]


def sweep_args(data: Path, out: str, outputs: Path, *extra: str) -> list[str]:
    # uniform trains once; autodim searches, then retrains: the longer trial, still running when
    # uniform's is done. Its knob and a setting given by --vary (one value each, so no extra trial)
    # travel through Tune to the trial, across the kill; the setting's report has a folder of its own.
    return [*EMBSHARD, "sweep", "configs/default.yaml", "--workers", "1", "--parallel", "2",
            "--methods", "uniform,autodim", "--budgets", "1", "--seeds", "1", "--out", out,
            "--vary", "autodim.alpha_every=5", "--vary", "train.epochs=1",
            "--set", f"data.path={data}", "--set", "data.batch_size=256", "--set", "metrics.enabled=false",
            "--set", f"output_dir={outputs}", *extra]


def _finished_in_bucket(s3, prefix: str) -> int:
    """How many trials Ray Tune's newest experiment state in the bucket records as finished."""
    states = [k for k in s3.keys(prefix) if k.startswith(f"{prefix}experiment_state-")]
    if not states:
        return 0
    body = s3.server.client().get_object(Bucket=s3.name, Key=max(states))["Body"].read()
    trials = [json.loads(trial) for trial, _ in json.loads(body)["trial_data"]]
    return sum(trial["status"] == "TERMINATED" for trial in trials)


def test_sweep_in_a_bucket_runs_trials_in_parallel_and_resumes_after_a_kill(tmp_path, s3):
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}  # `s3` put the server's variables in os.environ
    data, out, outputs = tmp_path / "data", s3.uri("sweeps/one"), tmp_path / "outputs"
    synth = subprocess.run([*EMBSHARD, "data", "synth", "--out", str(data), "--rows", "6000",
                            "--max-cardinality", "500", "--planted"], cwd=REPO, env=env, capture_output=True)
    assert synth.returncode == 0, synth.stderr[-2000:]

    missing = subprocess.run(sweep_args(data, "s3://no-such-bucket/sweep", outputs), cwd=REPO, env=env,
                             capture_output=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.decode().strip().splitlines()[-1] == \
        "embshard: error: s3://no-such-bucket/sweep: the bucket does not exist"

    # The runs themselves stay local, in a folder named after the URI.
    runs = outputs / "sweeps" / "s3" / s3.name / "sweeps" / "one" / "runs"
    uniform_points = runs / "uniform-b1-s0-train.epochs=1" / "points.json"
    autodim_points = runs / "autodim-b1-s0-autodim.alpha_every=5-train.epochs=1" / "points.json"
    first = subprocess.Popen(sweep_args(data, out, outputs), cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not uniform_points.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert uniform_points.exists(), first.communicate(timeout=60)[0].decode()[-3000:]
        # Both trials started together: the second one's runs exist already.
        assert (autodim_points.parent / "search").is_dir()
        # Tune records a finished trial within a second or so (sweep_run.STATE_EVERY_S) and
        # uploads that state to the bucket as it saves it; a busy machine takes longer (a fixed
        # 4 s wait was once too short, and the resume trained the finished trial again).
        while _finished_in_bucket(s3, "sweeps/one/tune/") < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _finished_in_bucket(s3, "sweeps/one/tune/") >= 1, "Tune recorded no finished trial in the bucket"
        assert not autodim_points.exists(), "the longer trial finished before the kill; nothing was tested"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    said = first.stdout.read().decode()
    assert "sweep of 2 trials, 2 at a time: a line as each finishes (log: " in said, said[-3000:]
    assert "[1/2] trial uniform (train.epochs=1) seed 0: budget 1: AUC" in said, said[-3000:]
    finished = uniform_points.stat().st_mtime_ns

    again = subprocess.run(sweep_args(data, out, outputs), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert again.returncode == 2 and f"embshard: error: --out {out}: not empty" in again.stderr.decode()

    resumed = subprocess.run(sweep_args(data, out, outputs, "--resume"), cwd=REPO, env=env, capture_output=True,
                             timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert uniform_points.stat().st_mtime_ns == finished  # the finished trial was not run again
    assert "trial uniform" not in resumed.stderr.decode()  # finished in the bucket's state
    assert "resuming the sweep of 2 trials: a line as each finishes" in resumed.stderr.decode()
    # Counted with the finished trial Tune restored.
    assert "[2/2] trial autodim (autodim.alpha_every=5, train.epochs=1) seed 0: budget 1: AUC" in \
        resumed.stderr.decode()
    assert f"{out}/train.epochs=1/sweep-data.json" in resumed.stdout.decode()
    assert "train.epochs=1: claim:" in resumed.stdout.decode()
    keys = s3.keys("sweeps/one/")
    assert {"sweeps/one/train.epochs=1/sweep-data.json", "sweeps/one/train.epochs=1/sweep-data.md",
            "sweeps/one/train.epochs=1/sweep-data.png", "sweeps/one/sweep-spec.json",
            "sweeps/one/settings.md"} <= set(keys)
    assert any(k.startswith("sweeps/one/tune/experiment_state-") for k in keys)  # Ray Tune's own state
    rep = json.loads(s3.server.client().get_object(Bucket=s3.name, Key="sweeps/one/train.epochs=1/sweep-data.json")
                     ["Body"].read())
    assert sorted((p["method"], p["budget"]) for p in rep["points"]) == [("autodim", 1.0), ("uniform", 1.0)]
    assert all(0.5 < p["value"] <= 1 for p in rep["points"])
    # Recorded for `sweep-merge` to compare.
    assert rep["config"]["data"]["batch_size"] == 256 and len(rep["dataset_sha256"]) == 64
    knobs = {p["method"]: p["knobs"] for p in rep["points"]}
    assert knobs["uniform"] == {} and knobs["autodim"]["autodim.candidates"] == [2, 8, 16, 24, 32]  # the defaults
    assert knobs["autodim"]["autodim.alpha_every"] == 5  # the trial trained with the value --vary gave
    assert rep["sweep"]["vary"] == {"autodim.alpha_every": [5], "train.epochs": [1]}
    assert rep["sweep"]["setting"] == {"train.epochs": 1}
    assert [p["setting"] for p in rep["points"]] == [{"train.epochs": 1}] * 2
    assert rep["planted"]["bayes_auc"] > 0.5 and len(rep["planted"]["configs"]) == 2
