"""The driver's planning step for a run: the method's DimensionPlan, at the widths its arch takes.

`embshard plan` and `embshard train` both plan through `planning_step`, so a plan saved by either
records the same `uniform_width` and workers rebuild the same embedding module from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from embshard.config import JobConfig
from embshard.datasets.schema import DatasetSpec
from embshard.planner.pipeline import Decide
from embshard.planner.types import DimensionPlan
from embshard.trainer.method import EmbeddingMethod
from embshard.trainer.models import get_arch


def planning_step(cfg: JobConfig, method: EmbeddingMethod) -> Decide:
    """Check the config against the method and the arch (ConfigError before any data is read
    beyond the dataset spec), and return the planning step `plan_with` runs."""
    method.check_config(cfg)
    arch = get_arch(cfg.model)
    arch.check(cfg, DatasetSpec.load(cfg.data.path))
    # Per-feature widths only where both sides have them: PEP's and AutoDim's search modules
    # give every feature the base dim whatever the arch takes.
    uniform = arch.uniform_width or not method.mixed_widths

    def decide(spec: DatasetSpec, counts: Mapping[str, np.ndarray], out_dir: Path) -> DimensionPlan:
        return replace(method.dimension_plan(cfg, spec, counts, out_dir), uniform_width=uniform)

    return decide
