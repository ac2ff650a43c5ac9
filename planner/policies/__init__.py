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


def plan_widths(
    cfg: EmbeddingsConfig,
    spec: DatasetSpec,
    counts: Mapping[str, np.ndarray] | None = None,
    out_dir: Path | None = None,
) -> DimensionPlan:
    """The widths `cfg.policy` gives. counts[feature]: int64 id frequencies over the train split
    (length = cardinality); MDE needs them for within-table blocking. out_dir: the plan's folder,
    where remaps are written."""
    if cfg.policy == "uniform":
        return uniform_plan(cfg, spec)
    if cfg.policy == "mde":
        return mde_plan(cfg, spec, counts, out_dir)
    if cfg.decisions:
        return from_decisions(cfg.decisions, cfg, spec, out_dir)
    # EmbeddingsConfig.__post_init__ refuses this already; this narrows the type
    raise ConfigError("embeddings.decisions: policy decisions needs the path of a decisions file")


def with_mlet(plan: DimensionPlan, cfg: EmbeddingsConfig) -> DimensionPlan:
    """`plan` with `cfg.mlet` on its blocks: MLET is orthogonal to how widths were chosen, so
    every method's plan gets it (one that cannot train it refuses `embeddings.mlet` first)."""
    return plan if cfg.mlet is None else apply_mlet(plan, cfg.mlet, cfg.rounding)


def plan_dimensions(
    cfg: EmbeddingsConfig,
    spec: DatasetSpec,
    counts: Mapping[str, np.ndarray] | None = None,
    out_dir: Path | None = None,
) -> DimensionPlan:
    """The policy's widths, then MLET when configured (`plan_widths`, `with_mlet`)."""
    return with_mlet(plan_widths(cfg, spec, counts, out_dir), cfg)


__all__ = ["plan_dimensions", "plan_widths", "with_mlet", "from_decisions"]
