"""A user's own model end to end: examples/custom_model's DeepFM, defined outside the package and
named `deepfm:build` in its config, trains with MDE + MLET through `embshard train` on 2 local Ray
workers (which import it from PYTHONPATH, inherited from the driver), checkpoints, resumes and
exports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embshard.datasets.reader import ParquetBatchReader
from embshard.trainer.export import load_serving

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_model"
ENV = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONPATH": os.pathsep.join(p for p in (str(EXAMPLE), os.environ.get("PYTHONPATH")) if p)}


def embshard(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embshard.cluster.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def train(data: Path, run: Path, steps: int) -> subprocess.CompletedProcess:
    return embshard("train", str(EXAMPLE / "config.yaml"), "--workers", "2",
                    "--set", f"data.path={data}", "--set", f"output_dir={run}", "--set", "data.batch_size=128",
                    "--set", f"train.max_steps={steps}", "--set", "checkpoint.every_steps=2",
                    "--set", "train.eval_max_batches=2", "--set", "metrics.enabled=false")


def test_deepfm_from_outside_the_package_trains_resumes_and_exports(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    synth = embshard("data", "synth", "--out", str(data), "--rows", "6000", "--max-cardinality", "500")
    assert synth.returncode == 0, synth.stderr

    first = train(data, run, steps=4)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    assert math.isfinite(summary["last_loss"]) and 0.0 <= summary["valid_auc"] <= 1.0
    plan = json.loads((run / "plan" / "plan.json").read_text())["dimension_plan"]
    assert any(b["mlet_width"] for t in plan["tables"] for b in t["blocks"])  # MLET
    assert len({b["dim"] for t in plan["tables"] for b in t["blocks"]}) > 1  # MDE

    second = train(data, run, steps=6)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == 6 and resumed["resumed_from"].endswith("step-000004")

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
