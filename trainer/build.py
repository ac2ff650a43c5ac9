"""The one model builder: method + arch + DimensionPlan + shard plan -> `DistributedModelParallel`
over a `TrainModel` + optimizers, for every method (`trainer/method.py` says what each may change)
and every architecture (`trainer/models/`).

Embedding tables are built on the meta device and materialised by TorchRec directly as shards, so
no rank ever allocates a table it does not hold. The sparse optimizer is fused into TorchRec's
backward (`apply_optimizer_in_backward`); dense parameters get an ordinary optimizer, a method's
own parameter groups theirs, and all step through one `CombinedOptimizer`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embshard.config import JobConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError, EmbshardError, PlanError, first_line
from embshard.planner.memory import projection_elements
from embshard.planner.optimizers import BYTES_PER_ELEMENT, torch_optimizer_class
from embshard.planner.pipeline import PlanBundle
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.method import EmbeddingMethod, get_method, method_name, module_path
from embshard.trainer.models import ModelArch, TrainModel, build_model, get_arch
from embshard.trainer.models.arch import ModelBuildFailed
from embshard.trainer.reference import raised_at

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DenseOptimizer:
    # Called as (params, lr=..., weight_decay=...): each takes its own further arguments, so not
    # `type[Optimizer]`.
    make: Callable[..., torch.optim.Optimizer]
    # Elements of state per parameter element, as `make` keeps it: what the plan counts.
    state_elements: int


DENSE_OPTIMIZERS = {
    "adam": DenseOptimizer(torch.optim.Adam, 2),  # two moments
    "adagrad": DenseOptimizer(torch.optim.Adagrad, 1),  # a sum of squares
    "sgd": DenseOptimizer(torch.optim.SGD, 0),  # no momentum
}


def dense_layer_bytes(cfg: JobConfig, plan: DimensionPlan, spec: DatasetSpec, method: str | None = None) -> int | None:
    """Bytes every rank holds for the model's layers outside its embedding module (MLPs, an FM's
    per-id linear terms): weights, gradients and the dense optimizer's state, and the buffers a
    model registers, counted on a copy built on the meta device, as `build_sharded` builds it, so
    nothing is allocated. A `model.dense_arch` no device holds was a worker's "crashed: can't
    allocate" line. None: the arch's model cannot be built here on the meta device (a user's
    builder that reads values, checks the device it is given, or asks for a GPU this driver may
    lack). A build that fails on a bug of its own (a KeyError, an AttributeError, ...) fails here,
    on the driver, as it would on every worker once Ray had started."""
    name = method or method_name(cfg)
    embedding_method = get_method(name)
    arch = get_arch(cfg.model)
    meta = torch.device("meta")
    try:
        with meta:
            embeddings = embedding_method.embeddings(cfg, plan, spec, meta)
    except PlanError as e:  # the plan the method gave is not one its module builds
        if str(e).startswith(f"method {name!r}"):  # a user's module that names itself
            raise
        raise PlanError(f"method {name!r}: embeddings(): {e}") from None
    except EmbshardError:
        raise
    except Exception as e:
        if not _a_bug_anywhere(e):
            _not_counted(f"method {name!r}'s embedding module", e)
            return None
        raise ConfigError(f"method {name!r}: embeddings() raised {first_line(e)}{raised_at(e)}") from None
    try:
        with meta:
            model = build_model(arch, embeddings, spec, cfg.model, meta)
    except ModelBuildFailed as e:
        if e.__cause__ is not None and _a_bug_anywhere(e.__cause__):
            raise
        _not_counted(f"model.arch {arch.name!r}", e.__cause__ or e)
        return None
    check_model_holds(arch, model, embeddings)
    params, buffers = dense_layers(model, embedding_method.collections(embeddings))
    weights = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)  # each with a gradient and the optimizer's state
    held = (weights + trained * (1 + DENSE_OPTIMIZERS[cfg.train.dense_optimizer].state_elements)) * BYTES_PER_ELEMENT
    # The plan counts its projections' weights in every rank's train bytes already: taken off here.
    # A user's module that builds fewer than its plan counts would have bytes taken off that `held`
    # never had: never below zero.
    return max(0, held - projection_elements(plan)[0] * BYTES_PER_ELEMENT) + sum(
        b.numel() * b.element_size() for b in buffers)


def check_model_holds(arch: ModelArch, model: nn.Module, embeddings: nn.Module) -> None:
    """ConfigError unless `model` holds the embedding module it was given, and no TorchRec
    collection besides: the driver checks its build on meta, each worker its own."""
    if not any(m is embeddings for m in model.modules()):
        raise ConfigError(f"model.arch {arch.name!r}: the model does not hold the embedding module it was "
                          "given (DMP shards the tables only where they sit in the model)")
    planned = {id(m) for m in embeddings.modules()}
    stray = [name for name, m in model.named_modules()
             if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) and id(m) not in planned]
    if stray:
        # Trained, its tables were replicated on every rank as data-parallel (on CPU they never
        # update), and an export left them on the meta device they were built on.
        raise ConfigError(f"model.arch {arch.name!r}: the model holds a TorchRec collection of its own "
                          f"({stray[0]!r}), outside the embedding module it was given, which embshard neither "
                          "plans nor shards; make its features the dataset's, so their tables are planned")


# What a build raises on a bug of its own, wherever it runs. Anything else (an AssertionError or
# RuntimeError of torch's: no CUDA on this driver, a device check) may pass on the workers.
_BUGS = (KeyError, IndexError, AttributeError, NameError, TypeError, ValueError, ZeroDivisionError)
_META = re.compile(r"\bmeta\b", re.IGNORECASE)


def _a_bug_anywhere(e: BaseException) -> bool:
    """Whether `e` would end the build on every worker too: a bug's type, and not the meta
    device's own error (a value read from a tensor that holds none, which torch says of "meta")."""
    return isinstance(e, _BUGS) and not _META.search(str(e))


