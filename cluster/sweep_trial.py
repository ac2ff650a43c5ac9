"""One sweep trial, run inside a Ray Tune trial: its Ray Train runs, then one point per budget.

Every run goes through the same driver steps as `embshard train` (`plan_for_training`, then
`train_on_ray`: a TorchTrainer with its own worker group), so a trial trains exactly what the
method seam plans. A trial's runs live in `<sweep>/runs/<trial key>/<run>`; a trial that Tune
restarts after a kill re-enters those folders and resumes each run from its newest checkpoint.

A point: method, budget, seed, the method's knobs (`method_knobs`), the trial's `setting` where
the sweep varies one (`{"train.epochs": 12}`), the arch's primary test
metric (`metric`, `value`, and `lower_is_better`: MSE is, AUC is not), serving parameters and
bytes (fp32), and per sparse feature the width the plan gave its most popular rows (`widths`); or
an `error` saying why there is no point (an MDE budget below its floor, a PEP target the prune run
never reached).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from embshard.cluster.launch import plan_for_training, train_on_ray
from embshard.cluster.run_lock import run_lock
from embshard.cluster.sweep_plan import (
    FP32_BYTES,
    Trial,
    autodim_retrain,
    first_run,
    method_knobs,
    pep_retrain,
    with_knobs,
)
from embshard.config import JobConfig
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import write_whole
from embshard.errors import PlanError
from embshard.planner.policies import plan_dimensions
from embshard.planner.types import DimensionPlan
from embshard.trainer.pep import LotteryTicket
from embshard.typed_config import from_dict

Point = dict[str, Any]
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
    return [{**p, **tags} for p in _method_points(base, trial, budgets, run_dir)]


def _method_points(base: JobConfig, trial: Trial, budgets: list[float], run_dir: Path) -> list[Point]:
    spec = DatasetSpec.load(base.data.path)
    first, method = first_run(base, spec, trial, budgets, run_dir)
    if trial.base_method == "pep":
        return _pep_points(first, base, spec, trial, budgets, run_dir)
    assert trial.budget is not None
    cfg = first
    if trial.base_method == "autodim":
        _train(first, method)
        cfg = autodim_retrain(first, base, trial, run_dir)
    try:
        plan, summary = _train(cfg)
    except PlanError as e:  # a budget the method cannot meet is a finding, not a failure
        return [_point(trial, trial.budget, error=str(e))]
    return [_point(trial, trial.budget, summary, plan.serve_params(), plan)]


def _pep_points(prune: JobConfig, base: JobConfig, spec: DatasetSpec, trial: Trial, budgets: list[float],
                run_dir: Path) -> list[Point]:
    _, pruned = _train(prune, "pep")
    reached = pruned["pep"]["reached"]
    points = []
    for budget in budgets:
        if budget >= 1:
            points.append(_point(trial, budget, error="PEP prunes below the base model; budget 1 is uniform's"))
            continue
        if f"{budget:g}" not in reached:
            points.append(_point(trial, budget, error=f"target {budget:g} not reached in {pruned['steps']} "
                                                      f"prune steps (kept {pruned['pep']['kept_fraction']:.3f})"))
            continue
        cfg = pep_retrain(prune, base, trial, budget, run_dir)
        plan, summary = _train(cfg)
        if trial.with_mlet:
            points.append(_point(trial, budget, summary, plan.serve_params(), plan))
            continue
        # The lottery ticket trains dense base-dim tables; what it keeps is the mask's non-zeros,
        # and the widths are those of the target's decisions file (survivors per row).
        ticket = LotteryTicket.load(prune.pep_dir, budget)
        decided = _decisions_plan(prune, spec, prune.pep_dir / f"target-{budget:g}" / "decisions.json")
        points.append(_point(trial, budget, summary, ticket.nonzero, decided))
    return points


def _train(cfg: JobConfig, method: str | None = None) -> tuple[DimensionPlan, dict[str, Any]]:
    with run_lock(cfg):
        bundle = plan_for_training(cfg, method)
        summary = train_on_ray(cfg, method)
    return bundle.dimension_plan, summary


def _decisions_plan(prune: JobConfig, spec: DatasetSpec, decisions: Path) -> DimensionPlan:
    emb = replace(prune.embeddings, policy="decisions", decisions=str(decisions))
    with tempfile.TemporaryDirectory() as remaps:
        return plan_dimensions(emb, spec, None, Path(remaps))


def _point(trial: Trial, budget: float, summary: dict[str, Any] | None = None, params: int | None = None,
           plan: DimensionPlan | None = None, error: str | None = None) -> Point:
    point: Point = {"method": trial.method, "budget": budget, "seed": trial.seed}
    if error is not None:
        return {**point, "error": error}
    assert summary is not None and params is not None and plan is not None
    metric = summary["test_primary"]
    return {**point, "metric": metric, "lower_is_better": summary["test_lower_is_better"],
            "value": summary[f"test_{metric}"], "valid_value": summary[f"valid_{metric}"],
            "serving_params": params, "serving_bytes": params * FP32_BYTES, "widths": widths(plan),
            "steps": summary["steps"], "selected_step": summary["selected_step"]}


def widths(plan: DimensionPlan) -> dict[str, int]:
    """Per sparse feature, the serving width of its table's most popular rows (its widest block)."""
    return {f: max(b.dim for b in t.blocks) for t in plan.tables for f in t.features}


def _write_json(path: Path, data: Any) -> None:
    write_whole(path, json.dumps(data, indent=1) + "\n")
