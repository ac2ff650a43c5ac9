"""The method seam: every part a dimension method may change, and nothing else.

uniform, MDE, decisions (with MLET on any of them), PEP's prune run and lottery retrain, AutoDim's
search and any later method are `EmbeddingMethod`s registered by name. The planner driver
(`cluster/launch.py`), the one model builder (`trainer/build.py`) and the one training loop
(`trainer/loop.py`) call these parts and never ask which method they hold; in torchtitan's terms
this is the TrainSpec, in TorchRec's the pieces `DistributedModelParallel` takes.

    check_config            what the method needs of the config, checked before any data is read
    dimension_plan          config + dataset -> the DimensionPlan it trains (planner/ policies);
                            the driver shards it and saves both as the run's plan.json
    embeddings              the embedding module over TorchRec collections, built on meta
    collections / sharders  what DMP shards, with which sharders and under which plan
    sparse_optimizer_args   the fused optimizer's arguments for those collections
    param_groups            optimizers for dense parameters the method owns
    ddp_ignored             dense parameters DDP must leave alone
    initialise              the values the sharded model starts from
    callbacks               what runs in the loop (AutoDim's alpha step, PEP's mask writer, ...)
    unpipelined_because     why the run cannot train through TorchRec's train pipeline (None: it can)
    checkpoint_transforms   what a checkpoint holds (MLET's collapse to n x d)

The base class is the planned path every method starts from: `PlannedEmbeddingBags` over one
EmbeddingBagCollection, sharded exactly as plan.json says, MLET hooks on checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.keyed import KeyedOptimizer

from embshard.config import JobConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.planner.pipeline import PlanBundle
from embshard.planner.policies import plan_widths
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.sharding.mlet import mlet_after_load, mlet_before_save, mlet_load_template
from embshard.sharding.planned_embedding import PlannedEmbeddingBags
from embshard.trainer.checkpoint import StateTransform
from embshard.trainer.reference import call_text, callable_as, colon_hint, import_reference, instance_of

if TYPE_CHECKING:
    from embshard.trainer.build import ShardedModel
    from embshard.trainer.callbacks import Callback
    from embshard.trainer.metrics import WorkerMetrics


@dataclass(frozen=True)
class Worker:
    """What a method's callbacks may need about the worker they run in."""

    cfg: JobConfig
    bundle: PlanBundle
    rank: int
    world: int
    device: torch.device
    metrics: WorkerMetrics | None
    resumed_at: int = 0  # the step this start resumed from (0: a start from scratch)


@dataclass
class CheckpointTransforms:
    """`CheckpointManager`'s state-dict transforms (see trainer/checkpoint.py)."""

    before_save: list[StateTransform] = field(default_factory=list)
    before_load: list[StateTransform] = field(default_factory=list)
    after_load: list[StateTransform] = field(default_factory=list)


