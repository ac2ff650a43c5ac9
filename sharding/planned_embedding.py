"""`PlannedEmbeddingBags`: the one embedding module that realises any DimensionPlan.

All blocks live in a single TorchRec `EmbeddingBagCollection`, so `DistributedModelParallel`
shards them under the planner's plan like any tables. Around it sit plain dense modules, which
DMP replicates data-parallel: MLET's W2 (k -> d) and MDE's projection P (d -> base dim) per block.
The output is a `KeyedTensor` at the base dim in feature order, so DLRM-style arches take it
unchanged. A uniform plan is the bare collection: bit-identical to plain TorchRec.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.planner.shard_plan import block_table_configs
from embshard.planner.types import DimensionPlan
from embshard.sharding.block_split import feature_blocks, split_by_block


class PlannedEmbeddingBags(nn.Module):
    def __init__(self, plan: DimensionPlan, device: torch.device | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.base_dim = plan.base_dim
        self.ebc = EmbeddingBagCollection(tables=block_table_configs(plan), device=device)
        self.feature_names = [f for t in plan.tables for f in t.features]
        self._layout = feature_blocks(plan)
        self._passthrough = all(
            len(t.blocks) == 1 and not t.needs_projection(t.blocks[0], plan.base_dim)
            for t in plan.tables
        )
        # Keyed by block table name: W2 of MLET blocks, P of blocks narrower than the base dim.
        self.mlet = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        dense_device = device if device is not None and device.type != "meta" else None
        for table in plan.tables:
            for i, block in enumerate(table.blocks):
                name = table.block_name(i)
                if block.mlet_width is not None:
                    self.mlet[name] = nn.Linear(block.mlet_width, block.dim, bias=False, device=dense_device)
                if block.dim != plan.base_dim:
                    self.projections[name] = nn.Linear(block.dim, plan.base_dim, bias=False, device=dense_device)
        # feature -> [(block feature, block table)], resolved once instead of per step
        self._blocks_of = {
            fb.feature: list(zip(fb.block_features, self._block_tables(fb.feature)))
            for fb in self._layout
        }

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._passthrough:
            return self.ebc(features)
        pooled = self.ebc(split_by_block(features, self._layout)).to_dict()
        outputs = []
        for feature in self.feature_names:
            total = None
            for block_feature, table in self._blocks_of[feature]:
                x = pooled[block_feature]
                if table in self.mlet:
                    x = self.mlet[table](x)
                if table in self.projections:
                    x = self.projections[table](x)
                total = x if total is None else total + x
            outputs.append(total)
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[self.base_dim] * len(self.feature_names),
            values=torch.cat(outputs, dim=1),
        )

    def _block_tables(self, feature: str) -> list[str]:
        table = next(t for t in self.plan.tables if feature in t.features)
        return [table.block_name(i) for i in range(len(table.blocks))]
