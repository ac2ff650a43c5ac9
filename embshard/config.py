"""Every section of a job config, and nothing else: torch-free, so reading a YAML file (the CLI,
`embshard plan --help`, a config check) loads no torch, torchrec, Ray or prometheus_client.

YAML files in `configs/` are validated into `JobConfig` by `embshard.typed_config`; an error names
the field (`train.batch_size: expected an integer, got 'abc'`). Each section is read by exactly one
component: `data` by the reader, `model` by the model builder, `embeddings` by the planner (through
the run's method, `trainer/method.py`), `sharding` by the shard planner, `train` by the loop,
`metrics`/`checkpoint` by their components, `pep`/`autodim` by those methods, `sweep` by
`embshard sweep` (its defaults: a paper's setting in configs/papers/ carries its own).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from embshard.errors import ConfigError
from embshard.planner.rounding import MAX_DIM, RoundingRule, width_problem
from embshard.sealed_folders import RUN_PLAN_DIR
from embshard.typed_config import flatten, from_dict, load_yaml, to_dict, unflatten

if TYPE_CHECKING:
    from embshard.datasets.storage import StoragePath
    from embshard.planner.topology import TopologySpec

SparseOptimizer = Literal["sgd", "rowwise_adagrad", "adagrad", "adam"]
# What FBGEMM's CPU table-batched embeddings can step (its CPU mode asserts on the others).
CPU_SPARSE_OPTIMIZERS: tuple[str, ...] = ("rowwise_adagrad", "adagrad", "sgd")
# PEP threshold granularity: one s for all, one per column, one per row, one per entry.
Granularity = Literal["global", "dimension", "field", "field_dimension", "feature", "feature_dimension"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
# AutoDim: one table per field read at every candidate width, or one table per candidate.
Lookup = Literal["weight_sharing", "separate"]
# AutoDim: candidate -> d_N by a linear transform, or by zero padding.
Unify = Literal["linear", "zero_pad"]
# train.pipeline: TorchRec's TrainPipelineSparseDist, its semi-sync variant, or none (trainer/pipeline.py).
PipelineKind = Literal["sparse_dist", "semi_sync", "none"]

# MLET W2 initialisation: the paper draws W2 from a Gaussian N(0, 0.0625). We read 0.0625 as the
# variance (std 0.25): N(mu, sigma^2) notation puts the variance second, and 0.0625 = 0.25^2.
MLET_INIT_STD = 0.25


@dataclass
class MletConfig:
    """Train blocks factorised, W = W1 (n x k) . W2 (k x d), collapsed to n x d for serving."""

    ratio: float | None = None  # k = round(ratio * d) per block
    width: int | None = None  # the same k for every block
    features: list[str] | None = None  # sparse features trained with MLET; None = all
    init_std: float = MLET_INIT_STD  # W2 ~ N(0, init_std^2)
    # Checkpoints also keep W1 (as training state, never served) so a resume is bit-exact
    # instead of restarting from the minimum-norm W1 = W . pinv(W2).
    exact_resume: bool = False

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.width is None):
            raise ConfigError("ratio: set exactly one of mlet.ratio or mlet.width")
        # k < d caps the rank of W1.W2 at k, so it cannot represent every n x d table
        # (MLET paper, Theorem 2.2): only widening factorisations are useful.
        if self.ratio is not None and self.ratio < 1:
            raise ConfigError(
                f"ratio: {self.ratio} < 1 gives k < d, which shrinks the space of tables the "
                "factorisation can represent (MLET paper, Theorem 2.2); use ratio >= 1"
            )
        if self.width is not None and not 1 <= self.width <= MAX_DIM:
            raise ConfigError(f"width: must be 1 to {MAX_DIM:,}, got {self.width:,}")
        if self.features is not None and not self.features:  # planned with no MLET, silently
            raise ConfigError("features: an empty list trains no table with MLET; leave it out for all of them, "
                              "or leave out embeddings.mlet")
        twice = [f for i, f in enumerate(self.features or []) if f in (self.features or [])[:i]]
        if twice:  # a typo for another feature, most likely, which then trained without MLET
            raise ConfigError(f"features: {twice[0]!r} given twice")
        if self.init_std <= 0:
            raise ConfigError(f"init_std: must be positive, got {self.init_std}")


@dataclass
class MdeConfig:
    """`embeddings.mde`: the knobs of mixed-dimension embeddings (Ginart et al.)."""

    alpha: float = 0.3  # temperature: 0 = uniform dims, 1 = dims proportional to popularity
    mode: Literal["within", "across"] = "across"  # blocks inside each table, or one per table
    blocks: int = 8  # within-table mode: blocks per table (k)
    budget_params: int | None = None  # serving parameters to aim for (instead of dim's lambda)
    budget_bytes: int | None = None  # the same budget in bytes of fp32 parameters

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.blocks < 1:
            raise ConfigError(f"blocks: must be >= 1, got {self.blocks}")
        if self.budget_params is not None and self.budget_bytes is not None:
            raise ConfigError("budget_bytes: set budget_params or budget_bytes, not both")
        for name in ("budget_params", "budget_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")


Policy = Literal["uniform", "mde", "decisions"]
POLICIES: tuple[str, ...] = get_args(Policy)


@dataclass
class EmbeddingsConfig:
    # Keys that moved into a subsection: an old config gets told where each one lives now.
    __moved_fields__ = {k: f"mde.{k}" for k in ("alpha", "mode", "blocks", "budget_params", "budget_bytes")}

    policy: Policy = "uniform"  # uniform: dim everywhere; mde: by popularity
    # Train with another method than the policy's: a name given to register_method, or
    # "package.module:attr" (an EmbeddingMethod class or instance) that every worker imports. null = policy.
    method: str | None = None
    dim: int = 16  # base dim d-bar: the width every feature reaches the model at
    mde: MdeConfig = field(default_factory=MdeConfig)  # read only by policy mde
    decisions: str | None = None  # decisions file (policy: decisions), written by AutoDim / PEP
    rounding: RoundingRule = "multiple4"  # how widths are rounded; FBGEMM's fused kernels need multiples of 4
    min_dim: int = 4  # no block is narrower than this
    mlet: MletConfig | None = None  # train blocks factorised (MLET); null = plain tables

    def __post_init__(self) -> None:
        for name in ("dim", "min_dim"):
            problem = width_problem(getattr(self, name), self.rounding)
            if problem:
                raise ConfigError(f"{name}: {problem}")
        if self.min_dim > self.dim:
            raise ConfigError(f"min_dim: {self.min_dim} is above dim {self.dim}")
        budget = self.mde.budget_params if self.mde.budget_params is not None else self.mde.budget_bytes
        if budget is not None and self.policy != "mde":
            which = "budget_params" if self.mde.budget_params is not None else "budget_bytes"
            raise ConfigError(f"mde.{which}: only policy mde takes a budget (policy is {self.policy})")
        if self.method in POLICIES and self.method != self.policy:
            # The built-in methods of these names train whatever the policy plans.
            raise ConfigError(f"method: {self.method!r} is a dimension policy; set policy: {self.method} "
                              f"(policy is {self.policy}; method names a method other than the policy's)")
        if self.policy == "decisions" and not self.decisions:
            raise ConfigError("decisions: policy decisions needs the path of a decisions file")
        if self.policy != "decisions" and self.decisions:
            raise ConfigError(f"decisions: only read by policy decisions (policy is {self.policy})")


@dataclass
class PepConfig:
    # dimension: the granularity whose thresholds rise under their own Adam on any device (the
    # paper's best, feature_dimension, needs a fused optimizer with weight decay: see weight_decay).
    # field / field_dimension (the authors' code's field and field_dim): one s per table, or per
    # table and column, dense like dimension's, so each table prunes to a level of its own.
    granularity: Granularity = "dimension"
    # sigmoid(s_init) is the starting threshold: the paper uses -15 (MovieLens), -150 (Criteo,
    # Avazu), i.e. nothing is pruned at first.
    s_init: float = -15.0
    # Learning rate of the dense thresholds (global, dimension, field, field_dimension), trained with their
    # own Adam: s rises about this much per step while the decay dominates, so from -15 the
    # first entries fall after ~200 steps. (The reference: 1e-3 over hundreds of epochs.) Row
    # thresholds (feature / feature_dimension) share their row's fused optimizer and
    # train.sparse_lr.
    threshold_lr: float = 0.05
    # L2 on s. It is what raises the thresholds: at s = -15 the loss gradient on s is scaled by
    # sigmoid'(s) ~ 3e-7, so a decay pulling s toward 0 dominates until the threshold starts
    # cutting entries the loss needs. (The reference implementation decays every parameter with
    # Adam at 1e-5 over hundreds of epochs; 1e-3 reaches 0.5 and 0.125 of the entries after
    # ~1.3 and ~1.8 epochs on MovieLens-1M, bench/QUALITY.md.) Dense thresholds (global,
    # dimension, field, field_dimension) decay alone under their Adam. Row thresholds share their row's fused optimizer,
    # so the decay applies to the whole [V | s] row, as in the reference, and needs
    # rowwise_adagrad or adam (CUDA only); but FBGEMM's CPU row-wise Adagrad ignores it
    # (tests/test_pep.py), so on CPU a row granularity with a decay is refused before it trains.
    weight_decay: float = 1e-3
    # Fractions of the dense embedding parameters to keep; a mask and a decisions file are written
    # the first time the non-zero count falls to each (one run, several targets).
    targets: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.1, 0.03])
    # Single-hot tables through the pooled EmbeddingBagCollection (exact: a one-row bag is its row;
    # about twice as fast); false: every table through the unpooled EmbeddingCollection, which
    # can also shard row-wise on CPU.
    pooled_lookup: bool = True
    count_every: int = 20  # steps between global non-zero counts (each reads every local shard)
    out: str | None = None  # where a prune run writes masks, decisions, run record; None = <output_dir>/pep
    retrain_target: float | None = None  # lottery retrain: the saved target whose mask it keeps
    # Lottery retrain: the prune run's folder (its `pep.out`). Explicit, because a retrain runs
    # with its own output_dir, from which the prune run's folder cannot be derived.
    retrain_from: str | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise ConfigError(f"targets: expected fractions in (0, 1), got {self.targets}")
        if len({target_dir_name(t) for t in self.targets}) < len(self.targets):
            # The second would write the first one's target folder again (0.1 and 0.1000001 too).
            raise ConfigError(f"targets: each fraction once (to 6 significant digits), got {self.targets}")
        if self.threshold_lr <= 0:
            raise ConfigError(f"threshold_lr: must be positive, got {self.threshold_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.count_every < 1:
            raise ConfigError(f"count_every: must be >= 1, got {self.count_every}")
        if self.retrain_target is not None and not 0 < self.retrain_target < 1:
            raise ConfigError(f"retrain_target: expected a fraction in (0, 1), got {self.retrain_target}")
        if (self.retrain_target is None) != (self.retrain_from is None):
            raise ConfigError(
                "retrain_from: a lottery retrain sets both pep.retrain_target and pep.retrain_from "
                "(the prune run's pep folder, e.g. outputs/pep-movielens/pep)"
            )


def target_dir_name(target: float) -> str:
    return f"target-{target:g}"


@dataclass
class AutodimConfig:
    # Candidate widths per field, ascending; the largest (d_N) is the width every candidate is
    # unified to, so it must equal embeddings.dim (the retrain's base dim).
    candidates: list[int] = field(default_factory=lambda: [2, 8, 16, 24, 32])
    # weight_sharing: one d_N-wide table per field, candidate n reads its first d_n columns;
    # separate: one table per candidate per field.
    lookup: Lookup = "weight_sharing"
    # linear: candidate -> d_N by its own linear transform; zero_pad: pad with zeros to d_N.
    unify: Unify = "linear"
    batchnorm: bool = True  # BatchNorm after unifying, so candidates' magnitudes are comparable
    alpha_every: int = 10  # f: one architecture step per f model steps (bi-level mode)
    pretrain_steps: int = 0  # model steps with the architecture weights held equal
    single_level: bool = False  # AutoDim-s: architecture and model weights on the same train batch
    tau_start: float = 1.0  # Gumbel-softmax temperature tau = max(tau_min, tau_start - tau_decay * t)
    tau_decay: float = 5e-5  # per model step t
    tau_min: float = 0.01  # the floor of tau
    alpha_optimizer: Literal["adam", "sgd"] = "adam"  # optimizer of the architecture weights alpha
    alpha_lr: float = 0.01  # its learning rate
    alpha_weight_decay: float = 0.0  # its weight decay
    # Not in the paper: the architecture loss adds width_cost x sum over fields of the expected
    # width E_softmax(alpha)[d_n] / d_N. Where every candidate from a field's rank up fits as well,
    # the validation loss cannot tell them apart; this term prefers the narrowest of them.
    width_cost: float = 0.0
    decisions: str | None = None  # where the decisions file goes; None = <output_dir>/decisions.json
    # Model steps between records of softmax(alpha) per field in <output_dir>/alpha_history.jsonl
    # (and one at the end), to see whether alpha settled; 0 = no record.
    history_every: int = 10

    def __post_init__(self) -> None:
        if len(self.candidates) < 2:
            raise ConfigError(f"candidates: need at least two widths to choose from, got {self.candidates}")
        if any(d < 1 for d in self.candidates):
            raise ConfigError(f"candidates: widths must be >= 1, got {self.candidates}")
        if list(self.candidates) != sorted(set(self.candidates)):
            raise ConfigError(f"candidates: must be strictly ascending, got {self.candidates}")
        if self.alpha_every < 1:
            raise ConfigError(f"alpha_every: must be >= 1, got {self.alpha_every}")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps: must be >= 0, got {self.pretrain_steps}")
        if not 0 < self.tau_min <= self.tau_start:
            raise ConfigError(f"tau_min: must be in (0, tau_start={self.tau_start}], got {self.tau_min}")
        if self.tau_decay < 0:
            raise ConfigError(f"tau_decay: must be >= 0, got {self.tau_decay}")
        if self.alpha_lr <= 0:
            raise ConfigError(f"alpha_lr: must be positive, got {self.alpha_lr}")
        if self.alpha_weight_decay < 0:
            raise ConfigError(f"alpha_weight_decay: must be >= 0, got {self.alpha_weight_decay}")
        if self.width_cost < 0:
            raise ConfigError(f"width_cost: must be >= 0, got {self.width_cost}")
        if self.history_every < 0:
            raise ConfigError(f"history_every: must be >= 0, got {self.history_every}")

    @property
    def max_dim(self) -> int:
        return self.candidates[-1]

    def temperature(self, step: int) -> float:
        """Gumbel-softmax temperature at model step `step` (the paper's linear decay, floored)."""
        return max(self.tau_min, self.tau_start - self.tau_decay * step)


MAX_LINGER_S = 86_400  # metrics.linger_seconds: a scrape interval is seconds, a day is ample


@dataclass
class MetricsConfig:
    """The `metrics:` section of an embshard config.

    enabled:   serve metrics at all.
    port_base: worker with local rank r serves on port_base + r; 0 = an ephemeral port each.
    bind:      address the HTTP server binds; 0.0.0.0 inside a pod so Prometheus can reach it.
    file_sd:   if set, rank 0 writes a Prometheus file-SD JSON file listing every worker
               here (e.g. outputs/file_sd/<job>.json, matched by deploy/prometheus.yml).
    linger_seconds: keep serving this long after training ends, so the last values are
               scraped (set it above the scrape interval when a job is short).
    """

    # Off unless asked for: one default whether or not the section is present.
    enabled: bool = False
    port_base: int = 9400
    bind: str = "127.0.0.1"
    file_sd: str | None = None
    linger_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled: expected true or false, got {self.enabled!r}")
        if isinstance(self.port_base, bool) or not isinstance(self.port_base, int):
            raise ConfigError(f"port_base: expected an integer, got {self.port_base!r}")
        if self.port_base != 0 and not 1024 <= self.port_base <= 65535 - 255:
            raise ConfigError(
                f"port_base: {self.port_base} out of range (0 for ephemeral ports, or "
                f"1024..{65535 - 255} so that port_base + local_rank stays a valid port)"
            )
        if not isinstance(self.bind, str) or not self.bind.strip() or any(c.isspace() for c in self.bind):
            raise ConfigError(f"bind: expected a host address such as 127.0.0.1, got {self.bind!r}")
        if not 0 <= self.linger_seconds <= MAX_LINGER_S:
            # 1e10 passed, and crashed the run once it had trained ("timestamp out of range").
            raise ConfigError(f"linger_seconds: must be from 0 to {MAX_LINGER_S:,} (a day), got {self.linger_seconds}")
        if self.file_sd is not None:
            if not isinstance(self.file_sd, str) or not self.file_sd.strip():
                raise ConfigError(f"file_sd: expected a file path or null, got {self.file_sd!r}")
            if not self.file_sd.endswith((".json", ".yml", ".yaml")):
                raise ConfigError(
                    f"file_sd: {self.file_sd!r} must end in .json, .yml or .yaml "
                    "(Prometheus file_sd only reads those)"
                )


# The largest batch a config may ask for (per worker): a bound of policy, far above what one
# device steps on (a 1e32 batch went on to a TorchRec placement failure that named no field).
MAX_BATCH_SIZE = 1 << 24


@dataclass
class DataConfig:
    path: str = "outputs/default/data"  # a dataset written by `embshard data synth|convert`
    batch_size: int = 2048  # per worker
    eval_batch_size: int = 8192  # per worker, for validation and test batches
    shuffle: bool = True  # reshuffle row groups and rows within them every epoch (seeded by seed)
    prefetch: int = 4  # batches assembled ahead on a background thread
    validate: bool = True  # check ids and dense values of every batch (cheap; vectorised)

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) > MAX_BATCH_SIZE:
                raise ConfigError(f"{name}: at most {MAX_BATCH_SIZE:,} rows a worker, got {getattr(self, name):,}")


