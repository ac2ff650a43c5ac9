"""Dimension policies: config + dataset (+ id counts, + decisions file) -> DimensionPlan.

Deciding only: policies write nothing but remap files next to the plan (`out_dir`); building
modules from the plan is the sharding layer's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from embshard.config import EmbeddingsConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.planner.policies.decisions import from_decisions
from embshard.planner.policies.mde import mde_plan
from embshard.planner.policies.mlet import apply_mlet
from embshard.planner.policies.uniform import uniform_plan
from embshard.planner.types import DimensionPlan


def plan_dimensions(
    cfg: EmbeddingsConfig,
    spec: DatasetSpec,
    counts: Mapping[str, np.ndarray] | None = None,
    out_dir: Path | None = None,
) -> DimensionPlan:
    """counts[feature]: int64 id frequencies over the train split (length = cardinality); MDE
    needs them for within-table blocking. out_dir: the plan's folder, where remaps are written."""
    if cfg.policy == "uniform":
        plan = uniform_plan(cfg, spec)
    elif cfg.policy == "mde":
        plan = mde_plan(cfg, spec, counts, out_dir)
    elif cfg.decisions:
        plan = from_decisions(cfg.decisions, cfg, spec, out_dir)
    else:  # EmbeddingsConfig.__post_init__ refuses this already; this narrows the type
        raise ConfigError("embeddings.decisions: policy decisions needs the path of a decisions file")
    return plan if cfg.mlet is None else apply_mlet(plan, cfg.mlet, cfg.rounding)


__all__ = ["plan_dimensions", "from_decisions"]