class EmbeddingMethod:
    """A method's parts; the defaults are the planned path (see the module docstring)."""

    # Whether `embeddings` can give each feature its own width when the arch takes that
    # (`ModelArch.uniform_width` false); a module that gives every feature the base dim says no.
    mixed_widths: bool = True
    # Whether `embeddings` takes each of its plan's tables at the table's own width and unifies them
    # itself (AutoDim's search: its transforms are dense layers of the model): the plan says which of
    # its tables it projects (`DimensionPlan.uniform_width`), not the arch.
    unifies_widths: bool = False
    # Whether the model it trains is one to serve; a method that decides a plan (a search, a prune
    # run) says no, and `embshard export` refuses its checkpoints.
    serves: bool = True
    # Whether `dimension_plan` gives the same plan from the same config and data. A resume asks a
    # method of the user's own again, and refuses one whose plan changed (its code changed since);
    # a method that samples its widths says no, and resumes its checkpoint's plan unasked.
    replans_alike: bool = True
    # Config keys besides the model-defining ones (`trainer/resume_config.py`) that a resume must
    # keep: those the method's progress is counted by.
    resume_keys: tuple[str, ...] = ()

    def check_config(self, cfg: JobConfig) -> None:
        """Raise ConfigError for a config this method cannot run (the driver calls it first)."""

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        """The widths this run trains: `embeddings.policy`'s. The planning step puts `embeddings.mlet`
        on every block the plan leaves unfactorised, whatever the method."""
        return plan_widths(cfg.embeddings, spec, counts, out_dir)

    def embeddings(self, cfg: JobConfig, plan: DimensionPlan, spec: DatasetSpec,
                   device: torch.device) -> EmbeddingModule:
        """The embedding module over `plan`'s tables, for the dataset `spec` describes, on `device`
        (meta, where DMP materialises the shards)."""
        mlet = cfg.embeddings.mlet
        kwargs = {"mlet_init_std": mlet.init_std} if mlet is not None else {}
        return PlannedEmbeddingBags(plan, device=device, **kwargs)

    def collections(self, embeddings: EmbeddingModule) -> list[nn.Module]:
        """The TorchRec collections inside `embeddings`: the fused sparse optimizer trains them."""
        return [embeddings.get_submodule("ebc")]

    def sharders(self) -> list[ModuleSharder]:
        return [EmbeddingBagCollectionSharder()]

    def sharding_plan(self, cfg: JobConfig, bundle: PlanBundle, model: nn.Module, embeddings: EmbeddingModule,
                      sharders: list[ModuleSharder]) -> ShardingPlan:
        """The layout DMP builds: exactly the saved shard plan, at the collection's path in
        `model` (wherever the arch put `embeddings`)."""
        return bundle.shard_plan.to_torchrec(module_path(model, self.collections(embeddings)[0]))

    def sparse_optimizer_args(self, cfg: JobConfig) -> dict[str, Any]:
        return {"lr": cfg.train.sparse_lr}

    def ddp_ignored(self) -> list[str]:
        """Names within the embedding module (the builder prefixes its path in the model)."""
        return []

    def param_groups(self, cfg: JobConfig, dense: dict[str, nn.Parameter]) -> list[KeyedOptimizer]:
        """Optimizers for dense parameters this method owns; it pops them from `dense`, whose rest
        the dense optimizer (`train.dense_optimizer`) trains."""
        return []

    def initialise(self, cfg: JobConfig, sharded: ShardedModel) -> None:
        """Set the sharded model's starting values (after DMP materialised the shards)."""

    def callbacks(self, worker: Worker, sharded: ShardedModel) -> list[Callback]:
        return []

    def unpipelined_because(self, cfg: JobConfig) -> str | None:
        """Why this run cannot train through TorchRec's train pipeline (`train.pipeline`), or None.
        A pipeline serves only the batches it fetched: a method whose callbacks run the model on
        other batches between steps must train unpipelined."""
        return None

    def checkpoint_transforms(self, cfg: JobConfig, sharded: ShardedModel,
                              metrics: WorkerMetrics | None) -> CheckpointTransforms:
        """Checkpoints hold MLET tables collapsed to n x d (the hooks do nothing without MLET), and
        W1 too as training state when `mlet.exact_resume` is on."""
        model = sharded.model
        exact = cfg.embeddings.mlet is not None and cfg.embeddings.mlet.exact_resume
        timeout = timedelta(seconds=cfg.cluster.collective_timeout_s)
        return CheckpointTransforms(
            before_save=[partial(mlet_before_save, model, metrics=metrics, exact_resume=exact, timeout=timeout)],
            before_load=[partial(mlet_load_template, model, exact_resume=exact)],
            after_load=[partial(mlet_after_load, model, exact_resume=exact, timeout=timeout)],
        )


def module_path(model: nn.Module, target: nn.Module) -> str:
    """Fully qualified name of `target` in `model`: the key of its entry in a ShardingPlan."""
    return next(name for name, m in model.named_modules() if m is target)


