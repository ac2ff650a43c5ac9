"""A DeepFM-style CTR model (Guo et al., 2017) defined outside embshard: a factorisation machine
over the feature embeddings plus an MLP over them and the dense features, summed into one logit.

embshard finds it through the config (`model.arch: "deepfm:build"`) on the driver and on every Ray
worker, as long as this folder is on their Python path (`PYTHONPATH=examples/custom_model`: a
local Ray cluster's workers inherit the driver's environment). The builder receives the run's
embedding module (whatever `embeddings:` planned: MDE blocks, MLET factors, ...), the dataset spec
and `model.options`, and returns an `nn.Module` whose forward(dense, sparse) gives one logit per
example. A plain builder gets every feature at `embeddings.base_dim`, which the FM's pairwise dot
products need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.errors import ConfigError

OPTIONS = {"hidden": [64, 32]}


class DeepFM(nn.Module):
    def __init__(self, embeddings: nn.Module, num_dense: int, hidden: list[int]) -> None:
        super().__init__()
        self.embeddings = embeddings  # the embedding module must be part of the model: it is sharded there
        self.features = list(embeddings.feature_names)
        self.dim = embeddings.base_dim
        self.linear = nn.Linear(num_dense, 1) if num_dense else None  # first order, dense side
        layers: list[nn.Module] = []
        width = num_dense + len(self.features) * self.dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.deep = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        by_feature = self.embeddings(sparse).to_dict()
        e = torch.stack([by_feature[f] for f in self.features], dim=1)  # [B, F, d]
        # FM second order: sum over pairs i < j of <e_i, e_j> = ((sum e)^2 - sum e^2) / 2.
        fm = 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.deep(torch.cat([dense, e.flatten(1)], dim=1)).squeeze(-1)
        first = self.linear(dense).squeeze(-1) if self.linear is not None else 0.0
        return first + fm + deep


def build(embeddings: nn.Module, spec: Any, options: Mapping[str, Any]) -> nn.Module:
    """embshard's builder signature: (embedding module, dataset spec, model.options) -> model."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:  # embshard prints a ConfigError as one line naming the key
        raise ConfigError(f"model.options.{unknown[0]}: not a deepfm option (valid: {', '.join(OPTIONS)})")
    return DeepFM(embeddings, len(spec.dense), list(options.get("hidden", OPTIONS["hidden"])))
