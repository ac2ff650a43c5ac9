"""Uniform: every table one block at the base dim, rows in id order (plain TorchRec tables)."""

from __future__ import annotations

from embshard.config import EmbeddingsConfig
from embshard.datasets.schema import DatasetSpec
from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name
from embshard.typed_config import to_dict


def uniform_plan(cfg: EmbeddingsConfig, spec: DatasetSpec) -> DimensionPlan:
    source = {"policy": "uniform", "dim": cfg.dim}
    tables = [
        TablePlan(
            table_name(f.name), [f.name], f.cardinality,
            [Block(0, f.cardinality, cfg.dim, source=source)],
        )
        for f in spec.sparse
    ]
    return DimensionPlan(cfg.dim, tables, policy=to_dict(cfg))
