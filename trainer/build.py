"""The one model builder: method + DimensionPlan + shard plan -> `DistributedModelParallel` DLRM
+ optimizers, for every method (`trainer/method.py` says what each may change).

Embedding tables are built on the meta device and materialised by TorchRec directly as shards, so
no rank ever allocates a table it does not hold. The sparse optimizer is fused into TorchRec's
backward (`apply_optimizer_in_backward`); dense parameters get an ordinary optimizer, a method's
own parameter groups theirs, and all step through one `CombinedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embshard.config import JobConfig
from embshard.planner.optimizers import torch_optimizer_class
from embshard.planner.pipeline import PlanBundle
from embshard.trainer.method import EmbeddingMethod, get_method, method_name
from embshard.trainer.model import DLRM

# Called as (params, lr=...): each takes its own further arguments, so not `type[Optimizer]`.
DENSE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    bundle: PlanBundle
    method: EmbeddingMethod


def build_unsharded(cfg: JobConfig, bundle: PlanBundle, num_dense: int, device: torch.device,
                    method: EmbeddingMethod | None = None) -> DLRM:
    """The same model on one device with real weights: the reference the sharded model must equal."""
    method = method or get_method(method_name(cfg))
    torch.manual_seed(cfg.seed)
    return DLRM(method.embeddings(cfg, bundle.dimension_plan, device), num_dense, cfg.model, dense_device=device)


def build_sharded(
    cfg: JobConfig,
    bundle: PlanBundle,
    num_dense: int,
    device: torch.device,
    init_from: nn.Module | None = None,
    method: EmbeddingMethod | None = None,
) -> ShardedModel:
    """`method`: the run's method (default: the one `cfg` names); `init_from`: an unsharded model
    whose weights the shards copy (tests compare against it)."""
    method = method or get_method(method_name(cfg))
    torch.manual_seed(cfg.seed)  # dense init is identical on every rank; DDP also syncs it
    embeddings = method.embeddings(cfg, bundle.dimension_plan, torch.device("meta"))
    model = DLRM(embeddings, num_dense, cfg.model, dense_device=device)
    sparse = torch_optimizer_class(cfg.train.sparse_optimizer)
    for collection in method.collections(embeddings):
        apply_optimizer_in_backward(sparse, collection.parameters(), method.sparse_optimizer_args(cfg))
    sharders = method.sharders()
    dmp = DistributedModelParallel(
        model,
        device=device,
        plan=method.sharding_plan(cfg, bundle, model, sharders),
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=method.ddp_ignored()),
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
    dense = KeyedOptimizerWrapper(
        params, lambda ps: DENSE_OPTIMIZERS[cfg.train.dense_optimizer](ps, lr=cfg.train.dense_lr)
    )
    sharded = ShardedModel(dmp, CombinedOptimizer([dmp.fused_optimizer, dense, *groups]), bundle, method)
    method.initialise(cfg, sharded)
    return sharded
