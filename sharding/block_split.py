"""Route each ranked id of a feature to the block that holds its row.

A feature whose table is cut into k blocks becomes k block features (`f__b0` ... `f__b{k-1}`):
ids are bucketised by the block boundaries, shifted to block-local rows, and each bag keeps, per
block, the ids that fall there in their original order. Sum pooling over a whole bag then equals
the sum of the blocks' pooled partial bags, which is what MDE's Alg. 1 computes row by row.

All features are split together, in a handful of tensor ops whatever their number: feature f's
ranked rows are moved into one shared row space at offset `offsets[f]` (the rows of the features
before it), so one bucketize against every block's shared start finds each id's block, and one
stable sort by (block, bag) lays the output out key-major, bags in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.planner.shard_plan import block_feature_name
from embshard.planner.types import DimensionPlan


@dataclass(frozen=True)
class FeatureBlocks:
    feature: str
    block_features: list[str]
    starts: torch.Tensor  # [k] first ranked row of each block


@dataclass(frozen=True)
class BlockLayout:
    """Every feature's blocks, in the order split_by_block emits them (feature-major)."""

    features: list[FeatureBlocks]
    offsets: torch.Tensor  # [F] where each feature's rows begin in the shared row space
    starts: torch.Tensor  # [total blocks] each block's first row in the shared row space

    @property
    def feature_names(self) -> list[str]:
        return [fb.feature for fb in self.features]

    @property
    def block_features(self) -> list[str]:
        return [name for fb in self.features for name in fb.block_features]

    @property
    def is_identity(self) -> bool:
        """One block per feature: the split returns its input unchanged."""
        return all(len(fb.block_features) == 1 for fb in self.features)


def feature_blocks(plan: DimensionPlan) -> BlockLayout:
    features: list[FeatureBlocks] = []
    offsets: list[int] = []
    starts: list[int] = []
    shared = 0
    for table in plan.tables:
        n = len(table.blocks)
        table_starts = [b.start for b in table.blocks]
        for f in table.features:
            features.append(
                FeatureBlocks(
                    feature=f,
                    block_features=[block_feature_name(f, i, n) for i in range(n)],
                    starts=torch.tensor(table_starts, dtype=torch.int64),
                )
            )
            offsets.append(shared)
            starts.extend(shared + s for s in table_starts)
            shared += table.num_embeddings
    return BlockLayout(
        features=features,
        offsets=torch.tensor(offsets, dtype=torch.int64),
        starts=torch.tensor(starts, dtype=torch.int64),
    )


def split_by_block(features: KeyedJaggedTensor, layout: BlockLayout) -> KeyedJaggedTensor:
    """Input KJT keyed by feature (ranked ids) -> KJT keyed by block feature (block-local rows)."""
    names = layout.feature_names
    if features.keys() != names:
        keys = features.keys()
        features = features.permute([keys.index(f) for f in names])
    if layout.is_identity:
        return features
    v, lengths = features.values(), features.lengths()
    batch = features.stride()
    device = v.device
    # Which bag (feature-major, as the KJT stores them) each id belongs to.
    segment = torch.repeat_interleave(torch.arange(len(names) * batch, device=device), lengths.long())
    feature, row = segment // batch, segment % batch
    starts = layout.starts.to(device)
    shared = v.long() + layout.offsets.to(device)[feature]
    block = torch.bucketize(shared, starts, right=True) - 1
    # One stable sort groups ids by (block, bag) and keeps their order inside each bag.
    key = block * batch + row
    order = torch.sort(key, stable=True).indices
    return KeyedJaggedTensor(
        keys=layout.block_features,
        values=(shared - starts[block])[order].to(v.dtype),
        lengths=torch.bincount(key, minlength=len(starts) * batch).to(lengths.dtype),
        stride=batch,
    )


class BlockSplit(nn.Module):
    """`split_by_block` as a module without parameters: TorchRec's train pipeline
    (`pipeline_postproc=True`) runs such a module on the next batch during its input dist, so the
    collection it feeds is still pipelined although its input is not the batch's own KJT."""

    def __init__(self, layout: BlockLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return split_by_block(features, self.layout)
