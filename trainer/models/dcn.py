"""`dlrm_dcn`: DLRMv2 (MLPerf Training's DLRM-DCNv2, TorchRec's `DLRM_DCN`): the dense arch, then
DCN-v2 low-rank cross layers over the dense output concatenated with every feature's embedding,
then the over arch.

Unlike TorchRec's `DLRM_DCN`, whose `InteractionDCNArch` stacks features as B x F x D, the cross
net reads the flat concatenation, so each feature may arrive at its own width (`uniform_width`
false): MDE blocks keep their width and need no projection to a shared one. TorchRec's
`DenseArch`, `LowRankCrossNet` and `OverArch` do the work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.config import MAX_LAYER_WIDTH, MAX_LAYERS, JobConfig, ModelConfig
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.models.arch import ModelArch
from embshard.trainer.models.dlrm import check_over_arch, dense_input, embedded_in_order

# MLPerf's reference uses 3 layers of rank 512 over 27 x 128 inputs (r ~ N/7); 64 keeps that
# proportion for the CPU-sized widths this project tests with. Set model.options to change them.
DEFAULT_OPTIONS: dict[str, int] = {"dcn_num_layers": 3, "dcn_low_rank_dim": 64}


class DlrmDcnArch(ModelArch):
    """`model.dense_arch` / `model.over_arch` are the hidden layers; `model.options` takes
    `dcn_num_layers` and `dcn_low_rank_dim`."""

    uniform_width = False
    options = tuple(DEFAULT_OPTIONS)

    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        super().check(cfg, spec)
        check_over_arch(self, cfg.model)
        dcn_options(cfg.model)

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        return DlrmDcn(embeddings, len(spec.dense), cfg, dense_device=device)


def dcn_options(cfg: ModelConfig) -> dict[str, int]:
    """The cross net's options, defaults filled in; ConfigError naming a bad one."""
    options: dict[str, Any] = {**DEFAULT_OPTIONS, **cfg.options}
    for key, most in (("dcn_num_layers", MAX_LAYERS), ("dcn_low_rank_dim", MAX_LAYER_WIDTH)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ConfigError(f"model.options.{key}: must be an integer from 1 to {most:,}, got {value!r}")
    return {k: options[k] for k in DEFAULT_OPTIONS}


class DlrmDcn(nn.Module):
    def __init__(self, embeddings: EmbeddingModule, num_dense: int, config: ModelConfig,
                 dense_device: torch.device | None = None) -> None:
        super().__init__()
        options = dcn_options(config)
        self.embeddings = embeddings
        self.feature_names = list(embeddings.feature_names)
        self.num_dense = num_dense
        d = embeddings.base_dim
        width = d + sum(embeddings.feature_dims.values())
        self.dense_arch = DenseArch(max(num_dense, 1), [*config.dense_arch, d], device=dense_device)
        self.crossnet = LowRankCrossNet(width, options["dcn_num_layers"], options["dcn_low_rank_dim"])
        self.over_arch = OverArch(width, [*config.over_arch, 1], device=dense_device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """-> logits [B]"""
        dense_t = self.dense_arch(dense_input(dense, sparse, self.num_dense))
        x = torch.cat([dense_t, embedded_in_order(self.embeddings, sparse, self.feature_names)], dim=1)
        return self.over_arch(self.crossnet(x)).squeeze(-1)
