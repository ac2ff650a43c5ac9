"""Model assembly: DimensionPlan + shard plan -> `DistributedModelParallel` DLRM + optimizers.

Embedding tables are built on the meta device and materialised by TorchRec directly as shards, so
no rank ever allocates a table it does not hold. The sparse optimizer is fused into TorchRec's
backward (`apply_optimizer_in_backward`); dense parameters get an ordinary optimizer, and both
step through one `CombinedOptimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embshard.config import MLET_INIT_STD
from embshard.planner.optimizers import torch_optimizer_class
from embshard.planner.pipeline import PlanBundle
from embshard.config import JobConfig
from embshard.trainer.model import DLRM

DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    bundle: PlanBundle


def build_unsharded(cfg: JobConfig, bundle: PlanBundle, num_dense: int, device: torch.device) -> DLRM:
    """The same model on one device with real weights: the reference the sharded model must equal."""
    torch.manual_seed(cfg.seed)
    return DLRM(bundle.dimension_plan, num_dense, cfg.model, embedding_device=device, dense_device=device,
                mlet_init_std=_mlet_init_std(cfg))


def build_sharded(
    cfg: JobConfig,
    bundle: PlanBundle,
    num_dense: int,
    device: torch.device,
    init_from: nn.Module | None = None,
) -> ShardedModel:
    """`init_from`: an unsharded model whose weights the shards copy (tests compare against it)."""
    torch.manual_seed(cfg.seed)  # dense init is identical on every rank; DDP also syncs it
    model = DLRM(
        bundle.dimension_plan,
        num_dense,
        cfg.model,
        embedding_device=torch.device("meta"),
        dense_device=device,
        mlet_init_std=_mlet_init_std(cfg),
    )
    dmp = shard_model(cfg, bundle, model, device)
    if init_from is not None:
        result = dmp.load_state_dict(init_from.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"init_from does not match the sharded model: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: DENSE_OPTIMIZERS[cfg.train.dense_optimizer](params, lr=cfg.train.dense_lr),
    )
    return ShardedModel(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), bundle)


def shard_model(
    cfg: JobConfig,
    bundle: PlanBundle,
    model: DLRM,
    device: torch.device,
    params_to_ignore: list[str] | None = None,
) -> DistributedModelParallel:
    """Fuse the sparse optimizer into the tables' backward and shard them under the bundle's plan.
    `params_to_ignore`: dense parameters DDP must leave alone (e.g. AutoDim's alpha)."""
    apply_optimizer_in_backward(
        torch_optimizer_class(cfg.train.sparse_optimizer),
        model.embeddings.ebc.parameters(),
        {"lr": cfg.train.sparse_lr},
    )
    return DistributedModelParallel(
        model,
        device=device,
        plan=bundle.shard_plan.to_torchrec(ebc_path(model)),
        sharders=[EmbeddingBagCollectionSharder()],
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=params_to_ignore or []),
    )


def _mlet_init_std(cfg: JobConfig) -> float:
    return cfg.embeddings.mlet.init_std if cfg.embeddings.mlet is not None else MLET_INIT_STD


def ebc_path(model: DLRM) -> str:
    """Fully qualified name of the embedding collection: the key of its entry in the ShardingPlan."""
    target = model.embeddings.ebc
    return next(name for name, m in model.named_modules() if m is target)
