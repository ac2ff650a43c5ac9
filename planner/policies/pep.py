"""PEP's pruning masks -> a standard decisions file (read back by `embeddings.policy: decisions`).

Rows are ranked by their surviving (non-zero) entry count, most first (`row_order: pep_nnz`, the
id -> rank remap saved beside the file). A row needs ceil4(nnz) columns to keep its survivors
(FBGEMM's fused kernels take widths divisible by 4); consecutive ranked rows needing the same
width form one block. Widths only fall along the ranking, so a table gets at most base_dim / 4
blocks, and a fully pruned row still costs the narrowest width (a row cannot be dropped: its id
still arrives). The mixed-dimension retrain then stores what survived, not the dense table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embshard.planner.decisions import BlockDecision, Decisions, TableDecision
from embshard.planner.remap import frequency_ranking
from embshard.planner.rounding import FBGEMM_ALIGN


def pep_table_decision(nnz: np.ndarray, base_dim: int, remap_name: str, out_dir: Path) -> TableDecision:
    """Blocks for one table from its per-row surviving counts; writes the remap when rows move."""
    need = np.clip(-(-np.asarray(nnz) // FBGEMM_ALIGN) * FBGEMM_ALIGN, FBGEMM_ALIGN, base_dim)
    ranks = frequency_ranking(nnz)  # descending nnz, stable: the same masks give the same plan
    ranked_need = np.empty_like(need)
    ranked_need[ranks] = need
    cuts = np.flatnonzero(np.diff(ranked_need)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(need)]])
    if len(starts) == 1:
        return TableDecision(dim=int(ranked_need[0]))
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / remap_name, ranks, allow_pickle=False)
    blocks = [BlockDecision(int(e - s), int(ranked_need[s])) for s, e in zip(starts, ends)]
    return TableDecision(blocks=blocks, row_order="pep_nnz", remap=remap_name)


def pep_decisions(
    nnz_by_table: dict[str, np.ndarray], base_dim: int, out_dir: Path, meta: dict[str, Any]
) -> Decisions:
    """One decision per table (keyed by table name); remaps are written into `out_dir`."""
    tables = {
        name: pep_table_decision(nnz, base_dim, f"{name}.pep_nnz.npy", out_dir)
        for name, nnz in nnz_by_table.items()
    }
    return Decisions(method="pep", base_dim=base_dim, tables=tables, meta=meta)
