"""PEP (Liu et al., ICLR 2021): embeddings pruned by a learnable soft threshold.

    V_hat = sign(V) * relu(|V| - sigmoid(s))

The threshold acts on every looked-up row *before* pooling, so a multi-hot bag sums pruned rows.
That is why the table is TorchRec's unpooled `EmbeddingCollection` (ids -> rows as JaggedTensors,
sharded by DMP like any table) and the sum pooling is done here, per bag, after thresholding.

Granularities (the shape of s):
- `global`: one s for every entry of every table; `dimension`: one s per embedding dimension.
  Both are small dense parameters, replicated by DMP and trained by the dense optimizer.
- `feature`: one s per row (per id); `feature_dimension`: one s per entry. These are stored in
  the same table row as V, to its right (row = [V | s]): one lookup and one fused optimizer update
  serve both, and s is sharded exactly like its row. The price: s trains with the table's fused
  sparse optimizer and learning rate (row-wise Adagrad shares one step size across V and s).
  A `feature` row is padded to d + 4 columns because FBGEMM's fused kernels need widths divisible
  by 4; only column d holds s, the padding gets zero gradient and is never read.

The output is a `KeyedTensor` at the base dim in feature order, like `PlannedEmbeddingBags`, so
DLRM takes either module.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.errors import PlanError
from embshard.planner.rounding import FBGEMM_ALIGN
from embshard.planner.types import DimensionPlan

Granularity = Literal["global", "dimension", "feature", "feature_dimension"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
ROW_THRESHOLDS = ("feature", "feature_dimension")  # s lives in the table rows

# Initial values are drawn per chunk of rows from a generator seeded by (seed, table, chunk): any
# row range regenerates without drawing the whole table, so the lottery-ticket retrain can rebuild
# the initial values of its own shards under any sharding.
INIT_ROW_CHUNK = 65536


def soft_threshold(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """PEP's pruned value; autograd gives the sub-gradients dV_hat/dV = 1[|V| > g(s)] and
    dV_hat/ds = -sign(V) * 1[|V| > g(s)] * g'(s)."""
    return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))


def threshold_columns(granularity: Granularity, dim: int) -> int:
    """Extra columns a table row carries for its thresholds."""
    if granularity == "feature":
        return FBGEMM_ALIGN
    return dim if granularity == "feature_dimension" else 0


@dataclass(frozen=True)
class LocalShard:
    """One shard of a table held by this rank: a view of the live weights and where it sits."""

    table: str
    row_offset: int
    col_offset: int
    tensor: torch.Tensor


def local_shards(collection: nn.Module) -> list[LocalShard]:
    """This rank's shards of every table of a sharded (or plain) TorchRec collection."""
    out = []
    for key, value in collection.state_dict().items():
        table = key.split(".")[-2]  # embeddings.<table>.weight / embedding_bags.<table>.weight
        if hasattr(value, "local_shards"):
            for s in value.local_shards():
                row, col = s.metadata.shard_offsets
                out.append(LocalShard(table, row, col, s.tensor))
        else:
            out.append(LocalShard(table, 0, 0, value))
    return out


def initial_values(seed: int, table: str, num_rows: int, dim: int, rows: range, cols: range) -> torch.Tensor:
    """The initial V[rows, cols] of a table: uniform(+-1/sqrt(num_rows)), TorchRec's default
    range, reproducible from (seed, table) alone."""
    bound = num_rows ** -0.5
    parts = []
    for chunk in range(rows.start // INIT_ROW_CHUNK, (max(rows.stop, 1) - 1) // INIT_ROW_CHUNK + 1):
        lo = chunk * INIT_ROW_CHUNK
        n = min(INIT_ROW_CHUNK, num_rows - lo)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{table}/{chunk}".encode()))
        block = torch.rand(n, dim, generator=gen) * (2 * bound) - bound
        parts.append(block[max(rows.start - lo, 0) : rows.stop - lo])
    return torch.cat(parts)[:, cols.start : cols.stop] if parts else torch.empty(0, len(cols))


class PepEmbeddings(nn.Module):
    def __init__(
        self,
        plan: DimensionPlan,
        granularity: Granularity,
        s_init: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not plan.is_uniform:
            raise PlanError("PEP prunes full base-dim tables: plan it with embeddings.policy uniform")
        if granularity not in GRANULARITIES:
            raise PlanError(f"pep.granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.plan = plan
        self.granularity = granularity
        self.s_init = s_init
        self.base_dim = plan.base_dim
        self.width = self.base_dim + threshold_columns(granularity, self.base_dim)
        self.feature_names = [f for t in plan.tables for f in t.features]
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=t.name, embedding_dim=self.width, num_embeddings=t.num_embeddings,
                                feature_names=list(t.features))
                for t in plan.tables
            ],
            device=device,
        )
        dense_device = device if device is not None and device.type != "meta" else None
        shape = {"global": 1, "dimension": self.base_dim}.get(granularity)
        self.threshold = (
            nn.Parameter(torch.full((shape,), float(s_init), device=dense_device)) if shape else None
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows = self.ec(features)
        jagged = [rows[f] for f in self.feature_names]
        # All features at once: one threshold op and one scatter-add instead of one per feature.
        kept = self.prune(torch.cat([jt.values() for jt in jagged]))
        lengths = torch.cat([jt.lengths() for jt in jagged])
        bags, d = len(lengths), self.base_dim
        bag_of_row = torch.repeat_interleave(torch.arange(bags, device=kept.device), lengths.long())
        pooled = kept.new_zeros(bags, d).index_add_(0, bag_of_row, kept)
        batch = features.stride()
        values = pooled.view(len(jagged), batch, d).transpose(0, 1).reshape(batch, -1)
        return KeyedTensor(keys=self.feature_names, length_per_key=[d] * len(jagged), values=values)

    def prune(self, rows: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """V_hat of stored rows (their V columns only). `col_offset`: where a column shard of a
        dense-threshold table starts, so each column meets its own s."""
        d = self.base_dim
        if self.threshold is None:
            return soft_threshold(rows[:, :d], rows[:, d : d + (1 if self.granularity == "feature" else d)])
        s = self.threshold
        if self.granularity == "dimension":
            s = s[col_offset : col_offset + min(rows.shape[1], d - col_offset)]
        return soft_threshold(rows[:, : d - col_offset], s)

    @torch.no_grad()
    def local_masks(self) -> list[tuple[LocalShard, torch.Tensor]]:
        """Per local shard: the bool mask of its surviving V entries."""
        out = []
        for shard in local_shards(self.ec):
            if self.threshold is None and shard.tensor.shape[1] != self.width:
                raise PlanError(
                    f"PEP table {shard.table}: a {self.granularity} threshold lives in the row, so "
                    "its table cannot be sharded column-wise (use table_wise or row_wise)"
                )
            if shard.col_offset < self.base_dim:
                out.append((shard, self.prune(shard.tensor, shard.col_offset) != 0))
        return out

    @torch.no_grad()
    def initialise(self, seed: int) -> None:
        """Write the reproducible initial V (see `initial_values`) and s_init into local shards."""
        for shard in local_shards(self.ec):
            t, d = shard.tensor, self.base_dim
            rows = range(shard.row_offset, shard.row_offset + t.shape[0])
            cols = range(shard.col_offset, shard.col_offset + t.shape[1])
            n = self.plan.table(shard.table).num_embeddings
            v_cols = range(cols.start, min(cols.stop, d))
            t[:, : len(v_cols)] = initial_values(seed, shard.table, n, d, rows, v_cols)
            t[:, len(v_cols) :] = self.s_init
