"""`PlannedEmbeddingBags`: the one embedding module that realises any DimensionPlan.

All blocks live in a single TorchRec `EmbeddingBagCollection`, so `DistributedModelParallel`
shards them under the planner's plan like any tables. Around it sit plain dense modules, which
DMP replicates data-parallel: MLET's W2 (k -> d) and MDE's projection P (d -> the table's output
width) per block. The output is a `KeyedTensor` in feature order, every feature at the base dim
(DLRM-style arches take it unchanged) or, for a plan without `uniform_width`, each at its table's
widest block (`feature_dims`). A plan with nothing to project is the bare collection:
bit-identical to plain TorchRec.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.config import MLET_INIT_STD
from embshard.errors import PlanError
from embshard.planner.shard_plan import block_feature_name, block_table_configs
from embshard.planner.types import DimensionPlan
from embshard.sharding.block_split import BlockSplit, feature_blocks
from embshard.sharding.embedding_module import EmbeddingModule


class PlannedEmbeddingBags(EmbeddingModule):
    """`mlet_init_std`: std of the zero-mean Gaussian MLET's W2 starts from (see MLET_INIT_STD)."""

    def __init__(self, plan: DimensionPlan, device: torch.device | None = None,
                 mlet_init_std: float = MLET_INIT_STD) -> None:
        super().__init__()
        # Left out of the collection, unpooled tables were the first forward's "torch.cat(): expected
        # a non-empty list of Tensors".
        unpooled = [t.name for t in plan.tables if not t.pooled]
        if unpooled:
            raise PlanError(f"table {unpooled[0]!r} is unpooled (pooled: false), and PlannedEmbeddingBags, the "
                            "default embeddings(), builds pooled tables only; a method whose plan has unpooled "
                            "tables builds its own module in embeddings() (as PEP's does)")
        self.plan = plan
        self.base_dim = plan.base_dim
        self.ebc = EmbeddingBagCollection(tables=block_table_configs(plan), device=device)
        self.feature_names = [f for t in plan.tables for f in t.features]
        self.split = BlockSplit(feature_blocks(plan))
        self._dims = {f: plan.output_dim(t) for t in plan.tables for f in t.features}
        self._passthrough = all(
            len(t.blocks) == 1 and t.blocks[0].mlet_width is None and plan.projection_shape(t, t.blocks[0]) is None
            for t in plan.tables
        )
        # Keyed by block table name: W2 of MLET blocks, P of blocks narrower than their table's output.
        self.mlet = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        dense_device = device if device is not None and device.type != "meta" else None
        for table in plan.tables:
            for i, block in enumerate(table.blocks):
                name = table.block_name(i)
                if block.mlet_width is not None:
                    w2 = nn.Linear(block.mlet_width, block.dim, bias=False, device=dense_device)
                    nn.init.normal_(w2.weight, std=mlet_init_std)
                    self.mlet[name] = w2
                shape = plan.projection_shape(table, block)
                if shape is not None:
                    self.projections[name] = nn.Linear(*shape, bias=False, device=dense_device)
        # Per feature, its blocks as (block feature, block table, width out of the collection).
        self._blocks_of = {
            f: [(block_feature_name(f, i, len(t.blocks)), t.block_name(i), b.train_dim) for i, b in enumerate(t.blocks)]
            for t in plan.tables
            for f in t.features
        }
        self._widths = [sum(w for _, _, w in self._blocks_of[f]) for f in self.feature_names]
        # Column order of the pooled output -> feature-major gather index; the collection (sharded
        # or not) fixes its output key order, so this is computed once on the first step.
        self._gather: tuple[tuple[str, ...], torch.Tensor | None] | None = None

    @property
    def feature_dims(self) -> dict[str, int]:
        return dict(self._dims)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._passthrough:
            return self.ebc(features)
        return _combine_blocks(self, self.ebc(self.split(features)))

    def combine_blocks(self, pooled: KeyedTensor) -> KeyedTensor:
        """The collection's pooled blocks -> one column group per feature, at its output width."""
        columns = self._feature_major_columns(pooled)
        x = pooled.values() if columns is None else pooled.values().index_select(1, columns)
        # Alg. 1 summed over a bag is sum_i P_i (W2_i) pooled_i = [P_1 W2_1 ... P_k W2_k] . [pooled_1;
        # ...; pooled_k]: one matmul per feature instead of one small linear (and add) per block.
        # One split, not a slice per feature: each slice's backward would zero-fill and add a
        # gradient the size of all of x.
        outputs = []
        for feature, x_f in zip(self.feature_names, x.split(self._widths, dim=1), strict=True):
            blocks = self._blocks_of[feature]
            maps = [self._block_map(table) for _, table, _ in blocks]
            if len(maps) == 1 and maps[0] is None:  # one block at the output width: already the output
                outputs.append(x_f)
                continue
            eye = torch.eye(self._dims[feature], device=x.device, dtype=x.dtype)
            stacked = torch.cat([eye if m is None else m for m in maps], dim=0)
            outputs.append(x_f @ stacked)
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[self._dims[f] for f in self.feature_names],
            values=torch.cat(outputs, dim=1),
        )

    def _block_map(self, table: str) -> torch.Tensor | None:
        """[train width, output width]: the block's W2 then P, transposed; None for the identity."""
        m = None
        if table in self.mlet:
            m = self.mlet[table].get_parameter("weight").t()
        if table in self.projections:
            p = self.projections[table].get_parameter("weight").t()
            m = p if m is None else m @ p
        return m

    def _feature_major_columns(self, pooled: KeyedTensor) -> torch.Tensor | None:
        keys = tuple(pooled.keys())
        if self._gather is None or self._gather[0] != keys:
            start, width = {}, {}
            at = 0
            for key, n in zip(keys, pooled.length_per_key(), strict=True):
                start[key], width[key] = at, n
                at += n
            index = [
                start[bf] + c
                for f in self.feature_names
                for bf, _, _ in self._blocks_of[f]
                for c in range(width[bf])
            ]
            tensor = None if index == list(range(at)) else torch.tensor(index, device=pooled.values().device)
            self._gather = (keys, tensor)
        return self._gather[1]


@torch.fx.wrap
def _combine_blocks(module: PlannedEmbeddingBags, pooled: KeyedTensor) -> KeyedTensor:
    # One opaque node when TorchRec's train pipeline traces the model to find the collection's
    # input: the combining loops over the pooled output's keys, which a trace cannot follow.
    return module.combine_blocks(pooled)