# The widest MLP layer a config may ask for: a bound of policy, far above any recommendation MLP
# (MLPerf's DLRM tops out at 1024) and far below where torch's size arithmetic overflows while
# the plan counts the layers (2**62 did: the count was skipped, and the workers crashed).
MAX_LAYER_WIDTH = 1 << 24
# The deepest network a config may ask for, for the same reason: a cross net of 1,000,000 layers
# planned until it was killed, its memory growing.
MAX_LAYERS = 1024


def layers_problem(widths: list[int]) -> str | None:
    """Why `widths` are no MLP's hidden layers (None if they are)."""
    if len(widths) > MAX_LAYERS:
        return f"at most {MAX_LAYERS:,} layers, got {len(widths):,}"
    if any(not 1 <= w <= MAX_LAYER_WIDTH for w in widths):
        return f"layer widths must be 1 to {MAX_LAYER_WIDTH:,}, got {widths}"
    return None


@dataclass
class ModelConfig:
    # A built-in (dlrm, dlrm_dcn, two_tower, mf, fm) or a user's "package.module:attr" that every Ray
    # worker can import (trainer/models/ says what it may name).
    arch: str = "dlrm"
    options: dict[str, Any] = field(default_factory=dict)  # the arch's own keys; each arch checks its own
    # Hidden layers only: the dense arch always ends at the embedding base dim (DLRM's dot
    # interaction needs it) and the over arch always ends in one logit.
    dense_arch: list[int] = field(default_factory=lambda: [128, 64])  # bottom MLP over the dense features
    over_arch: list[int] = field(default_factory=lambda: [256, 128])  # top MLP over the feature interaction

    def __post_init__(self) -> None:
        for name in ("dense_arch", "over_arch"):
            problem = layers_problem(getattr(self, name))
            if problem:
                raise ConfigError(f"{name}: {problem}")


