"""PEP's two methods, each run by the one loop (`trainer.loop.run_worker`) with its own parts.

`PepPrune` (`embshard prune pep`) trains DLRM over `PepEmbeddings`. Every `pep.count_every` steps it counts the
surviving (non-zero) embedding entries on each rank's own shards and all-reduces the counts; the
first time the total falls to a target fraction of the dense count it writes, under
`<pep dir>/target-<t>/`, the mask of every table (`<table>.mask.npy`, bool [rows, base_dim]) and a
standard decisions file (`decisions.json`, rows ranked by survivors, see planner/policies/pep.py)
for the mixed-dimension retrain through `embshard train`. It stops once every target is written.

`PepLottery` (`embshard train` with `pep.retrain_target`) is the paper's retrain: a plain base-dim
DLRM whose tables restart from the prune run's initial values times a saved mask, and stay masked
(pruned entries are zeroed again after every optimizer step, so they are exactly zero at every
forward). Initial values are not stored: `sharding.pep.initial_values` regenerates them from the
prune run's seed (kept in `pep.json`) and the table shapes, for any sharding. Dense layers restart
from the same seed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper

from embshard.config import JobConfig, PepConfig, target_dir_name
from embshard.datasets.outdir import check_not_in_sealed
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import is_count, read_json_object, write_whole
from embshard.errors import ConfigError, PlanError
from embshard.planner.pipeline import PlanBundle
from embshard.planner.policies.decisions import other_data
from embshard.planner.policies.pep import ROW_THRESHOLDS, pep_decisions, prune_plan, threshold_columns
from embshard.planner.topology import SHARDING_TYPES
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule, inner_module
from embshard.sharding.pep import LocalShard, PepEmbeddings, initial_values, local_shards
from embshard.trainer.build import ShardedModel
from embshard.trainer.callbacks import Callback, StepInfo
from embshard.trainer.history import StepHistory
from embshard.trainer.method import EmbeddingMethod, Worker, module_path, refuse_mlet
from embshard.trainer.metrics import WorkerMetrics

RUN_FILE = "pep.json"  # the prune run's record: seed, granularity, tables, targets reached
DECISIONS_FILE = "decisions.json"
NONZERO_HISTORY_FILE = "nonzero_history.jsonl"  # every count of the prune run, by step


def mask_file(table: str) -> str:
    return f"{table}.mask.npy"


# ----------------------------------------------------------------------------- model assembly


# EmbeddingCollection shards these on CPU and CUDA alike.
UNPOOLED_SHARDING_TYPES = ["table_wise", "row_wise", "column_wise"]
COLUMN_SPLITS = ("column_wise", "table_column_wise")


def pep_sharding_types(cfg: JobConfig, pooled: bool) -> list[str]:
    """What TorchRec may choose for a PEP table of the pooled or unpooled collection.

    Pooled tables take what the device trains correctly (topology.SHARDING_TYPES), less
    data-parallel: PEP tables are the large ones. A row threshold must stay in its row's shard,
    so those granularities also leave column splits out."""
    device = SHARDING_TYPES[cfg.sharding.device]
    types = [t for t in device if t != "data_parallel"] if pooled else UNPOOLED_SHARDING_TYPES
    pep = _require_pep(cfg)
    if pep.granularity in ROW_THRESHOLDS:
        types = [t for t in types if t not in COLUMN_SPLITS]
    wanted = cfg.sharding.sharding_types
    if wanted is not None:
        kept = [t for t in types if t in wanted]
        if not kept:
            kind = "single-hot (pooled)" if pooled else "multi-hot (unpooled)"
            raise ConfigError(
                f"sharding.sharding_types: none of {wanted} can shard a {kind} PEP "
                f"{pep.granularity} table on {cfg.sharding.device} (possible: {', '.join(types)})"
            )
        types = kept
    return types


# FBGEMM's fused optimizers that take a weight decay (its docs: LARS-SGD, LAMB, Adam, row-wise
# Adagrad); sgd and adagrad accept none and would ignore it silently.
DECAYING_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adam")


def row_threshold_decay(cfg: JobConfig) -> dict[str, Any]:
    """The fused optimizer's weight-decay arguments for tables whose rows hold thresholds."""
    pep = _require_pep(cfg)
    if pep.granularity not in ROW_THRESHOLDS or pep.weight_decay == 0:
        return {}
    if cfg.sharding.device == "cpu":
        # A prune run of 10 epochs ended "target not reached, kept 0.988" (bench/PLANTED.md).
        raise ConfigError(
            f"pep.granularity: {pep.granularity} thresholds live in the table rows, and on CPU no fused "
            f"optimizer decays them (FBGEMM's CPU row-wise Adagrad ignores weight decay, its Adam is CUDA "
            f"only), so pep.weight_decay would never raise them and nothing would be pruned; on CPU use "
            f"granularity dimension or global")
    optimizer = cfg.train.sparse_optimizer
    if optimizer not in DECAYING_SPARSE_OPTIMIZERS:
        raise ConfigError(
            f"pep.weight_decay: FBGEMM's fused {optimizer} has no weight decay, so {pep.granularity} "
            f"thresholds would not be decayed; use train.sparse_optimizer "
            f"{' or '.join(DECAYING_SPARSE_OPTIMIZERS)}, or set pep.weight_decay: 0"
        )
    if optimizer == "adam":
        return {"weight_decay": pep.weight_decay}
    # torchrec's RowWiseAdagrad passes the mode through to FBGEMM (torch's Adam would reject it).
    return {"weight_decay": pep.weight_decay, "weight_decay_mode": WeightDecayMode.L2}


