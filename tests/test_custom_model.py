"""A user's own model end to end: examples/custom_model's DeepFM, defined outside the package and
named `deepfm:build` in its config, trains with MDE + MLET through `embshard train` on 2 local Ray
workers (which import it from PYTHONPATH, inherited from the driver), is stopped by Ctrl-C
(SIGINT to its process group, as a terminal sends it: every rank finishes its step, a checkpoint
is written there, the command says how to continue and exits 130), resumes from that checkpoint
with the same command and exports. The Ctrl-C run is the first of the two runs a resume needs
anyway: one Ray start fewer than testing Ctrl-C on a run of its own."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from embshard.datasets.reader import ParquetBatchReader
from embshard.trainer.export import load_serving

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_model"
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONPATH": os.pathsep.join(p for p in (str(EXAMPLE), os.environ.get("PYTHONPATH")) if p)}


def embshard(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embshard.cluster.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def train_command(data: Path, run: Path, *extra: str) -> list[str]:
    # 20 epochs: still training when the Ctrl-C comes; the resumed run stops at its max_steps.
    return [sys.executable, "-m", "embshard.cluster.cli", "train", str(EXAMPLE / "config.yaml"), "--workers", "2",
            "--set", f"data.path={data}", "--set", f"output_dir={run}", "--set", "data.batch_size=128",
            "--set", "train.epochs=20", "--set", "checkpoint.every_steps=2", "--set", "train.progress=false",
            "--set", "train.eval_max_batches=2", "--set", "metrics.enabled=false", *extra]


def test_deepfm_from_outside_the_package_trains_stops_on_ctrl_c_resumes_and_exports(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    synth = embshard("data", "synth", "--out", str(data), "--rows", "6000", "--max-cardinality", "500")
    assert synth.returncode == 0, synth.stderr

    proc = subprocess.Popen(train_command(data, run), cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = run / "checkpoints" / "step-000004"
    deadline = time.monotonic() + 240
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.is_dir(), "the run wrote no checkpoint in time"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    stopped = [line for line in stderr.splitlines()
               if line.startswith("embshard: stopped by Ctrl-C or SIGTERM after step ")]
    assert len(stopped) == 1 and "run the same command again" in stopped[0], stderr[-3000:]
    last = stopped[0]
    step = int(last.split("after step ")[1].split(",")[0])
    stopped_at = run / "checkpoints" / f"step-{step:06d}"
    assert step >= 4 and (stopped_at / "manifest.json").is_file() and str(stopped_at) in last
    assert not (run / "stop-requested").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == step and summary["resumed_from"] is None
    plan = json.loads((run / "plan" / "plan.json").read_text())["dimension_plan"]
    assert any(b["mlet_width"] for t in plan["tables"] for b in t["blocks"])  # MLET
    assert len({b["dim"] for t in plan["tables"] for b in t["blocks"]}) > 1  # MDE

    again = subprocess.run(train_command(data, run, "--set", f"train.max_steps={step + 2}"), cwd=REPO, env=ENV,
                           text=True, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {stopped_at} at step {step}" in again.stdout + again.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == step + 2 and resumed["resumed_from"].endswith(stopped_at.name)
    assert math.isfinite(resumed["last_loss"]) and 0.0 <= resumed["valid_auc"] <= 1.0

    exported = embshard("export", str(run / "checkpoints"), "--out", str(tmp_path / "serving"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    manifest = json.loads((tmp_path / "serving" / "serving.json").read_text())
    assert manifest["model"]["arch"] == "deepfm:build"

    sys.path.insert(0, str(EXAMPLE))  # loading rebuilds the arch: it must be importable here too
    try:
        model = load_serving(tmp_path / "serving")
    finally:
        sys.path.remove(str(EXAMPLE))
    assert type(model.model).__name__ == "DeepFM"
    batch = next(iter(ParquetBatchReader(data, "valid", 64, shuffle=False)))
    with torch.no_grad():
        logits = model(batch.dense, batch.sparse)
    assert logits.shape == (64,) and torch.isfinite(logits).all()


def test_a_driver_without_the_model_on_its_path_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    done = embshard("plan", str(EXAMPLE / "config.yaml"), "--world-size", "1", "--out", str(tmp_path / "p"), env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("embshard: error: model.arch: cannot import module 'deepfm' "
                                   "(ModuleNotFoundError: No module named 'deepfm')")