# The most memory a rank may be given: far above any device (a bound of policy), far below where
# the planner's byte counts overflow (1e300 GiB was an OverflowError traceback).
MAX_DEVICE_MEMORY_GB = 1 << 20


def device_memory_problem(gb: float | None) -> str | None:
    """Why `gb` is no rank's memory in GiB (None if it is, or is left to the device's default)."""
    if gb is not None and not (math.isfinite(gb) and 0 < gb <= MAX_DEVICE_MEMORY_GB):
        return f"must be a positive number of GiB up to {MAX_DEVICE_MEMORY_GB:,}, got {gb}"
    return None


@dataclass
class ShardingConfig:
    device: Literal["cpu", "cuda"] = "cpu"  # what the plan is for; decides the sharding types TorchRec may use
    device_memory_gb: float | None = None  # per rank; None = the device default
    sharding_types: list[str] | None = None  # restrict TorchRec's choice; None = all the device supports
    plan_file: str | None = None  # train on a plan written by `embshard plan` instead of planning
    # Ranks per host (GPUs per node); None = every rank on one host. TorchRec's cost model prices
    # traffic between hosts at inter-host bandwidth, and host-local types (table_row_wise) exist only then.
    local_world_size: int | None = None

    def __post_init__(self) -> None:
        if self.sharding_types is not None and not self.sharding_types:
            raise ConfigError("sharding_types: empty; list the types to allow, or leave it out for all the "
                              "device supports")
        if self.local_world_size is not None and self.local_world_size < 1:
            raise ConfigError(f"local_world_size: must be >= 1, got {self.local_world_size}")
        problem = device_memory_problem(self.device_memory_gb)
        if problem:
            # TopologySpec checks it too; here, as the config is read, the error names its section.
            raise ConfigError(f"device_memory_gb: {problem}")

    def topology(self, world_size: int, local_from: str = "sharding.local_world_size") -> TopologySpec:
        """`local_from`: where local_world_size was set, for the error (a flag, on the command line)."""
        from embshard.planner.topology import TopologySpec  # torchrec: only when planning

        lws = self.local_world_size
        if lws is not None and (lws > world_size or world_size % lws):
            raise ConfigError(f"{local_from}: {lws} ranks per host must divide the world size {world_size}")
        return TopologySpec(world_size=world_size, device=self.device, device_memory_gb=self.device_memory_gb,
                            local_world_size=lws)


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the train split
    max_steps: int | None = None  # stop early after this many steps (all epochs together)
    sparse_optimizer: SparseOptimizer = "rowwise_adagrad"  # fused into TorchRec's backward
    sparse_lr: float = 0.05  # learning rate of the fused sparse optimizer (embedding tables)
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"  # for the MLPs and MDE/MLET projections
    dense_lr: float = 1e-3  # learning rate of the dense optimizer
    # L2 weight decay of the dense optimizer (torch's `weight_decay`: added to the gradient). It
    # reaches every dense parameter, MDE's projections and MLET's W2 among them, not the tables,
    # which the fused sparse optimizer trains.
    dense_weight_decay: float = 0.0
    eval_every: int | None = None  # steps (and the last step); None = at the end of every epoch
    eval_max_batches: int | None = None  # cap evaluation work: batches per rank (None = the whole split)
    log_every: int = 50  # steps between loss lines in the log
    progress: bool = True  # tqdm bar on rank 0
    test: bool = False  # also evaluate the test split at the end (summary: test_auc, test_logloss)
    # Which evaluation the summary's valid_* and test_* figures are of. last: the model after the
    # last step. best_valid: the evaluation with the best primary validation metric (with
    # train.test, the test split is measured at each new best, so its figure is of a model chosen
    # on validation alone: early stopping's choice without stopping). Checkpoints and exports keep
    # the last step's weights either way; summary.json names the step in `selected_step`.
    report_at: Literal["last", "best_valid"] = "last"
    # How steps run. sparse_dist: TorchRec's TrainPipelineSparseDist (the next batch's ids travel
    # to their shards while this one trains; same result as none; use it on GPUs). semi_sync:
    # TrainPipelineSemiSync (cuda only; from step 900 on, lookups run one step early: not equal
    # to none). none: one batch at a time, the default because it measured fastest on CPU, where
    # nothing overlaps (bench/throughput.py). A method that cannot be pipelined trains as none.
    pipeline: PipelineKind = "none"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        for name in ("sparse_lr", "dense_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.dense_weight_decay < 0:
            raise ConfigError(f"dense_weight_decay: must be >= 0, got {self.dense_weight_decay}")
        for name in ("max_steps", "eval_every", "eval_max_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: must be >= 1, got {v}")
        if self.log_every < 1:
            raise ConfigError(f"log_every: must be >= 1, got {self.log_every}")


@dataclass
class CheckpointConfig:
    """Read by the checkpoint component (trainer/checkpoint.py documents the folder layout).

    A run always resumes from the newest good checkpoint in `dir` when there is one: that is how
    a restarted worker group (Ray Train's FailureConfig) continues, and why re-running a job
    into the same output_dir continues it. `resume` is used only while `dir` holds none that
    verifies.
    """

    enabled: bool = True  # false: no checkpoints are written or resumed
    dir: str | None = None  # None = <output_dir>/checkpoints; or an object-store URI (s3://bucket/prefix)
    every_steps: int | None = None  # None = only after the last step (and on SIGTERM)
    keep: int = 2  # the newest K complete checkpoints are kept
    on_sigterm: bool = True  # on SIGTERM or Ctrl-C: finish the step, checkpoint, stop cleanly
    resume: str | None = None  # a checkpoint dir or one step-NNNNNN folder of another run

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"every_steps: must be >= 1, got {self.every_steps}")
        if self.keep < 1:
            raise ConfigError(f"keep: must be >= 1, got {self.keep}")
        for name in ("dir", "resume"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                # An unset shell variable: `resume: ""` trained from scratch as if none were named.
                raise ConfigError(f"{name}: an empty path (leave it out for the default)")
        if self.resume is not None and not self.enabled:
            # It trained from scratch as if none were named.
            raise ConfigError(f"resume: {self.resume} is not resumed while checkpoint.enabled is false; "
                              "enable checkpoints, or leave resume out")


# The most ranks a job plans for and trains on: TorchRec's planner takes time in proportion to the
# ranks (8 s for 65,536 on one CPU core of the default config), so a typo's 100,000,000 planned for hours.
MAX_WORLD_SIZE = 65_536


@dataclass
class ClusterConfig:
    workers: int = 2  # Ray Train workers: the world size the job trains on
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker
    address: str | None = None  # None = start a local Ray in-process
    max_failures: int = 0  # worker-group restarts Ray Train may do
    # Seconds a rank waits for the others in one collective (an embedding all-to-all, a gradient
    # all-reduce, a checkpoint's gather, MLET's collapse) before it fails: a hung or stopped worker
    # then ends the run (or restarts the group, under max_failures) instead of holding it for good.
    # Longer than anything one rank does while the others wait: its checkpoint write or
    # verification, its part of an evaluation, PEP's mask writes, a reader's retries of object
    # storage, a slow start.
    collective_timeout_s: int = 1800
    storage: str | None = None  # Ray Train's run storage; None = <output_dir>/ray, or a URI (s3://bucket/ray)
    # Ray custom resources each worker reserves besides its CPUs (and its GPU on cuda). The Helm
    # chart sets {embshard_rank: 1} and gives each worker pod one per rank it holds, so no two pods'
    # ranks share a pod and none lands on the head. A local cluster is started with enough of them.
    worker_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU"):
                raise ConfigError(f"worker_resources.{name}: set cpus_per_worker, or sharding.device: cuda "
                                  "for one GPU per worker")
            if not amount > 0:
                raise ConfigError(f"worker_resources.{name}: must be positive, got {amount}")
        if not 1 <= self.workers <= MAX_WORLD_SIZE:
            raise ConfigError(f"workers: must be 1 to {MAX_WORLD_SIZE:,}, got {self.workers:,}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker: must be positive, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures: must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.collective_timeout_s < 1:
            raise ConfigError(f"collective_timeout_s: must be at least 1, got {self.collective_timeout_s}")


# What `embshard sweep` compares: each a method, "X+mlet" a method's plan trained with MLET; or a
# user's method as "package.module:attr" (a SweepMethod, cluster/sweep_methods.py), with MLET too.
SWEEP_METHODS = ("uniform", "mde", "mlet", "pep", "autodim", "mde+mlet", "pep+mlet", "autodim+mlet")


def check_methods(methods: list[str], where: str) -> None:
    """`where`: how the user named the list (`--methods`, or the config key). A reference is
    imported, and checked to be a SweepMethod, by the sweep (`sweep_method_named`)."""
    if not methods:
        raise ConfigError(f"{where}: empty; give some of " + ",".join(SWEEP_METHODS))
    for m in methods:
        if m not in SWEEP_METHODS and ":" not in m.removesuffix("+mlet"):
            raise ConfigError(f"{where}: unknown method {m!r} (known: {', '.join(SWEEP_METHODS)}; or a SweepMethod "
                              "of yours as package.module:attr)")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{where}: a method is named twice in {','.join(methods)}")


def check_budgets(budgets: list[float], where: str) -> None:
    if not budgets:
        raise ConfigError(f"{where}: empty; give fractions of the base model's serving parameters, e.g. 0.25,0.5,1")
    for b in budgets:
        if not 0 < b <= 1:
            raise ConfigError(f"{where}: {b:g} is outside (0, 1] (a fraction of the base model's serving parameters)")
    # As a trial names it: 0.5 and 0.50000000001 shared a trial folder, the second resuming the
    # first one's checkpoint.
    names = [budget_name(b) for b in budgets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a budget is named twice in {','.join(names)}")


def budget_name(budget: float) -> str:
    """A budget as a sweep's trial folders name it (6 significant digits)."""
    return f"{budget:g}"


@dataclass
class SweepConfig:
    """`embshard sweep`'s defaults; its --methods, --budgets, --seeds and --vary flags override them."""

    methods: list[str] = field(default_factory=lambda: ["uniform", "mde"])  # of SWEEP_METHODS, or package.module:attr
    # Fractions of the serving parameters of the uniform model at embeddings.dim, in (0, 1].
    budgets: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    seeds: int = 3  # seeds per method and budget: 0..seeds-1
    # Keys at several values ({embeddings.mde.alpha: [0.3, 1.0]}): a method's knob, each value a curve
    # of its own, or a setting (train.epochs), each value a report of its own; checked against the
    # methods by the sweep (cluster/sweep_plan.py: check_vary).
    vary: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_methods(self.methods, "methods")
        check_budgets(self.budgets, "budgets")
        self.budgets = sorted(self.budgets)
        if self.seeds < 1:
            raise ConfigError(f"seeds: must be >= 1, got {self.seeds}")


@dataclass
class JobConfig:
    name: str = "embshard"  # the `job` label on every metric; names the Ray Train run
    seed: int = 0  # model initialisation and data shuffling
    output_dir: str = "outputs/run"  # plan/, checkpoints/, summary.json and Ray logs go here
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its batches, read by the reader
    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture around the embeddings
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)  # the dimension policy (the planner)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # the topology and TorchRec shard plan
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop and its optimizers
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the Ray workers
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # DCP checkpoints and resuming
    pep: PepConfig | None = None  # read by the PEP methods (embshard prune pep, lottery retrain)
    autodim: AutodimConfig | None = None  # read by the AutoDim method (embshard search autodim)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read by `embshard sweep` only

    def __post_init__(self) -> None:
        if self.seed < 0:  # numpy's generators, which the reader seeds, take none
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.seed >= 2**64:  # torch.manual_seed takes 64 bits: a larger one overflowed in every worker
            raise ConfigError(f"seed: must be below 2**64, got {self.seed}")
        if not self.output_dir.strip():
            # An unset shell variable: the run's plan, checkpoints, logs and summary went into the
            # current folder, as checkpoint.dir's empty path is refused for.
            raise ConfigError("output_dir: an empty path (an unset shell variable?); name the run's folder")
        if "://" in self.output_dir:
            # The plan, summary, logs and the workers' restart and stop files are plain local files.
            raise ConfigError(f"output_dir: {self.output_dir!r} is a URI, but the run folder (plan, summary, "
                              f"logs) must be a local or shared folder; object storage goes in checkpoint.dir, "
                              f"data.path and cluster.storage")
        if self.train.sparse_optimizer not in CPU_SPARSE_OPTIMIZERS and self.sharding.device == "cpu":
            # Found out otherwise inside every worker, as FBGEMM's AssertionError and a "crash".
            raise ConfigError(f"train.sparse_optimizer: FBGEMM's fused {self.train.sparse_optimizer} runs on CUDA "
                              f"only; on CPU use {', '.join(CPU_SPARSE_OPTIMIZERS)}")
        if self.train.pipeline == "semi_sync" and self.sharding.device != "cuda":
            # TorchRec's semi-sync pipeline records CUDA streams on the batch's tensors.
            raise ConfigError(f"train.pipeline: semi_sync needs sharding.device cuda "
                              f"(got {self.sharding.device}); use sparse_dist or none")

    @property
    def plan_dir(self) -> Path:
        return Path(self.output_dir) / RUN_PLAN_DIR

    @property
    def checkpoint_dir(self) -> StoragePath:
        """A local Path, or a RemotePath for an object-store URI (checkpoint.dir: s3://...)."""
        from embshard.datasets.storage import location  # pyarrow.fs only once a checkpoint is near

        return location(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def pep_dir(self) -> Path:
        out = self.pep.out if self.pep is not None else None
        return Path(out or Path(self.output_dir) / "pep")


# Values that name a file or folder: `~` there is the home folder, as in a shell (`output_dir:
# ~/runs/x` was a folder named "~" in the working directory), and a relative one is relative to
# where the command ran, not to where a worker or a Tune trial runs (`with_paths_resolved`).
PATH_FIELDS = ("data.path", "output_dir", "checkpoint.dir", "checkpoint.resume", "sharding.plan_file",
               "embeddings.decisions", "autodim.decisions", "pep.out", "pep.retrain_from", "metrics.file_sd",
               "cluster.storage")


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    return with_home_expanded(load_yaml(JobConfig, path, overrides))


def with_home_expanded(cfg: JobConfig) -> JobConfig:
    """`cfg` with `~` in its PATH_FIELDS expanded."""
    return _with_paths(cfg, os.path.expanduser)


def with_paths_resolved(cfg: JobConfig) -> JobConfig:
    """`cfg` with every local path of its PATH_FIELDS absolute (URIs as they are): for processes
    that run elsewhere (Ray's workers, Tune's trials in their own folders, other hosts on shared
    storage)."""
    from embshard.datasets.storage import location  # pyarrow.fs only where a run is near

    return _with_paths(cfg, lambda value: str(location(value).resolve()))


def path_values(cfg: JobConfig) -> list[str]:
    """The paths cfg names (its PATH_FIELDS that are set), as written."""
    return [value for dotted in PATH_FIELDS if (value := _path_value(cfg, dotted))]


def _with_paths(cfg: JobConfig, change: Callable[[str], str]) -> JobConfig:
    for dotted in PATH_FIELDS:
        value = _path_value(cfg, dotted)
        if value:
            section, _, name = dotted.rpartition(".")
            changed = {name: change(value)}
            cfg = replace(cfg, **({section: replace(getattr(cfg, section), **changed)} if section else changed))
    return cfg


def _path_value(cfg: JobConfig, dotted: str) -> str | None:
    section, _, name = dotted.rpartition(".")
    holder = getattr(cfg, section) if section else cfg
    value = getattr(holder, name) if holder is not None else None
    return value if isinstance(value, str) and value else None


def current_schema(saved: dict[str, Any]) -> dict[str, Any]:
    """A job config recorded earlier (in a checkpoint, a sweep's spec or report) read through
    today's schema (fields added since it was written take their defaults). One it cannot read
    whole (a key retired or renamed since) keeps the keys today's schema knows, the rest at their
    defaults: read as it was, a retired key was "a difference" from every config of today, which
    no command could mend."""
    try:
        return to_dict(from_dict(JobConfig, saved))
    except ConfigError:
        pass
    today = flatten(to_dict(JobConfig()))
    # Below a free-form mapping (model.options) or an optional section left unset (pep), any key;
    # a section given as no mapping (`embeddings: wide`) is kept, for its reader to refuse.
    open_keys = [k for k, v in today.items() if v is None or v == {}]
    known = {k: v for k, v in flatten(saved).items() if k in today or any(t.startswith(f"{k}.") for t in today)
             or any(k.startswith(f"{o}.") for o in open_keys)}
    defaults = {k: v for k, v in today.items()
                if not any(c.startswith(f"{k}.") or k.startswith(f"{c}.") for c in known)}
    return unflatten(defaults | known)
