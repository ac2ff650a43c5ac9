"""MLET's collapse W = W1 . W2 and its inverse, computed where W1's shards already live.

An MLET block trains W1 (n x k, a TorchRec table, sharded) and W2 (k x d, the `nn.Linear(k, d)`
in `PlannedEmbeddingBags.mlet`, replicated on every rank). Checkpoints and serving keep only the
n x d product W (MLET paper, section 2), so:

- `collapse_mlet_tables` computes W shard-locally. A shard holding whole rows of W1 (table-wise,
  row-wise) multiplies locally. Column shards (column-wise, table-column-wise: rank j holds
  W1[rows, cols_j]) each hold one partial product W1[:, cols_j] . W2[cols_j, :] of every row; the
  sum is reduced *and scattered by rows* inside the group of ranks holding that table with
  `reduce_scatter_single` (gloo and NCCL both have it), in rounds of at most `chunk_bytes`, so a
  rank allocates its W rows plus one round's buffers and never any table it did not hold.
  The result is a ShardedTensor n x d whose rows are split over the same ranks: an ordinary
  sharded table that DCP reshards into any plan of the same rows at width d.
- `rebuild_mlet_tables` is the inverse on resume: W1' = W . pinv(W2) (Theorem 2.1's
  construction; W2 is k x d with k >= d, full column rank almost surely, so W1' . W2 = W and the
  model's outputs are unchanged). Column shards get their columns of W1' by all-gathering the
  row slices of W in rounds, the transpose of the collapse's reduce-scatter.

W1' = W1 . P (P = W2 . pinv(W2), the projector onto W2's column space) is the minimum-norm
factor; the part of the trained W1 that W2 maps to zero is not in the checkpoint. Outputs right
after resume are equal, and so is W1's gradient (dL/dW . W2^T). W2's gradient (pooled W1^T .
dL/dout) sees W1' instead of W1, so the run drifts from an uninterrupted one: measured on a
2-rank toy DLRM, 20 steps after resume, loss within 4.8% per step (tests/test_mlet_distributed.py's
resume run, once, with 20 steps instead of its 5). W1's
row-wise Adagrad accumulators are per row, independent of the factorisation, and stay in the
checkpoint's optimizer state, which loads unchanged (resetting them drifted further: 7.6%).

The checkpoint hooks (`mlet_before_save`, `mlet_load_template`, `mlet_after_load`) store W under
W1's own state-dict key, so a checkpoint of an MLET model is also a checkpoint of the plain model
built from `without_mlet(plan)`.

With `exact_resume` (opt-in, `MletConfig.exact_resume`) the checkpoint also keeps W1 itself under
`TRAINING_STATE_PREFIX + <W1 key>`: training state, which a plain model and the serving export
never read. Resuming then restores W1 bit-exactly instead of rebuilding it, so W2's gradient and
the whole run match an uninterrupted one. A checkpoint written without it still loads with it on:
W1 is then rebuilt as usual.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed.remote_device import _remote_device

from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import inner_module
from embshard.sharding.planned_embedding import PlannedEmbeddingBags

# Bytes of one round's communication buffers per rank; bounds the collapse's working memory
# beyond the W rows it returns.
CHUNK_BYTES = 4 << 20

StateDict = dict[str, Any]

# Checkpoint keys of the W1 kept by `exact_resume`, labelled as training state, not model weights.
TRAINING_STATE_PREFIX = "mlet_training_state."


class CollapseObserver(Protocol):
    """What the collapse reports to (trainer.metrics.WorkerMetrics has it)."""

    def observe_collapse(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class MletTable:
    """One MLET block table and where its factors sit in the model's state dict."""

    name: str  # block table name
    w1_key: str  # n x k table (n x d once collapsed)
    w2_key: str  # nn.Linear(k, d).weight, i.e. W2 transposed (d x k)
    rows: int
    width: int  # k
    dim: int  # d