class PepPrune(EmbeddingMethod):
    """The prune run: the arch over `PepEmbeddings` (pooled and unpooled TorchRec collections), rows
    at their reproducible initial values and s at s_init, thresholds under their own Adam, and
    the `PruneCallback` that writes masks and decisions."""

    mixed_widths = False
    serves = False

    def check_config(self, cfg: JobConfig) -> None:
        _require_pep(cfg)
        refuse_mlet(cfg, "a PEP prune run thresholds the entries of plain base-dim tables")
        if cfg.embeddings.policy != "uniform":
            raise ConfigError(f"embeddings.policy: PEP prunes dense tables, use uniform (got {cfg.embeddings.policy})")
        row_threshold_decay(cfg)  # its refusals before anything trains, not in every worker

    def embeddings(self, cfg: JobConfig, plan: DimensionPlan, spec: DatasetSpec,
                   device: torch.device) -> EmbeddingModule:
        pep = _require_pep(cfg)
        state = threshold_columns(pep.granularity, plan.base_dim)
        if any(b.state_cols != state for t in plan.tables for b in t.blocks):
            raise PlanError(f"the plan is not a {pep.granularity} PEP prune plan (its rows need {state} "
                            "threshold columns): plan it with `embshard prune pep`")
        return PepEmbeddings(plan, pep.granularity, pep.s_init, multi_hot=[f.name for f in spec.sparse if f.multi_hot],
                             pooled_lookup=pep.pooled_lookup, device=device)

    def collections(self, embeddings: EmbeddingModule) -> list[nn.Module]:
        if not isinstance(embeddings, PepEmbeddings):
            raise TypeError(f"the PEP prune run trains PepEmbeddings, not {type(embeddings).__name__}")
        return embeddings.collections

    def sharders(self) -> list[ModuleSharder]:
        return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        pep = _require_pep(cfg)
        multi_hot = [f.name for f in spec.sparse if f.multi_hot]
        return prune_plan(super().dimension_plan(cfg, spec, counts, out_dir), pep.granularity, multi_hot,
                          pep.pooled_lookup, lambda pooled: pep_sharding_types(cfg, pooled))

    def sharding_plan(self, cfg: JobConfig, bundle: PlanBundle, model: nn.Module, embeddings: EmbeddingModule,
                      sharders: list[ModuleSharder]) -> ShardingPlan:
        pep = embeddings
        assert isinstance(pep, PepEmbeddings)
        tables = []
        if pep.ebc is not None:
            tables.append((pep.ebc, pep.pooled_tables))
        if pep.ec is not None:
            tables.append((pep.ec, [c.name for c in pep.ec.embedding_configs()]))
        return ShardingPlan(plan={module_path(model, c): bundle.shard_plan.module_plan(names) for c, names in tables})

    def sparse_optimizer_args(self, cfg: JobConfig) -> dict[str, Any]:
        return {**super().sparse_optimizer_args(cfg), **row_threshold_decay(cfg)}

    def param_groups(self, cfg: JobConfig, dense: dict[str, nn.Parameter]) -> list[KeyedOptimizer]:
        thresholds = {k: dense.pop(k) for k in [k for k in dense if k.endswith("embeddings.threshold")]}
        if not thresholds:
            return []
        pep = _require_pep(cfg)
        return [KeyedOptimizerWrapper(thresholds, lambda ps: torch.optim.Adam(
            ps, lr=pep.threshold_lr, weight_decay=pep.weight_decay))]

    def initialise(self, cfg: JobConfig, sharded: ShardedModel) -> None:
        pep_module(sharded.model).initialise(cfg.seed)

    def callbacks(self, worker: Worker, sharded: ShardedModel) -> list[Callback]:
        return [PruneCallback(pep_module(sharded.model), worker.cfg, worker.metrics, worker.resumed_at)]