def uniform_embeddings(cfg: JobConfig) -> JobConfig:
    """`cfg` planned as dense base-dim tables (what PEP prunes and AutoDim searches over)."""
    return replace(cfg, embeddings=replace(cfg.embeddings, policy="uniform", decisions=None, mlet=None))


def refuse_mlet(cfg: JobConfig, trains: str) -> None:
    """ConfigError for `embeddings.mlet` in a run whose method `trains` tables of its own: MLET
    would be dropped without a word (or, planned, refused as a plan that is not uniform)."""
    if cfg.embeddings.mlet is not None:
        raise ConfigError(f"embeddings.mlet: {trains}, which MLET does not factorise; remove it here, and train "
                          "the plan this run decides with MLET (the sweep's pep+mlet and autodim+mlet do)")


# ----------------------------------------------------------------------------- registry

# Built-in methods, imported on first use so that naming one loads only its own modules.
_BUILTIN = {
    "uniform": "embshard.trainer.method:EmbeddingMethod",
    "mde": "embshard.trainer.method:EmbeddingMethod",
    "decisions": "embshard.trainer.method:EmbeddingMethod",
    "pep": "embshard.trainer.pep:PepPrune",
    "pep_lottery": "embshard.trainer.pep:PepLottery",
    "autodim": "embshard.trainer.autodim:AutodimSearch",
}
_REGISTERED: dict[str, EmbeddingMethod] = {}


def register_method(name: str, method: EmbeddingMethod) -> None:
    """Make `method` available as `name` to `embshard` runs in this process."""
    if name in _BUILTIN:
        raise ConfigError(f"method {name!r}: a built-in method has that name")
    _REGISTERED[name] = _fits_the_seam(method, name)


def is_builtin(name: str) -> bool:
    return name in _BUILTIN


def registered_here(name: str) -> EmbeddingMethod | None:
    """The method `register_method` gave `name` in this process, if any: what a driver sends its
    Ray workers, which never ran that call."""
    return _REGISTERED.get(name)


def get_method(name: str) -> EmbeddingMethod:
    """A built-in or registered method by name, or a user's as "package.module:attr": a reference
    every Ray worker can import, where a `register_method` in the driver does not reach."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _imported(_BUILTIN[name], name)
    if ":" in name:
        return _imported(name, name)
    known = ", ".join(sorted([*_BUILTIN, *_REGISTERED]))
    raise ConfigError(f"method {name!r}: not registered (known: {known}; or give package.module:attr)"
                      f"{colon_hint(name)}")


def _imported(reference: str, name: str) -> EmbeddingMethod:
    method = instance_of(import_reference(reference, f"method {name!r}"), f"method {name!r}")
    if not isinstance(method, EmbeddingMethod):
        raise ConfigError(f"method {name!r}: {reference} is a {type(method).__name__}, not an EmbeddingMethod")
    return _fits_the_seam(method, name)


def _fits_the_seam(method: EmbeddingMethod, name: str) -> EmbeddingMethod:
    """`method`, refused in one line when its `embeddings` cannot take the seam's arguments: one
    written for the seam before `embeddings` took the dataset spec failed in every build as a
    TypeError."""
    if not callable_as(method.embeddings, 4):
        raise ConfigError(f"method {name!r}: {type(method).__name__}.{call_text(method.embeddings)} cannot take "
                          "the seam's (cfg, plan, spec, device): embeddings takes the dataset spec now (it "
                          "took (cfg, plan, device) before); add spec before device")
    return method


def method_name(cfg: JobConfig) -> str:
    """The method `embshard train` runs for `cfg`: a PEP lottery retrain when it names a prune
    run's target, else `embeddings.method` when set, else its dimension policy."""
    if cfg.pep is not None and cfg.pep.retrain_target is not None:
        return "pep_lottery"
    return cfg.embeddings.method or cfg.embeddings.policy
