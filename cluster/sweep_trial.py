"""One sweep trial, run inside a Ray Tune trial: its Ray Train runs, then one point per budget.

Every run goes through the same driver steps as `embshard train` (`plan_for_training`, then
`train_on_ray`: a TorchTrainer with its own worker group), so a trial trains exactly what the
method seam plans. A trial's runs live in `<sweep>/runs/<trial key>/<run>`; a trial that Tune
restarts after a kill re-enters those folders and resumes each run from its newest checkpoint.

A point (`sweep_methods.point`) is tagged with the method's knobs (`method_knobs`) and, where
the sweep varies settings, the trial's `setting` (`{"train.epochs": 12}`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embshard.cluster.launch import plan_for_training, train_on_ray
from embshard.cluster.run_lock import run_lock
from embshard.cluster.sweep_methods import Point, TrialRuns
from embshard.cluster.sweep_plan import Trial, method_knobs, with_knobs
from embshard.config import JobConfig
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import write_whole
from embshard.planner.types import DimensionPlan
from embshard.typed_config import from_dict

POINTS_FILE = "points.json"


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune's function trainable: `config` holds the job, the trial and the sweep folder."""
    from ray import tune

    trial = Trial.from_json(config["trial"])
    base = with_knobs(from_dict(JobConfig, config["job"]), trial.knobs)
    run_dir = Path(config["out"]) / "runs" / trial.key
    points = trial_points(base, trial, config["budgets"], run_dir)
    _write_json(run_dir / POINTS_FILE, points)
    tune.report({"points": json.dumps(points), "trial": trial.key})


def trial_points(base: JobConfig, trial: Trial, budgets: list[float], run_dir: Path) -> list[Point]:
    """The trial's points, each with the method's knobs (`sweep-merge` tells variants apart by
    them) and, where the sweep varies settings, the trial's (which report the point is in)."""
    tags = {"knobs": method_knobs(base, trial.method)} | (
        {"setting": dict(trial.settings)} if trial.settings else {})
    runs = TrialRuns(base, DatasetSpec.load(base.data.path), trial, budgets, run_dir)
    return [{**p, **tags} for p in runs.points(_train)]


def _train(cfg: JobConfig, method: str | None) -> tuple[DimensionPlan, dict[str, Any]]:
    with run_lock(cfg):
        bundle = plan_for_training(cfg, method)
        summary = train_on_ray(cfg, method)
    return bundle.dimension_plan, summary


def _write_json(path: Path, data: Any) -> None:
    write_whole(path, json.dumps(data, indent=1) + "\n")