def pep_module(model: nn.Module) -> PepEmbeddings:
    """The PepEmbeddings inside `model`: a PEP run's model has one (its method built it, and the
    builder refuses an arch that drops the module it was given)."""
    found = inner_module(model, PepEmbeddings)
    if found is None:
        raise ConfigError("a PEP run's model holds no PepEmbeddings: its arch replaced the embedding module it "
                          "was given")
    return found


# ----------------------------------------------------------------------------- counting and masks


def nonzero_counts(pep: PepEmbeddings) -> dict[str, int]:
    """Surviving V entries per table over all ranks: counted on local shards, then all-reduced."""
    names = [t.name for t in pep.plan.tables]
    local = torch.zeros(len(names), dtype=torch.int64)
    index = {n: i for i, n in enumerate(names)}
    for shard, mask in pep.local_masks():
        local[index[shard.table]] += int(mask.sum())
    if dist.is_initialized():
        dist.all_reduce(local)
    return dict(zip(names, local.tolist(), strict=True))


def gather_masks(pep: PepEmbeddings) -> dict[str, np.ndarray] | None:
    """Every table's full bool mask [rows, base_dim] on rank 0 (None elsewhere); each rank sends
    its shards' masks bit-packed with their offsets."""
    pieces = [
        (shard.table, shard.row_offset, shard.col_offset, mask.shape, np.packbits(mask.numpy(), axis=None))
        for shard, mask in pep.local_masks()
    ]
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered: list[Any] = [None] * world
    if world == 1:
        gathered = [pieces]
    else:
        dist.gather_object(pieces, gathered if dist.get_rank() == 0 else None, dst=0)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    masks = {t.name: np.zeros((t.num_embeddings, pep.base_dim), dtype=bool) for t in pep.plan.tables}
    for rank_pieces in gathered:
        for table, row, col, shape, bits in rank_pieces:
            block = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
            masks[table][row : row + shape[0], col : col + shape[1]] = block
    return masks