def is_mlet_w2(key: str, keys: Collection[str]) -> bool:
    """Whether `key` of a state dict holding `keys` is an MLET block's W2 (`mlet_tables`' `w2_key`):
    `<module>.mlet.<block>.weight` beside that block's table `<module>.ebc.embedding_bags.<block>.weight`
    (an arch's own `mlet` submodule has no such table beside it). A checkpoint's tables are
    collapsed, so an ordinary d-wide model (`without_mlet`) reads it without them."""
    found = _W2_KEY.fullmatch(key)
    return found is not None and found["module"] + _w1_suffix(found["block"]) in keys


def _w1_suffix(block: str) -> str:
    """A block's table (W1, or W once collapsed) within its embedding module's state dict."""
    return f"ebc.embedding_bags.{block}.weight"


def _w2_suffix(block: str) -> str:
    return f"mlet.{block}.weight"


_W2_KEY = re.compile(r"(?P<module>(?:.*\.)?)mlet\.(?P<block>[^.]+)\.weight")


def without_mlet(plan: DimensionPlan) -> DimensionPlan:
    """The plan a collapsed model is built from: every block at its serving width d, no W2."""
    tables = [
        dataclasses.replace(t, blocks=[dataclasses.replace(b, mlet_width=None) for b in t.blocks])
        for t in plan.tables
    ]
    return dataclasses.replace(plan, tables=tables)


def mlet_tables(model: nn.Module, state_dict: StateDict) -> list[MletTable]:
    """The MLET blocks of the (possibly DMP-wrapped) model, in plan order (same on every rank)."""
    embeddings = inner_module(model, PlannedEmbeddingBags)
    if embeddings is None:
        return []
    found = []
    for table in embeddings.plan.tables:
        for i, block in enumerate(table.blocks):
            if block.mlet_width is None:
                continue
            name = table.block_name(i)
            suffix = _w1_suffix(name)
            w1_key = next(k for k in state_dict if k == suffix or k.endswith("." + suffix))
            prefix = w1_key[: -len(suffix)]
            found.append(MletTable(name, w1_key, prefix + _w2_suffix(name),
                                   block.num_rows, block.mlet_width, block.dim))
    return found


# -- collapse ------------------------------------------------------------------------------------

