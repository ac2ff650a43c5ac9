"""`dlrm`: DLRM from TorchRec's building blocks, over the method's embedding module instead of a
bare EmbeddingBagCollection, so every dimension plan (uniform, MDE, AutoDim, PEP, MLET) trains with
the same dense and interaction arches. Its dot interaction needs every feature at one width."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, choose
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.config import MLET_INIT_STD, JobConfig, ModelConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.sharding.planned_embedding import PlannedEmbeddingBags
from embshard.trainer.models.arch import ModelArch


def check_over_arch(arch: ModelArch, cfg: ModelConfig) -> None:
    """TorchRec's OverArch takes no fewer than two layers, the logit one of them: `over_arch: []`
    was its ValueError as a traceback."""
    if not cfg.over_arch:
        raise ConfigError(f"model.over_arch: model.arch {arch.name!r} needs at least one hidden layer, got []")


class DlrmArch(ModelArch):
    """`model.dense_arch` and `model.over_arch` are its hidden layers; it takes no options."""

    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        super().check(cfg, spec)
        check_over_arch(self, cfg.model)

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        return DLRM(embeddings, len(spec.dense), cfg, dense_device=device)


class DLRM(nn.Module):
    """`embeddings`: the run's embedding module (a method builds it, `trainer/method.py`); it maps
    a KeyedJaggedTensor to a KeyedTensor at `base_dim` per feature and names `feature_names`."""

    def __init__(
        self,
        embeddings: EmbeddingModule,
        num_dense: int,
        config: ModelConfig,
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.feature_names = list(embeddings.feature_names)
        d = embeddings.base_dim
        f = len(self.feature_names)
        self.num_dense = num_dense
        # Without dense features the dense arch learns a bias vector in embedding space from a
        # constant 1 (`dense_input`), and the interaction stays DLRM's.
        self.dense_arch = DenseArch(max(num_dense, 1), [*config.dense_arch, d], device=dense_device)
        self.interaction = InteractionArch(num_sparse_features=f)
        self.over_arch = OverArch(d + choose(f, 2) + f, [*config.over_arch, 1], device=dense_device)

    @staticmethod
    def planned(
        plan: DimensionPlan,
        num_dense: int,
        config: ModelConfig,
        embedding_device: torch.device | None = None,
        dense_device: torch.device | None = None,
        mlet_init_std: float = MLET_INIT_STD,
    ) -> "DLRM":
        """DLRM over `PlannedEmbeddingBags(plan)`: how a plan's blocks train and serve."""
        embeddings = PlannedEmbeddingBags(plan, device=embedding_device, mlet_init_std=mlet_init_std)
        return DLRM(embeddings, num_dense, config, dense_device=dense_device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """-> logits [B]"""
        embedded = embedded_in_order(self.embeddings, sparse, self.feature_names)
        sparse_t = embedded.reshape(-1, len(self.feature_names), self.embeddings.base_dim)
        dense_t = self.dense_arch(dense_input(dense, sparse, self.num_dense))
        return self.over_arch(self.interaction(dense_t, sparse_t)).squeeze(-1)


def dense_input(dense: torch.Tensor, sparse: KeyedJaggedTensor, num_dense: int) -> torch.Tensor:
    """What the dense arch reads: a constant 1 for datasets without dense features (MovieLens,
    Avazu), so it learns a bias vector instead."""
    return torch.ones(sparse.stride(), 1, device=dense.device) if num_dense == 0 else dense


def embedded_in_order(embeddings: EmbeddingModule, sparse: KeyedJaggedTensor, names: list[str]) -> torch.Tensor:
    """[B, sum of widths]: the features' pooled embeddings side by side in the order of `names`
    (a sharded collection may return its keys in another order)."""
    return in_feature_order(embeddings(sparse), names).values()


@torch.fx.wrap
def in_feature_order(kt: KeyedTensor, names: list[str]) -> KeyedTensor:
    # Wrapped: one node in the trace TorchRec's train pipeline makes (a key test is control flow).
    if kt.keys() == names:
        return kt
    d = kt.to_dict()
    return KeyedTensor.from_tensor_list(names, [d[n] for n in names])