def save_target(masks: dict[str, np.ndarray], base_dim: int, directory: Path, meta: dict[str, Any]) -> Path:
    """Masks and the decisions file of one target, written into a staging folder that is renamed
    at the end, so a target folder is complete or absent; returns the decisions path."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # this run's own leftover from a write cut short
    staging.mkdir(parents=True)
    for table, mask in masks.items():
        np.save(staging / mask_file(table), mask, allow_pickle=False)
    nnz = {table: mask.sum(axis=1) for table, mask in masks.items()}
    pep_decisions(nnz, base_dim, staging, meta).save(staging / DECISIONS_FILE)
    staging.rename(directory)  # `directory` is absent: PruneCallback never writes a target twice
    return directory / DECISIONS_FILE


class PruneCallback(Callback):
    """Counts survivors every `every` steps; writes each target's masks and decisions the first
    time the count reaches it; asks the loop to stop once all are written.

    Targets already on disk (a resumed run, or the same run started again) count as reached and
    are never written again; folders written by another prune run are refused, not replaced."""

    def __init__(self, pep: PepEmbeddings, cfg: JobConfig, metrics: WorkerMetrics | None,
                 resumed_at: int = 0) -> None:
        self.pep = pep
        self.cfg = cfg
        section = _require_pep(cfg)
        self.every = section.count_every
        self.out = cfg.pep_dir
        # What the masks are of: a target folder of a run that differs in any is not this run's
        # (pruned on other data or widths) and is refused, not reported as reached.
        self.meta = {"granularity": section.granularity, "s_init": section.s_init, "seed": cfg.seed,
                     "base_dim": pep.base_dim, "dataset_id": pep.plan.made_with.get("dataset_id")}
        # And how it got there: a resume may change these (trainer/resume_config.py), so they are
        # compared only for targets this start will train through again (a start from scratch).
        self.pace = {"threshold_lr": section.threshold_lr, "weight_decay": section.weight_decay,
                     "count_every": section.count_every, "sparse_lr": cfg.train.sparse_lr,
                     "batch_size": cfg.data.batch_size}
        self.resumed_at = resumed_at
        self.metrics = metrics
        self.dense = sum(t.num_embeddings for t in pep.plan.tables) * pep.base_dim
        self.reached: dict[str, dict[str, Any]] = {}
        self.pending = self._agreed_pending(sorted(section.targets, reverse=True))
        self.last_fraction = 1.0
        self.step: int | None = None  # the last step trained, and the last counted
        self.counted_at: int | None = None
        # The counts are all-reduced: rank 0's record is the run's.
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            # The record names this run before anything else is written, so pep.out is claimed
            # (`check_pep_out`) from the start: a run stopped before its first target left the
            # folder to any other prune run, which replaced its non-zero history.
            write_run_record(cfg, pep, self.reached)
        self.history = StepHistory(self.out / NONZERO_HISTORY_FILE) if rank0 else None

    def _agreed_pending(self, targets: list[float]) -> list[float]:
        """The targets still to write, as rank 0 sees the disk: ranks decide together whether to
        gather masks (a collective), so a rank with a lagging view of shared storage must not
        decide alone. Rank 0's error, if any, is raised on every rank."""
        decided: list[Any] = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                pending = [t for t in targets if not self._written_before(t)]
                decided = [(pending, self.reached, None)]
            except ConfigError as e:
                decided = [([], {}, str(e))]
        if dist.is_initialized():
            dist.broadcast_object_list(decided, src=0)
        pending, self.reached, error = decided[0]
        if error is not None:
            raise ConfigError(error)
        return list(pending)

    def _written_before(self, target: float) -> bool:
        directory = self.out / target_dir_name(target)
        if not directory.exists():
            return False
        try:
            meta = _target_meta(directory)
        except PlanError as e:
            raise ConfigError(f"{e}; set pep.out to a new folder, or move this one away") from None
        ours = self.meta if meta.get("step", 0) <= self.resumed_at else {**self.meta, **self.pace}
        # A key the folder lacks was not recorded then (an earlier version): not a difference.
        other = {k: meta[k] for k in ours if k in meta and meta[k] != ours[k]}
        if other:
            raise ConfigError(f"{directory}: written by another prune run ({other} there, "
                              f"{ {k: ours[k] for k in other} } here); set pep.out to a new folder")
        self.reached[f"{target:g}"] = {"step": meta.get("step"), "nonzero": round(meta["kept_fraction"] * self.dense),
                                       "dir": str(directory)}
        return True

    def on_step(self, info: StepInfo) -> None:
        self.step = info.step
        if info.step % self.every == 0:
            self.check(info.step)

    def check(self, step: int, write_targets: bool = True) -> None:
        self.counted_at = step
        counts = nonzero_counts(self.pep)
        if self.metrics is not None:
            for table, n in counts.items():
                self.metrics.set_pep_nonzero(table, n)
        nonzero = sum(counts.values())
        self.last_fraction = nonzero / self.dense
        if self.history is not None:
            self.history.write({"step": step, "nonzero": nonzero, "dense": self.dense,
                                "kept_fraction": self.last_fraction, "tables": counts})
        while write_targets and self.pending and nonzero <= self.pending[0] * self.dense:
            target = self.pending.pop(0)
            directory = self.out / target_dir_name(target)
            meta = {**self.meta, **self.pace, "target": target, "kept_fraction": self.last_fraction, "step": step}
            masks = gather_masks(self.pep)
            if masks is not None:
                save_target(masks, self.pep.base_dim, directory, meta)
            self.reached[f"{target:g}"] = {"step": step, "nonzero": nonzero, "dir": str(directory)}
        self.stop_requested = not self.pending

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.step is not None and self.step != self.counted_at:
            # The run ended between counts (or before the first): what it kept at the end is
            # counted, recorded and said, not the last count's (or 1.0 for none). A stop (Ctrl-C,
            # a preempted pod) is no end: its resume writes each target at the count the
            # uninterrupted run writes it at, not at the stop's step (2,747 mask entries apart).
            self.check(self.step, write_targets=not summary.get("preempted"))
        summary["pep"] = {"reached": self.reached, "missed": self.pending, "kept_fraction": self.last_fraction}
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_run_record(self.cfg, self.pep, self.reached)
        if dist.is_initialized():
            dist.barrier()  # masks and record are on disk before any rank retrains from them