def collapse_mlet_tables(
    model: nn.Module,
    state_dict: StateDict | None = None,
    *,
    metrics: CollapseObserver | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    timeout: timedelta | None = None,
) -> dict[str, torch.Tensor]:
    """W1 key -> collapsed W (n x d): a ShardedTensor for a sharded model (collective: every rank
    calls it), a plain tensor for an unsharded one. `state_dict` defaults to the model's own.
    `timeout` bounds the wait in each process group made for a band split over some of the ranks
    (None: torch's default for the backend), as the default group's bounds the others."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    start = time.perf_counter()
    collapsed: dict[str, torch.Tensor] = {}
    tables = mlet_tables(model, state_dict)
    with _column_groups(tables, state_dict, timeout) as groups:
        for t in tables:
            w1, w2t = state_dict[t.w1_key], state_dict[t.w2_key].detach()
            if isinstance(w1, ShardedTensor):
                collapsed[t.w1_key] = _collapse_sharded(w1, w2t, groups, chunk_bytes)
            else:
                collapsed[t.w1_key] = w1.detach() @ w2t.t()
    if metrics is not None and tables:
        metrics.observe_collapse(time.perf_counter() - start)
    return collapsed


def mlet_before_save(model: nn.Module, state_dict: StateDict, metrics: CollapseObserver | None = None, *,
                     exact_resume: bool = False, timeout: timedelta | None = None) -> StateDict:
    """Checkpoint hook: each MLET block's W1 (n x k) replaced by W = W1 . W2 (n x d), same key;
    with `exact_resume`, W1 kept as well under its training-state key."""
    collapsed = collapse_mlet_tables(model, state_dict, metrics=metrics, timeout=timeout)
    kept = {TRAINING_STATE_PREFIX + key: state_dict[key] for key in collapsed} if exact_resume else {}
    return {**state_dict, **collapsed, **kept}


def _collapse_sharded(w1: ShardedTensor, w2t: torch.Tensor, groups: dict[tuple[int, ...], Any],
                      chunk_bytes: int) -> ShardedTensor:
    rank = dist.get_rank()
    d = w2t.shape[0]
    local = {tuple(s.metadata.shard_offsets): s.tensor.detach() for s in w1.local_shards()}
    out_meta, out_local = [], []
    for band in _row_bands(w1):
        out_meta.extend(band.out_metadata(d))
        mine = band.out_slice(rank)
        if mine is None:
            continue
        lo, hi = mine
        result = torch.empty(hi - lo, d, dtype=w2t.dtype, device=w2t.device)
        pieces = [(local[tuple(m.shard_offsets)], w2t[:, _cols(m)].t()) for m in band.shards
                  if _rank_of(m) == rank]
        if len(band.shards) == 1:  # whole rows on one rank: a local product
            torch.matmul(pieces[0][0], pieces[0][1], out=result)
        else:
            _reduce_scatter_rows(band, pieces, result, groups[band.ranks], chunk_bytes)
        out_local.append(Shard(result, ShardMetadata([band.start + lo, 0], [hi - lo, d], band.placement(rank))))
    return _sharded(out_local, out_meta, (w1.size(0), d), w2t.dtype)


def _reduce_scatter_rows(band: _RowBand, pieces: list[tuple[torch.Tensor, torch.Tensor]],
                         result: torch.Tensor, group: Any, chunk_bytes: int) -> None:
    """result = sum over the band's ranks of their partial products, for this rank's rows."""
    m, d = len(band.ranks), result.shape[1]
    chunk = band.chunk_rows(d, chunk_bytes)
    send = result.new_empty(m, chunk, d)
    recv = result.new_empty(chunk, d)
    me = band.ranks.index(dist.get_rank())
    for r in range(math.ceil(band.slice_rows / chunk)):
        for i in range(m):
            lo, hi = band.round_rows(i, r, chunk)
            buf = send[i, : hi - lo]
            send[i, hi - lo:].zero_()  # padding of a short last round sums to zeros
            for j, (w1_piece, w2_cols) in enumerate(pieces):
                if j == 0:
                    torch.matmul(w1_piece[lo:hi], w2_cols, out=buf)
                else:
                    buf.addmm_(w1_piece[lo:hi], w2_cols)
        dist.reduce_scatter_single(recv, send.view(m * chunk, d), group=group)
        lo, hi = band.round_rows(me, r, chunk)
        offset = lo - band.slice_of(me)[0]
        result[offset: offset + hi - lo] = recv[: hi - lo]


# -- rebuild -------------------------------------------------------------------------------------

def mlet_load_template(model: nn.Module, state_dict: StateDict, *, exact_resume: bool = False) -> StateDict:
    """Checkpoint hook before `dcp.load`: W1 entries replaced by empty n x d tables laid out as
    the collapse writes them, for DCP to read the collapsed W into (resharding as needed). With
    `exact_resume`, the model's W1 also goes under its training-state key, for DCP to read the
    saved W1 into in place."""
    out = dict(state_dict)
    for t in mlet_tables(model, state_dict):
        w1 = state_dict[t.w1_key]
        if exact_resume:
            out[TRAINING_STATE_PREFIX + t.w1_key] = w1
        if isinstance(w1, ShardedTensor):
            out[t.w1_key] = _empty_collapsed(w1, t.dim)
        else:
            out[t.w1_key] = torch.empty(t.rows, t.dim, dtype=w1.dtype)
    return out


def mlet_after_load(model: nn.Module, state_dict: StateDict, *, exact_resume: bool = False,
                    chunk_bytes: int = CHUNK_BYTES, timeout: timedelta | None = None) -> StateDict:
    """Checkpoint hook after `dcp.load`: put W1 back under its own key for `load_state_dict`,
    the saved one with `exact_resume` (the training-state keys dropped, the model has none),
    else rebuilt in place from the loaded W and W2."""
    saved = {k.removeprefix(TRAINING_STATE_PREFIX): v for k, v in state_dict.items()
             if k.startswith(TRAINING_STATE_PREFIX)}
    out = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_STATE_PREFIX)}
    if exact_resume and saved:  # W1 itself was checkpointed: restore it bit for bit
        return {**out, **saved}
    # Not kept (or written without exact_resume): rebuild W1 from the collapsed W and W2.
    return {**out, **rebuild_mlet_tables(model, out, chunk_bytes=chunk_bytes, timeout=timeout)}


def rebuild_mlet_tables(model: nn.Module, state_dict: StateDict, *, chunk_bytes: int = CHUNK_BYTES,
                        timeout: timedelta | None = None) -> dict[str, torch.Tensor]:
    """W1 key -> the model's W1, overwritten with W . pinv(W2), where `state_dict` holds the
    collapsed W under the W1 key and W2 under its own (collective for a sharded model; `timeout`
    as for `collapse_mlet_tables`)."""
    live = model.state_dict()
    rebuilt = {}
    tables = mlet_tables(model, live)
    with _column_groups(tables, live, timeout) as groups:
        for t in tables:
            # pinv in float64: W2 may be ill-conditioned and W1' . W2 must return W to rounding.
            pinv = torch.linalg.pinv(state_dict[t.w2_key].detach().t().double()).to(torch.float32)
            w, w1 = state_dict[t.w1_key], live[t.w1_key]
            with torch.no_grad():
                if isinstance(w1, ShardedTensor):
                    _rebuild_sharded(w, w1, pinv, groups, chunk_bytes)
                else:
                    torch.matmul(w, pinv, out=w1)
            rebuilt[t.w1_key] = w1
    return rebuilt


def _rebuild_sharded(w: ShardedTensor, w1: ShardedTensor, pinv: torch.Tensor,
                     groups: dict[tuple[int, ...], Any], chunk_bytes: int) -> None:
    rank = dist.get_rank()
    w_local = {s.metadata.shard_offsets[0]: s.tensor for s in w.local_shards()}
    w1_local = {tuple(s.metadata.shard_offsets): s.tensor for s in w1.local_shards()}
    d = pinv.shape[0]
    for band in _row_bands(w1):
        mine = band.out_slice(rank)
        if mine is None:
            continue
        rows = w_local[band.start + mine[0]]
        targets = [(w1_local[tuple(m.shard_offsets)], pinv[:, _cols(m)]) for m in band.shards
                   if _rank_of(m) == rank]
        if len(band.shards) == 1:
            torch.matmul(rows, targets[0][1], out=targets[0][0])
            continue
        m, chunk = len(band.ranks), band.chunk_rows(d, chunk_bytes)
        send = rows.new_zeros(chunk, d)
        recv = rows.new_empty(m, chunk, d)
        me = band.ranks.index(rank)
        for r in range(math.ceil(band.slice_rows / chunk)):
            lo, hi = band.round_rows(me, r, chunk)
            offset = lo - band.slice_of(me)[0]
            send[: hi - lo] = rows[offset: offset + hi - lo]
            dist.all_gather_single(recv.view(m * chunk, d), send, group=groups[band.ranks])
            for i in range(m):
                lo, hi = band.round_rows(i, r, chunk)
                for target, pinv_cols in targets:
                    torch.matmul(recv[i, : hi - lo], pinv_cols, out=target[lo:hi])


def _empty_collapsed(w1: ShardedTensor, d: int) -> ShardedTensor:
    rank = dist.get_rank()
    meta: list[ShardMetadata] = []
    local: list[Shard] = []
    for band in _row_bands(w1):
        band_meta = band.out_metadata(d)
        meta.extend(band_meta)
        local.extend(Shard(torch.empty(m.shard_sizes, dtype=w1.dtype, device=_placement(m).device()), m)
                     for m in band_meta if _rank_of(m) == rank)
    return _sharded(local, meta, (w1.size(0), d), w1.dtype)


# -- layout --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RowBand:
    """The shards of W1 covering one range of rows (all of them, for column-wise sharding). Its
    rows of W are split into contiguous slices, one per rank holding part of the band."""

    start: int
    rows: int
    shards: tuple[ShardMetadata, ...]
    ranks: tuple[int, ...]  # sorted; the reduce-scatter group

    @property
    def slice_rows(self) -> int:
        return math.ceil(self.rows / len(self.ranks))

    def slice_of(self, index: int) -> tuple[int, int]:
        """Rows [lo, hi) of W, relative to the band, that the index-th rank of the band keeps."""
        lo = min(index * self.slice_rows, self.rows)
        return lo, min(lo + self.slice_rows, self.rows)

    def out_slice(self, rank: int) -> tuple[int, int] | None:
        if rank not in self.ranks:
            return None
        lo, hi = self.slice_of(self.ranks.index(rank))
        return (lo, hi) if hi > lo else None

    def out_metadata(self, d: int) -> list[ShardMetadata]:
        out = []
        for i, r in enumerate(self.ranks):
            lo, hi = self.slice_of(i)
            if hi > lo:
                out.append(ShardMetadata([self.start + lo, 0], [hi - lo, d], self.placement(r)))
        return out

    def placement(self, rank: int) -> str:
        """W's rows stay on the device that held the rank's W1 shard."""
        return str(next(_placement(m) for m in self.shards if _rank_of(m) == rank))

    def chunk_rows(self, d: int, chunk_bytes: int) -> int:
        """Rows per round: the send and receive buffers ((m + 1) x rows x d floats) fit chunk_bytes."""
        fit = chunk_bytes // (4 * d * (len(self.ranks) + 1))
        return max(1, min(fit, self.slice_rows))

    def round_rows(self, index: int, r: int, chunk: int) -> tuple[int, int]:
        """Rows (relative to the band) of the index-th rank's slice that round r carries."""
        lo, hi = self.slice_of(index)
        start = min(lo + r * chunk, hi)
        return start, min(start + chunk, hi)


