"""Route each ranked id of a feature to the block that holds its row.

A feature whose table is cut into k blocks becomes k block features (`f__b0` ... `f__b{k-1}`):
ids are bucketised by the block boundaries, shifted to block-local rows, and each bag keeps, per
block, the ids that fall there in their original order. Sum pooling over a whole bag then equals
the sum of the blocks' pooled partial bags, which is what MDE's Alg. 1 computes row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.planner.shard_plan import block_feature_name
from embshard.planner.types import DimensionPlan


@dataclass(frozen=True)
class FeatureBlocks:
    feature: str
    block_features: list[str]
    starts: torch.Tensor  # [k] first ranked row of each block
    boundaries: torch.Tensor  # [k-1] starts of blocks 1..k-1, for bucketize


def feature_blocks(plan: DimensionPlan) -> list[FeatureBlocks]:
    out = []
    for table in plan.tables:
        n = len(table.blocks)
        starts = torch.tensor([b.start for b in table.blocks], dtype=torch.int64)
        for f in table.features:
            out.append(
                FeatureBlocks(
                    feature=f,
                    block_features=[block_feature_name(f, i, n) for i in range(n)],
                    starts=starts,
                    boundaries=starts[1:].clone(),
                )
            )
    return out


def split_by_block(features: KeyedJaggedTensor, layout: list[FeatureBlocks]) -> KeyedJaggedTensor:
    """Input KJT keyed by feature (ranked ids) -> KJT keyed by block feature (block-local rows)."""
    by_key = features.to_dict()
    batch = features.stride()
    keys: list[str] = []
    values: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    for fb in layout:
        jt = by_key[fb.feature]
        v, l = jt.values(), jt.lengths()
        keys.extend(fb.block_features)
        k = len(fb.block_features)
        if k == 1:
            values.append(v)
            lengths.append(l)
            continue
        block = torch.bucketize(v, fb.boundaries.to(v.device), right=True)
        row = torch.repeat_interleave(torch.arange(batch, device=v.device), l.long())
        # One stable sort groups ids by (block, bag) and keeps their order inside each bag.
        key = block * batch + row
        order = torch.sort(key, stable=True).indices
        values.append(v[order] - fb.starts.to(v.device)[block[order]])
        lengths.append(torch.bincount(key, minlength=k * batch).to(l.dtype))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        stride=batch,
    )