def check_pep_out(cfg: JobConfig) -> None:
    """ConfigError unless `pep.out` is free for this prune run: a folder, and not another run's
    (whose output_dir its `pep.json` names). A second run there replaced the first one's record
    and non-zero history without a word."""
    out = cfg.pep_dir
    check_not_in_sealed(out, "pep.out", ConfigError, itself=True)
    if out.exists() and not out.is_dir():
        # Found out at the first target otherwise, inside a worker, as a crash.
        raise ConfigError(f"pep.out {out}: a file; it names the folder the prune run writes its targets into")
    try:
        record = json.loads((out / RUN_FILE).read_text())
        owner, seed = record.get("output_dir"), record.get("seed")
    except (OSError, ValueError, AttributeError):
        return  # no record (yet): a record written before runs named their output_dir is taken as ours
    if owner is not None and Path(owner) != Path(cfg.output_dir).resolve():
        raise ConfigError(f"pep.out {out}: holds the prune run of output_dir {owner} (its {RUN_FILE}); set "
                          "pep.out to another folder, or move that one away")
    if seed is not None and seed != cfg.seed:
        # Another prune run in the same folders: it rewrote the record under its seed, and a retrain
        # of the first run's targets drew this one's initial values.
        raise ConfigError(f"pep.out {out}: holds the prune run of seed {seed} (its {RUN_FILE}), this one has seed "
                          f"{cfg.seed}; give it another output_dir (or pep.out), or move {out} away")


