"""The job config: one typed object is the single source of every knob.

YAML files in `configs/` are validated into `JobConfig` by `embshard.typed_config`; an error names
the field (`train.batch_size: expected an integer, got 'abc'`). Each section is read by exactly one
component: `data` by the reader, `model` by the model builder, `embeddings` by the planner,
`sharding` by the shard planner, `train` by the loop, `metrics`/`checkpoint` by their components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embshard.errors import ConfigError
from embshard.planner.config import EmbeddingsConfig
from embshard.planner.optimizers import SparseOptimizer
from embshard.planner.topology import TopologySpec
from embshard.trainer.autodim_config import AutodimConfig
from embshard.trainer.metrics import MetricsConfig
from embshard.trainer.pep_config import PepConfig
from embshard.typed_config import load_yaml


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


@dataclass
class ModelConfig:
    # Hidden layers only: the dense arch always ends at the embedding base dim (DLRM's dot
    # interaction needs it) and the over arch always ends in one logit.
    dense_arch: list[int] = field(default_factory=lambda: [128, 64])  # bottom MLP over the dense features
    over_arch: list[int] = field(default_factory=lambda: [256, 128])  # top MLP over the feature interaction

    def __post_init__(self) -> None:
        for name in ("dense_arch", "over_arch"):
            if any(w < 1 for w in getattr(self, name)):
                raise ConfigError(f"{name}: layer widths must be >= 1, got {getattr(self, name)}")


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
        if self.local_world_size is not None and self.local_world_size < 1:
            raise ConfigError(f"local_world_size: must be >= 1, got {self.local_world_size}")

    def topology(self, world_size: int) -> TopologySpec:
        lws = self.local_world_size
        if lws is not None and (lws > world_size or world_size % lws):
            raise ConfigError(
                f"sharding.local_world_size: {lws} ranks per host must divide the world size {world_size}"
            )
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
    eval_every: int | None = None  # steps; None = at the end of every epoch
    eval_max_batches: int | None = None  # cap evaluation work (None = the whole split)
    log_every: int = 50  # steps between loss lines in the log
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        for name in ("sparse_lr", "dense_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
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
    into the same output_dir continues it. `resume` is used only while `dir` holds none.
    """

    enabled: bool = True  # false: no checkpoints are written or resumed
    dir: str | None = None  # None = <output_dir>/checkpoints
    every_steps: int | None = None  # None = only at the end (and on SIGTERM)
    keep: int = 2  # the newest K complete checkpoints are kept
    on_sigterm: bool = True  # on SIGTERM or Ctrl-C: finish the step, checkpoint, stop cleanly
    resume: str | None = None  # a checkpoint dir or one step-NNNNNN folder of another run

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"every_steps: must be >= 1, got {self.every_steps}")
        if self.keep < 1:
            raise ConfigError(f"keep: must be >= 1, got {self.keep}")


@dataclass
class ClusterConfig:
    workers: int = 2  # Ray Train workers: the world size the job trains on
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker
    address: str | None = None  # None = start a local Ray in-process
    max_failures: int = 0  # worker-group restarts Ray Train may do

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker: must be positive, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures: must be >= -1 (-1 = unlimited), got {self.max_failures}")


@dataclass
class JobConfig:
    name: str = "embshard"  # the `job` label on every metric; names the Ray Train run
    seed: int = 0  # model initialisation and data shuffling
    output_dir: str = "outputs/run"  # plan/, checkpoints/, summary.json and Ray logs go here
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its batches, read by the reader
    model: ModelConfig = field(default_factory=ModelConfig)  # the DLRM around the embeddings
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)  # the dimension policy (the planner)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # the topology and TorchRec shard plan
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop and its optimizers
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(enabled=False))  # Prometheus; off
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the Ray workers
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # DCP checkpoints and resuming
    pep: PepConfig | None = None  # read by trainer/pep.py (embshard prune pep, lottery retrain)
    autodim: AutodimConfig | None = None  # read by trainer/autodim.py (embshard search autodim)

    @property
    def plan_dir(self) -> Path:
        return Path(self.output_dir) / "plan"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def pep_dir(self) -> Path:
        out = self.pep.out if self.pep is not None else None
        return Path(out or Path(self.output_dir) / "pep")


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    return load_yaml(JobConfig, path, overrides)