def _placement(m: ShardMetadata) -> _remote_device:
    """Where shard m lives: TorchRec places every shard (ShardMetadata allows none)."""
    if m.placement is None:
        raise ValueError(f"shard at offsets {m.shard_offsets} has no placement")
    return m.placement


def _rank_of(m: ShardMetadata) -> int:
    rank = _placement(m).rank()
    if rank is None:
        raise ValueError(f"shard at offsets {m.shard_offsets} is placed on {_placement(m)}, not on a rank")
    return rank


def _row_bands(w1: ShardedTensor) -> list[_RowBand]:
    bands: dict[tuple[int, int], list[ShardMetadata]] = {}
    for m in w1.metadata().shards_metadata:
        bands.setdefault((m.shard_offsets[0], m.shard_sizes[0]), []).append(m)
    out = []
    for (start, rows), shards in sorted(bands.items()):
        shards.sort(key=lambda m: m.shard_offsets[1])
        ranks = tuple(sorted({_rank_of(m) for m in shards}))
        out.append(_RowBand(start, rows, tuple(shards), ranks))
    return out


def _cols(m: ShardMetadata) -> slice:
    return slice(m.shard_offsets[1], m.shard_offsets[1] + m.shard_sizes[1])


def _sharded(local: list[Shard], meta: list[ShardMetadata], size: tuple[int, int],
             dtype: torch.dtype) -> ShardedTensor:
    # Every rank knows the global layout, so no collective is needed to assemble the metadata.
    properties = TensorProperties.create_from_tensor(torch.empty(0, dtype=dtype))
    global_meta = ShardedTensorMetadata(meta, torch.Size(size), properties)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, global_meta)


@contextmanager
def _column_groups(tables: list[MletTable], state_dict: StateDict,
                   timeout: timedelta | None) -> Iterator[dict[tuple[int, ...], Any]]:
    """Process groups for the bands split over several ranks."""
    with rank_groups({
        band.ranks
        for t in tables if isinstance(state_dict[t.w1_key], ShardedTensor)
        for band in _row_bands(state_dict[t.w1_key]) if len(band.shards) > 1
    }, timeout) as groups:
        yield groups


@contextmanager
def rank_groups(rank_sets: set[tuple[int, ...]], timeout: timedelta | None) -> Iterator[dict[tuple[int, ...], Any]]:
    """A process group per set of ranks, torn down after use; the whole world's is the default
    group (None). `new_group` is collective over the world, so every rank creates them in the same
    (sorted) order. Their waits end after `timeout`: a rank that hung mid-collapse ends the run
    then, not after torch's default (30 min on gloo) whatever `cluster.collective_timeout_s` says."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    groups = {ranks: None if len(ranks) == world else dist.new_group(list(ranks), timeout=timeout)
              for ranks in sorted(rank_sets)}
    try:
        yield groups
    finally:
        for g in groups.values():
            if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(g)
