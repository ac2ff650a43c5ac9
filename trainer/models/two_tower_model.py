"""The two-tower retrieval model over one planned embedding module.

All features (query and item) are looked up by the one embedding module the run's method builds,
so sharding, pipelining and checkpoints treat it like any other model's; the towers split its
output by feature. Each tower is an MLP over its features' embeddings concatenated at their own
widths, ending at `out_dim`, L2-normalised: a score is the cosine of a query and an item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.sharding.embedding_module import EmbeddingModule


@dataclass(frozen=True)
class TowerLayout:
    """Which features each tower reads and which feature is the item's id."""

    query: list[str]
    item: list[str]
    item_id: str


class TowerOutput(NamedTuple):
    query: torch.Tensor  # [B, out_dim], unit length
    item: torch.Tensor  # [B, out_dim], unit length
    item_ids: torch.Tensor  # [B]: the item-id feature's id of each row


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, device: torch.device | None) -> nn.Sequential:
    """Linear + ReLU per hidden width, then a plain Linear to out_dim (no activation on the
    output: it is normalised, and a ReLU would confine it to the positive orthant)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width, device=device), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim, device=device))
    return nn.Sequential(*layers)


class TwoTowerModel(nn.Module):
    def __init__(self, embeddings: EmbeddingModule, layout: TowerLayout, hidden: Sequence[int], out_dim: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layout = layout
        width = embeddings.feature_dims
        self.query_tower = mlp(sum(width[f] for f in layout.query), hidden, out_dim, device)
        self.item_tower = mlp(sum(width[f] for f in layout.item), hidden, out_dim, device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> TowerOutput:
        """Both towers on every row (`dense` is unused: MovieLens has no dense features)."""
        pooled = self.embeddings(sparse).to_dict()
        query = self.encode(self.query_tower, [pooled[f] for f in self.layout.query])
        item = self.encode(self.item_tower, [pooled[f] for f in self.layout.item])
        return TowerOutput(query, item, sparse[self.layout.item_id].values())

    @staticmethod
    def encode(tower: nn.Module, embedded: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(tower(torch.cat(embedded, dim=1)), dim=1)
