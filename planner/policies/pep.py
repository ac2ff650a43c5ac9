"""PEP's plans: the prune run's tables (`prune_plan`), and its masks -> a standard decisions
file (read back by `embeddings.policy: decisions`).

A prune run trains the uniform plan's tables with the thresholds of row granularities stored in
the rows (`threshold_columns` more columns each, which the shard plan and the memory report count),
multi-hot features' tables looked up unpooled (a threshold acts on rows before pooling), and no
column splits where a row carries its threshold.

For the decisions file:
Rows are ranked by their surviving (non-zero) entry count, most first (`row_order: pep_nnz`, the
id -> rank remap saved beside the file). A row needs ceil4(nnz) columns to keep its survivors
(FBGEMM's fused kernels take widths divisible by 4), and a fully pruned row still costs the
narrowest width (a row cannot be dropped: its id still arrives). Widths only fall along the
ranking. Every block narrower than base_dim also serves through a width x base_dim projection,
so a run of rows needing one width is its own block only when that saves more than its
projection costs: `merge_widths` picks the cheapest split into blocks exactly (a table has at
most base_dim / 4 widths). The mixed-dimension retrain then stores what survived, not the dense
table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from embshard.config import Granularity
from embshard.planner.decisions import BlockDecision, Decisions, TableDecision
from embshard.planner.remap import frequency_ranking
from embshard.planner.rounding import FBGEMM_ALIGN
from embshard.planner.types import DimensionPlan, TablePlan

ROW_THRESHOLDS = ("feature", "feature_dimension")  # s lives in the table rows


def threshold_columns(granularity: Granularity, dim: int) -> int:
    """Extra columns a table row carries for its thresholds."""
    if granularity == "feature":
        return FBGEMM_ALIGN
    return dim if granularity == "feature_dimension" else 0


def looked_up_pooled(table: TablePlan, multi_hot: Collection[str], pooled_lookup: bool) -> bool:
    """Whether PEP may threshold a table's pooled output: only when each bag holds one row."""
    return pooled_lookup and set(multi_hot).isdisjoint(table.features)


def prune_plan(base: DimensionPlan, granularity: Granularity, multi_hot: Collection[str],
               pooled_lookup: bool, sharding_types: Callable[[bool], list[str]]) -> DimensionPlan:
    """The tables a prune run trains, from the uniform plan `base`; `sharding_types(pooled)`: what
    TorchRec may choose for a pooled or unpooled PEP table."""
    state = threshold_columns(granularity, base.base_dim)
    tables = []
    for t in base.tables:
        pooled = looked_up_pooled(t, multi_hot, pooled_lookup)
        blocks = [dataclasses.replace(b, state_cols=state) for b in t.blocks]
        tables.append(dataclasses.replace(t, blocks=blocks, pooled=pooled, sharding_types=sharding_types(pooled)))
    policy = {**base.policy, "pep_granularity": granularity}
    return dataclasses.replace(base, tables=tables, policy=policy)


def merge_widths(widths: list[int], rows: list[int], base_dim: int) -> list[tuple[int, int]]:
    """The cheapest blocks for runs of rows needing `widths` (strictly falling) with `rows` rows
    each: -> [(rows, width)], each block as wide as its first run. A block's cost is its rows x
    width plus, below base_dim, its width x base_dim projection (`DimensionPlan.serve_params`)."""
    def cost(i: int, j: int) -> int:  # runs i..j-1 in one block
        return sum(rows[i:j]) * widths[i] + (widths[i] * base_dim if widths[i] != base_dim else 0)

    best = [0] + [0] * len(widths)  # best[j]: cheapest blocks for runs 0..j-1
    start = [0] * (len(widths) + 1)  # where the last block of best[j] begins
    for j in range(1, len(widths) + 1):
        best[j], start[j] = min((best[i] + cost(i, j), i) for i in range(j))
    blocks, j = [], len(widths)
    while j:
        i = start[j]
        blocks.append((sum(rows[i:j]), widths[i]))
        j = i
    return blocks[::-1]


def pep_table_decision(nnz: np.ndarray, base_dim: int, remap_name: str, out_dir: Path) -> TableDecision:
    """Blocks for one table from its per-row surviving counts; writes the remap when rows move."""
    need = np.clip(-(-np.asarray(nnz) // FBGEMM_ALIGN) * FBGEMM_ALIGN, FBGEMM_ALIGN, base_dim)
    ranks = frequency_ranking(nnz)  # descending nnz, stable: the same masks give the same plan
    ranked_need = np.empty_like(need)
    ranked_need[ranks] = need
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ranked_need)) + 1])
    runs = np.diff(np.concatenate([starts, [len(need)]]))
    blocks = merge_widths([int(w) for w in ranked_need[starts]], [int(n) for n in runs], base_dim)
    if len(blocks) == 1:
        return TableDecision(dim=blocks[0][1])
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / remap_name, ranks, allow_pickle=False)
    return TableDecision(blocks=[BlockDecision(n, w) for n, w in blocks], row_order="pep_nnz", remap=remap_name)


def pep_decisions(
    nnz_by_table: dict[str, np.ndarray], base_dim: int, out_dir: Path, meta: dict[str, Any]
) -> Decisions:
    """One decision per table (keyed by table name); remaps are written into `out_dir`."""
    tables = {
        name: pep_table_decision(nnz, base_dim, f"{name}.pep_nnz.npy", out_dir)
        for name, nnz in nnz_by_table.items()
    }
    return Decisions(method="pep", base_dim=base_dim, tables=tables, meta=meta)
