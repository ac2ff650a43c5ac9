"""Ctrl-C on `embshard train` (SIGINT to its process group, as a terminal sends it): every rank
finishes its step, a checkpoint is written there, the command says how to continue and exits 130;
the same command again resumes from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import profiled_synth

pytestmark = pytest.mark.slow
EMBSHARD = Path(sys.executable).with_name("embshard")


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(EMBSHARD), "train", "configs/default.yaml", "--workers", "2",
            "--set", f"data.path={data}", "--set", f"output_dir={out}", "--set", "data.batch_size=256",
            "--set", "train.epochs=20", "--set", "checkpoint.every_steps=5", "--set", "train.progress=false",
            *extra]


def test_ctrl_c_checkpoints_the_step_and_exits_130(tmp_path):
    data = profiled_synth(tmp_path / "data", rows=20000, max_cardinality=2000)
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(train_command(data, out), cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = out / "checkpoints" / "step-000005"
    deadline = time.monotonic() + 240
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.is_dir(), "the run wrote no checkpoint in time"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("embshard: stopped by Ctrl-C after step ")]
    assert len(stopped) == 1 and "run the same command again" in stopped[0], stderr[-3000:]
    last = stopped[0]
    step = int(last.split("after step ")[1].split(",")[0])
    stopped_at = out / "checkpoints" / f"step-{step:06d}"
    assert step >= 5 and (stopped_at / "manifest.json").is_file() and str(stopped_at) in last
    assert not (out / "stop-requested").exists()

    again = subprocess.run(train_command(data, out, "--set", f"train.max_steps={step + 2}"), cwd=repo, env=env,
                           text=True, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {stopped_at} at step {step}" in again.stdout + again.stderr