def _not_counted(what: str, e: BaseException) -> None:
    log.warning("dense layers not counted in the memory report: %s cannot be built on the meta device here (%s)",
                what, first_line(e))


def dense_layers(model: nn.Module, collections: list[nn.Module]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The parameters and buffers of `model` outside the method's TorchRec `collections` (its
    tables): its dense layers and its embedding module's own (MDE's projections, MLET's W2), which
    every rank holds whole, whatever the shard plan, and the dense optimizer (or a method's own)
    trains."""
    own = {id(t) for m in collections for t in [*m.parameters(), *m.buffers()]}
    return ([p for p in model.parameters() if id(p) not in own],
            [b for b in model.buffers() if id(b) not in own])


def dense_optimizer(cfg: JobConfig, params: dict[str, nn.Parameter]) -> KeyedOptimizerWrapper:
    """The dense parameters' optimizer as `train:` configures it."""
    train = cfg.train
    return KeyedOptimizerWrapper(params, lambda ps: DENSE_OPTIMIZERS[train.dense_optimizer].make(
        ps, lr=train.dense_lr, weight_decay=train.dense_weight_decay))


@dataclass
class ShardedModel:
    model: DistributedModelParallel  # over a TrainModel: batch -> (loss, output)
    optimizer: CombinedOptimizer
    bundle: PlanBundle
    method: EmbeddingMethod
    arch: ModelArch
    embeddings: EmbeddingModule  # the method's module inside `model` (DMP shards it in place)


def build_unsharded(cfg: JobConfig, bundle: PlanBundle, spec: DatasetSpec, device: torch.device,
                    method: EmbeddingMethod | None = None) -> TrainModel:
    """The same model on one device with real weights: the reference the sharded model must equal."""
    method = method or get_method(method_name(cfg))
    arch = get_arch(cfg.model)
    torch.manual_seed(cfg.seed)
    embeddings = method.embeddings(cfg, bundle.dimension_plan, spec, device)
    return TrainModel(arch, build_model(arch, embeddings, spec, cfg.model, device))


def build_sharded(
    cfg: JobConfig,
    bundle: PlanBundle,
    spec: DatasetSpec,
    device: torch.device,
    init_from: nn.Module | None = None,
    method: EmbeddingMethod | None = None,
) -> ShardedModel:
    """`method`: the run's method (default: the one `cfg` names); `init_from`: an unsharded model
    whose weights the shards copy (tests compare against it)."""
    method = method or get_method(method_name(cfg))
    arch = get_arch(cfg.model)
    torch.manual_seed(cfg.seed)  # dense init is identical on every rank; DDP also syncs it
    embeddings = method.embeddings(cfg, bundle.dimension_plan, spec, torch.device("meta"))
    if arch.uniform_width and any(d != embeddings.base_dim for d in embeddings.feature_dims.values()):
        raise ConfigError(f"model.arch {arch.name!r} takes every feature at embeddings.dim, but the plan gives "
                          "features their own widths (made for another arch): plan again for this one")
    model = TrainModel(arch, build_model(arch, embeddings, spec, cfg.model, device))
    check_model_holds(arch, model, embeddings)
    sparse = torch_optimizer_class(cfg.train.sparse_optimizer)
    for collection in method.collections(embeddings):
        apply_optimizer_in_backward(sparse, collection.parameters(), method.sparse_optimizer_args(cfg))
    sharders = method.sharders()
    # The method names its parameters within its embedding module, wherever the arch put it.
    prefix = module_path(model, embeddings)
    ddp_ignored = [f"{prefix}.{name}" for name in method.ddp_ignored()]
    dmp = DistributedModelParallel(
        model,
        device=device,
        plan=method.sharding_plan(cfg, bundle, model, embeddings, sharders),
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=ddp_ignored),
    )
    if init_from is not None:
        result = dmp.load_state_dict(init_from.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"init_from does not match the sharded model: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    groups = method.param_groups(cfg, params)  # takes the parameters it owns out of `params`
    # A model whose every parameter is an embedding's has none for the dense optimizer, which
    # torch refuses to make ("optimizer got an empty parameter list").
    dense = [dense_optimizer(cfg, params)] if params else []
    optimizer = CombinedOptimizer([dmp.fused_optimizer, *dense, *groups])
    sharded = ShardedModel(dmp, optimizer, bundle, method, arch, embeddings)
    method.initialise(cfg, sharded)
    return sharded