def write_run_record(cfg: JobConfig, pep: PepEmbeddings, reached: dict[str, Any]) -> Path:
    """What the lottery retrain needs to regenerate the initial values, and what was written."""
    section = _require_pep(cfg)
    record = {
        "output_dir": str(Path(cfg.output_dir).resolve()),  # whose run: see `check_pep_out`
        "seed": cfg.seed,
        "granularity": section.granularity,
        "s_init": section.s_init,
        "base_dim": pep.base_dim,
        "tables": {t.name: t.num_embeddings for t in pep.plan.tables},
        "init": "sharding.pep.initial_values(seed, table, rows, base_dim, ...)",
        "targets": reached,
    }
    return write_whole(cfg.pep_dir / RUN_FILE, json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------- lottery retrain


def start_from_ticket(shards: list[LocalShard], masks: dict[str, np.ndarray], seed: int,
                      num_rows: dict[str, int]) -> None:
    """The lottery ticket: every local shard restarts at the prune run's initial values x mask."""
    with torch.no_grad():
        for s in shards:
            rows = range(s.row_offset, s.row_offset + s.tensor.shape[0])
            cols = range(s.col_offset, s.col_offset + s.tensor.shape[1])
            mask = _shard_mask(s, masks).to(s.tensor.dtype)
            init = initial_values(seed, s.table, num_rows[s.table], masks[s.table].shape[1], rows, cols)
            s.tensor.copy_(init * mask)


MASK_BYTES = 1  # per entry: MaskKeeper's masks are bool


class MaskKeeper(Callback):
    """Holds pruned entries of a plain (sharded) table at exactly zero: they are multiplied by the
    mask after every step (the fused optimizer updates rows in the backward, so this runs before
    the next forward sees them). Costs one pass over local shards."""

    def __init__(self, shards: list[LocalShard], masks: dict[str, np.ndarray]) -> None:
        # bool, a byte an entry: in the tables' dtype it held as many bytes as the tables it keeps.
        self.kept = [(s.tensor, _shard_mask(s, masks).to(s.tensor.device)) for s in shards]

    def on_step(self, info: StepInfo) -> None:
        with torch.no_grad():
            for tensor, mask in self.kept:
                tensor.mul_(mask)


def _shard_mask(s: LocalShard, masks: dict[str, np.ndarray]) -> torch.Tensor:
    """The shard's part of its table's mask, copied out of the (memory-mapped) file."""
    rows, cols = s.tensor.shape
    part = masks[s.table][s.row_offset : s.row_offset + rows, s.col_offset : s.col_offset + cols]
    return torch.from_numpy(np.array(part, dtype=bool))


def load_masks(directory: Path, tables: dict[str, int], base_dim: int) -> dict[str, np.ndarray]:
    masks = {}
    for table, rows in tables.items():
        path = directory / mask_file(table)
        if not path.is_file():
            raise PlanError(f"{path}: PEP mask not found (was this target reached by the prune run?)")
        # Mapped, not read: a rank needs its shards' rows alone, and every table's whole mask on
        # every rank was a quarter of the whole model's fp32 bytes, for the whole run.
        mask = np.load(path, allow_pickle=False, mmap_mode="r")
        if mask.shape != (rows, base_dim) or mask.dtype != bool:
            raise PlanError(f"{path}: expected a bool mask of shape {(rows, base_dim)}, got {mask.dtype} {mask.shape}")
        masks[table] = mask
    return masks


def load_run_record(pep_dir: Path) -> dict[str, Any]:
    path = pep_dir / RUN_FILE
    if not path.is_file():
        raise PlanError(f"{path}: PEP run record not found (run `embshard prune pep` first)")
    record = read_json_object(path, ("seed", "base_dim", "tables"), PlanError)
    # Read as it was, a record without them was "check_config() raised KeyError: 'tables'".
    if not (is_count(record["seed"]) and is_count(record["base_dim"]) and isinstance(record["tables"], dict)
            and all(isinstance(k, str) and is_count(v) for k, v in record["tables"].items())):
        raise PlanError(f"{path}: not a PEP run record (seed, base_dim and tables' rows must be counts)")
    return record


@dataclass(frozen=True)
class LotteryTicket:
    """One saved target of a prune run: its masks, and the seed and table shapes that regenerate
    the run's initial values."""

    seed: int
    base_dim: int
    tables: dict[str, int]  # name -> rows
    masks: dict[str, np.ndarray]
    where: Path  # the prune run's directory, for errors
    dataset_id: str | None = None  # of the data the masks' rows are ids of (None: not recorded)

    @staticmethod
    def load(pep_dir: Path, target: float) -> "LotteryTicket":
        record = load_run_record(pep_dir)
        tables, base_dim = record["tables"], record["base_dim"]
        directory = pep_dir / target_dir_name(target)
        masks = load_masks(directory, tables, base_dim)
        meta = _target_meta(directory)
        if meta.get("seed", record["seed"]) != record["seed"]:
            # A second prune run there (another seed) rewrote pep.json: the retrain drew the
            # initial values of one run and masked them by the other's mask, without a word.
            raise PlanError(f"{directory}: the mask of the prune run of seed {meta['seed']}, and {pep_dir / RUN_FILE} "
                            f"is of seed {record['seed']} (another prune run wrote it since): no lottery ticket; "
                            "prune again into a folder of its own")
        dataset = meta.get("dataset_id")
        return LotteryTicket(record["seed"], base_dim, tables, masks, pep_dir, dataset if isinstance(dataset, str)
                             else None)

    @property
    def nonzero(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def check_matches(self, plan: DimensionPlan, spec: DatasetSpec | None = None) -> None:
        if {t.name: t.num_embeddings for t in plan.tables} != self.tables or plan.base_dim != self.base_dim:
            raise PlanError(f"{self.where / RUN_FILE}: the prune run's tables differ from this plan's")
        if spec is not None and self.dataset_id and other_data(self.dataset_id, spec) is not None:
            # A mask is per row: on another dataset of as many rows it kept other ids' entries.
            raise PlanError(f"{self.where}: its masks are of the dataset with id {self.dataset_id[:8]}, this run's "
                            f"data is {spec.id[:8]}: retrain on the data it was pruned on, or prune this one")


def _target_meta(directory: Path) -> dict[str, Any]:
    """The meta of a target's decisions file (written with its masks; {} where it has none): the
    seed, data and step it was pruned with."""
    path = directory / DECISIONS_FILE
    if not path.is_file():
        raise PlanError(f"{directory}: holds no readable {DECISIONS_FILE} (missing)")
    meta = read_json_object(path, ("version", "tables"), PlanError).get("meta")  # optional in the format
    return meta if isinstance(meta, dict) else {}


class PepLottery(EmbeddingMethod):
    """The paper's retrain: a plain base-dim DLRM whose tables start at the prune run's initial
    values x the mask of `pep.retrain_target` (read from `pep.retrain_from`), pruned entries held
    at zero by `MaskKeeper`."""

    def __init__(self, ticket: LotteryTicket | None = None) -> None:
        self._ticket = ticket

    def ticket(self, cfg: JobConfig) -> LotteryTicket:
        """The saved target, read once per run (its masks are as large as the tables)."""
        if self._ticket is None:
            pep = _require_pep(cfg)
            if pep.retrain_target is None or pep.retrain_from is None:
                raise ConfigError("pep.retrain_target: the lottery retrain needs the target whose mask it keeps")
            self._ticket = LotteryTicket.load(Path(pep.retrain_from), pep.retrain_target)
        return self._ticket

    def check_config(self, cfg: JobConfig) -> None:
        refuse_mlet(cfg, "a lottery-ticket retrain keeps masked entries of plain base-dim tables at zero")
        self.ticket(cfg)

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        plan = super().dimension_plan(cfg, spec, counts, out_dir)
        _require_uniform(plan)
        self.ticket(cfg).check_matches(plan, spec)
        # MaskKeeper's bool mask of every local entry: a byte each, beside the tables all run long.
        tables = [replace(t, blocks=[replace(b, side_bytes_per_entry=MASK_BYTES) for b in t.blocks])
                  for t in plan.tables]
        return replace(plan, tables=tables)

    def initialise(self, cfg: JobConfig, sharded: ShardedModel) -> None:
        _require_uniform(sharded.bundle.dimension_plan)
        saved = self.ticket(cfg)
        saved.check_matches(sharded.bundle.dimension_plan)
        start_from_ticket(table_shards(sharded), saved.masks, saved.seed, saved.tables)

    def callbacks(self, worker: Worker, sharded: ShardedModel) -> list[Callback]:
        return [MaskKeeper(table_shards(sharded), self.ticket(worker.cfg).masks)]


def table_shards(sharded: ShardedModel) -> list[LocalShard]:
    return local_shards(sharded.embeddings.get_submodule("ebc"))


def _require_uniform(plan: DimensionPlan) -> None:
    if not plan.is_uniform:
        raise PlanError("PEP prunes full base-dim tables: plan it with embeddings.policy uniform")


def _require_pep(cfg: JobConfig) -> PepConfig:
    if cfg.pep is None:
        raise ConfigError("pep: this run needs a `pep:` section (granularity, s_init, targets, ...)")
    return cfg.pep
