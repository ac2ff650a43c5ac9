"""AutoDim's search plan: the tables a search trains, as a DimensionPlan the planner shards.

weight_sharing trains the uniform plan at d_N itself (candidate n reads its first d_n columns);
separate trains one table per candidate per field. FBGEMM's fused kernels need widths divisible
by 4, so a narrower separate candidate is stored in the next multiple of 4 (with a note).
"""

from __future__ import annotations

import math

from embshard.config import Lookup
from embshard.errors import PlanError
from embshard.planner.rounding import FBGEMM_ALIGN
from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name

SEARCH_POLICY = "autodim_search"


def candidate_feature_name(feature: str, dim: int) -> str:
    return f"{feature}__d{dim}"


def stored_width(dim: int) -> int:
    """Width of a separate candidate's table: the next multiple FBGEMM's fused kernels take."""
    return FBGEMM_ALIGN * math.ceil(dim / FBGEMM_ALIGN)


def search_plan(base: DimensionPlan, candidates: list[int], lookup: Lookup) -> DimensionPlan:
    """The tables a search trains. `base`: the uniform plan at d_N = max(candidates), one feature
    per table. weight_sharing trains exactly `base`; separate, one table per candidate."""
    if not base.is_uniform or any(len(t.features) != 1 for t in base.tables):
        raise PlanError("AutoDim searches a uniform plan with one feature per table")
    if base.base_dim != candidates[-1]:
        raise PlanError(
            f"AutoDim: base dim {base.base_dim} differs from the largest candidate {candidates[-1]}"
        )
    if lookup == "weight_sharing":
        return base
    tables, notes = [], []
    for t in base.tables:
        feature = t.features[0]
        for d in candidates:
            width = stored_width(d)
            name = table_name(candidate_feature_name(feature, d))
            if width != d:
                notes.append(
                    f"{name}: candidate width {d} is stored {width} wide (FBGEMM fused kernels need "
                    f"multiples of {FBGEMM_ALIGN}); the candidate reads only its first {d} columns"
                )
            source = {"policy": SEARCH_POLICY, "feature": feature, "candidate": d}
            block = Block(0, t.num_embeddings, width, source=source)
            tables.append(TablePlan(name, [candidate_feature_name(feature, d)], t.num_embeddings, [block]))
    policy = {**base.policy, "autodim_lookup": lookup, "autodim_candidates": list(candidates)}
    # Each candidate table reaches the search module at its own width, and the module unifies
    # them (its transforms are dense layers of the model): the plan projects nothing, and the
    # memory report counted a projection per narrower candidate that no rank holds.
    return DimensionPlan(base.base_dim, tables, policy=policy, notes=[*base.notes, *notes], uniform_width=False)
