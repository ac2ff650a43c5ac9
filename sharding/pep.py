"""PEP (Liu et al., ICLR 2021): embeddings pruned by a learnable soft threshold.

    V_hat = sign(V) * relu(|V| - sigmoid(s))

The threshold acts on every looked-up row *before* pooling, so a multi-hot bag sums pruned rows.
Tables with a multi-hot feature are TorchRec's unpooled `EmbeddingCollection` (ids -> rows as
JaggedTensors, sharded by DMP like any table) and their sum pooling is done here, per bag, after
thresholding. Tables whose features are all single-hot (exactly one id per row, by the dataset
schema) go through the pooled `EmbeddingBagCollection` instead: a one-row bag *is* its row, so
thresholding the pooled output is exact, and the fused pooled kernels cost half of the unpooled
path (bench/throughput_pep.py). `pooled_lookup=False` sends every table through the
`EmbeddingCollection`, which also shards row-wise on CPU.

Granularities (the shape of s):
- `global`: one s for every entry of every table; `dimension`: one s per embedding dimension;
  `field`: one s per table; `field_dimension`: one per table and dimension (the authors' code's
  `field` and `field_dim`: with one threshold per column shared by every table, a table whose
  entries are smaller, as those of a higher-rank table of the same row norm are, is cut first).
  All are small dense parameters, replicated by DMP and trained by their own Adam.
- `feature`: one s per row (per id); `feature_dimension`: one s per entry. These are stored in
  the same table row as V, to its right (row = [V | s]): one lookup and one fused optimizer update
  serve both, and s is sharded exactly like its row. The price: s trains with the table's fused
  sparse optimizer and learning rate (row-wise Adagrad shares one step size across V and s).
  A `feature` row is padded to d + 4 columns because FBGEMM's fused kernels need widths divisible
  by 4; only column d holds s, the padding gets zero gradient and is never read.

The output is a `KeyedTensor` at the base dim, like `PlannedEmbeddingBags`, so DLRM takes either
module.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embshard.config import GRANULARITIES, Granularity
from embshard.errors import PlanError
from embshard.planner.policies.pep import looked_up_pooled, threshold_columns
from embshard.planner.types import DimensionPlan, TablePlan
from embshard.sharding.embedding_module import EmbeddingModule

# Initial values are drawn per chunk of rows from a generator seeded by (seed, table, chunk): any
# row range regenerates without drawing the whole table, so the lottery-ticket retrain can rebuild
# the initial values of its own shards under any sharding.
INIT_ROW_CHUNK = 65536


class SoftThreshold(torch.autograd.Function):
    """v - clamp(v, -t, t) = sign(v) * relu(|v| - t) for t >= 0, as one autograd node.

    Written out with sign/abs/relu, autograd records five element-wise ops and their backward
    passes over every looked-up entry; that was most of PEP's training overhead on CPU. Here the
    forward is two passes and the backward three, reading only the output it saved. Sub-gradients
    (at |v| = t both are 0, relu's convention):
        dV_hat/dv = 1[|v| > t],   dV_hat/dt = -sign(v) * 1[|v| > t] = -sign(V_hat).
    `t` broadcasts against `v`; its gradient is summed back to its own shape.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = v - torch.maximum(torch.minimum(v, t), -t)
        ctx.save_for_backward(out)
        ctx.t_shape = t.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        (out,) = ctx.saved_tensors
        sign = torch.sign(out)
        signed = grad * sign
        grad_t = -signed.sum_to_size(ctx.t_shape) if ctx.needs_input_grad[1] else None
        return signed * sign, grad_t


def soft_threshold(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """PEP's pruned value V_hat = sign(V) * relu(|V| - g(s)), g = sigmoid; autograd gives the
    sub-gradients dV_hat/dV = 1[|V| > g(s)] and dV_hat/ds = -sign(V) * 1[|V| > g(s)] * g'(s)."""
    return SoftThreshold.apply(v, torch.sigmoid(s))


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


class PepEmbeddings(EmbeddingModule):
    def __init__(
        self,
        plan: DimensionPlan,
        granularity: Granularity,
        s_init: float,
        *,
        multi_hot: Collection[str],
        pooled_lookup: bool = True,
        device: torch.device | None = None,
    ) -> None:
        """`multi_hot`: the features whose rows may hold several ids (the dataset schema's
        multi-hot ones; no default, since thresholding a pooled multi-id bag would be silently
        wrong); their tables are looked up unpooled. `pooled_lookup=False` looks up every table
        unpooled."""
        super().__init__()
        if not plan.is_uniform:
            raise PlanError("PEP prunes full base-dim tables: plan it with embeddings.policy uniform")
        if granularity not in GRANULARITIES:
            raise PlanError(f"pep.granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        self.plan = plan
        self.granularity = granularity
        self.s_init = s_init
        self.base_dim = plan.base_dim
        self.feature_names = [f for t in plan.tables for f in t.features]
        self.width = self.base_dim + threshold_columns(granularity, self.base_dim)
        pooled = [t for t in plan.tables if looked_up_pooled(t, multi_hot, pooled_lookup)]
        unpooled = [t for t in plan.tables if not looked_up_pooled(t, multi_hot, pooled_lookup)]
        self.pooled_tables = [t.name for t in pooled]
        self.unpooled_features = [f for t in unpooled for f in t.features]

        def configs(config_type: type[BaseEmbeddingConfig], tables: list[TablePlan]) -> list:
            return [config_type(name=t.name, embedding_dim=self.width, num_embeddings=t.num_embeddings,
                                feature_names=list(t.features)) for t in tables]

        # Modules with no tables are left out: TorchRec cannot shard an empty collection.
        self.ebc = EmbeddingBagCollection(tables=configs(EmbeddingBagConfig, pooled), device=device) if pooled else None
        self.ec = EmbeddingCollection(tables=configs(EmbeddingConfig, unpooled), device=device) if unpooled else None
        dense_device = device if device is not None and device.type != "meta" else None
        n, d = len(plan.tables), self.base_dim
        shape = {"global": (1,), "dimension": (d,), "field": (n, 1), "field_dimension": (n, d)}.get(granularity)
        self.threshold = nn.Parameter(torch.full(shape, float(s_init), device=dense_device)) if shape else None
        # A per-table granularity's thresholds have a row a table, looked up for each row's table.
        self.per_table = shape is not None and len(shape) == 2
        self.table_index = {t.name: i for i, t in enumerate(plan.tables)}
        self.feature_table = {f: self.table_index[t.name] for t in plan.tables for f in t.features}
        self._feature_tables: dict[tuple[torch.device, tuple[str, ...]], torch.Tensor] = {}

    @property
    def collections(self) -> list[nn.Module]:
        return [m for m in (self.ebc, self.ec) if m is not None]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows = self.ebc(features) if self.ebc is not None else None  # single-hot bag: its one row
        jagged = self.ec(features) if self.ec is not None else None
        return _pruned(self, features.stride(), rows, jagged)

    def pruned(self, batch: int, rows: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None) -> KeyedTensor:
        """The collections' rows, soft-thresholded, each feature at the base dim."""
        d = self.base_dim
        keys: list[str] = []
        parts: list[torch.Tensor] = []  # [batch, features, d] each
        if rows is not None:
            keys += rows.keys()
            tables = self._tables_of(rows.keys())
            parts.append(self.prune(rows.values().reshape(batch, -1, self.width), tables=tables))
        if jagged is not None:
            by_feature = [jagged[f] for f in self.unpooled_features]
            # All features at once: one threshold op and one scatter-add instead of one per feature.
            looked_up = [jt.values() for jt in by_feature]
            tables = self._tables_of(self.unpooled_features, [len(v) for v in looked_up])
            kept = self.prune(torch.cat(looked_up), tables=tables)
            lengths = torch.cat([jt.lengths() for jt in by_feature])
            bag_of_row = torch.repeat_interleave(torch.arange(len(lengths), device=kept.device), lengths.long())
            pooled = kept.new_zeros(len(lengths), d).index_add_(0, bag_of_row, kept)
            keys += self.unpooled_features
            parts.append(pooled.view(len(by_feature), batch, d).transpose(0, 1))
        values = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).reshape(batch, -1)
        return KeyedTensor(keys=keys, length_per_key=[d] * len(keys), values=values)

    def _tables_of(self, features: list[str], rows: list[int] | None = None) -> torch.Tensor | int:
        """Per row, the `table_index` of its feature's table: one row a feature, or `rows[i]` rows
        of `features[i]` in turn (by the outputs' own keys: a sharded collection's order is
        TorchRec's); 0 where one threshold serves every table."""
        if not self.per_table:
            return 0
        assert self.threshold is not None
        key = (self.threshold.device, tuple(features))
        if key not in self._feature_tables:  # the same keys every step: made once
            self._feature_tables[key] = torch.tensor([self.feature_table[f] for f in features], device=key[0])
        index = self._feature_tables[key]
        if rows is None:
            return index
        # output_size: the counts are known here, so a GPU need not be waited on for them.
        return torch.repeat_interleave(index, torch.tensor(rows, device=key[0]), output_size=sum(rows))

    def prune(self, rows: torch.Tensor, col_offset: int = 0, tables: torch.Tensor | int = 0) -> torch.Tensor:
        """V_hat of stored rows [..., width] (their V columns only). `col_offset`: where a column
        shard of a dense-threshold table starts, so each column meets its own s. `tables`: the
        `table_index` of the rows' tables, one for all or one a row (broadcast as rows' leading
        dimensions)."""
        d = self.base_dim
        if self.threshold is None:
            s = rows[..., d : d + (1 if self.granularity == "feature" else d)]
            return soft_threshold(rows[..., :d], s)
        s = self.threshold[tables] if self.per_table else self.threshold
        if s.shape[-1] > 1:
            s = s[..., col_offset : col_offset + min(rows.shape[-1], d - col_offset)]
        return soft_threshold(rows[..., : d - col_offset], s)

    def local_shards(self) -> list[LocalShard]:
        return [s for m in self.collections for s in local_shards(m)]

    @torch.no_grad()
    def local_masks(self) -> list[tuple[LocalShard, torch.Tensor]]:
        """Per local shard: the bool mask of its surviving V entries."""
        out = []
        for shard in self.local_shards():
            if self.threshold is None and shard.tensor.shape[1] != self.width:
                raise PlanError(
                    f"PEP table {shard.table}: a {self.granularity} threshold lives in the row, so "
                    "its table cannot be sharded column-wise (use table_wise or row_wise)"
                )
            if shard.col_offset < self.base_dim:
                out.append((shard, self.prune(shard.tensor, shard.col_offset, self.table_index[shard.table]) != 0))
        return out

    @torch.no_grad()
    def initialise(self, seed: int) -> None:
        """Write the reproducible initial V (see `initial_values`) and s_init into local shards."""
        for shard in self.local_shards():
            t, d = shard.tensor, self.base_dim
            rows = range(shard.row_offset, shard.row_offset + t.shape[0])
            cols = range(shard.col_offset, shard.col_offset + t.shape[1])
            n = self.plan.table(shard.table).num_embeddings
            v_cols = range(cols.start, min(cols.stop, d))
            t[:, : len(v_cols)] = initial_values(seed, shard.table, n, d, rows, v_cols)
            t[:, len(v_cols) :] = self.s_init


@torch.fx.wrap
def _pruned(module: PepEmbeddings, batch: int, rows: KeyedTensor | None,
            jagged: dict[str, JaggedTensor] | None) -> KeyedTensor:
    # One opaque node when TorchRec's train pipeline traces the model to find the collections'
    # input: the pooling walks the outputs' keys, which a trace cannot follow.
    return module.pruned(batch, rows, jagged)
