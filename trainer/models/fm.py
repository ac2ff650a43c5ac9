"""`fm`: a factorization machine (Rendle, ICDM 2010) over every sparse feature:

    logit = w0 + <w, dense> + sum_f b_f(ids of f) + sum_{f < g} <e_f, e_g>

Every field pair meets in a plain dot product with no MLP behind it, so the embeddings carry the
whole interaction: a width too small for a field cannot be made up by the layers above it. It is
the label model of the synthetic benchmark with known ranks (field-pair dot products plus per-id
biases plus a linear dense term; bench/PLANTED.md), so there the known ranks are its right widths.

The pair sum is computed as (|sum_f e_f|^2 - sum_f |e_f|^2) / 2, linear in the number of fields.
The per-id biases are n x 1 dense, data-parallel tables outside the planned collection, as in
`mf`: the same for every plan, so serving bytes and sweep budgets count the vectors only. A
multi-hot feature's bias is the sum over its ids, as its embedding is the sum of its rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.config import ModelConfig
from embshard.datasets.schema import DatasetSpec
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.models.arch import ModelArch
from embshard.trainer.models.dlrm import dense_input, embedded_in_order


class FmArch(ModelArch):
    """No options, and no MLP."""

    reads_layers = False

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        cardinalities = {f.name: f.cardinality for f in spec.sparse}
        return FactorizationMachine(embeddings, len(spec.dense), cardinalities, device)


class FactorizationMachine(nn.Module):
    def __init__(self, embeddings: EmbeddingModule, num_dense: int, cardinalities: dict[str, int],
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.names = list(embeddings.feature_names)
        self.num_dense = num_dense
        # w0 and w; without dense features it reads a constant 1 (`dense_input`): w0 alone.
        self.linear = nn.Linear(max(num_dense, 1), 1, device=device)
        bags = {name: nn.EmbeddingBag(cardinalities[name], 1, mode="sum", include_last_offset=True, device=device)
                for name in self.names}
        for bag in bags.values():
            nn.init.zeros_(bag.weight)
        self.biases = nn.ModuleDict(bags)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """-> logits [B]"""
        vectors = embedded_in_order(self.embeddings, sparse, self.names)
        vectors = vectors.reshape(-1, len(self.names), self.embeddings.base_dim)
        total = vectors.sum(1)
        pairs = ((total * total).sum(-1) - (vectors * vectors).sum((1, 2))) / 2
        first_order = self.linear(dense_input(dense, sparse, self.num_dense)).squeeze(-1)
        return first_order + id_biases(self.biases, sparse, self.names) + pairs


@torch.fx.wrap
def id_biases(biases: nn.ModuleDict, sparse: KeyedJaggedTensor, names: list[str]) -> torch.Tensor:
    # Wrapped: one node in the trace TorchRec's train pipeline makes of the model (it follows the
    # KJT only into the sharded collection).
    # One split of the KJT for all features: indexing it by key splits it again each time.
    features = sparse.to_dict()
    per_feature = [biases[name](features[name].values(), features[name].offsets()) for name in names]
    return torch.cat(per_feature, dim=1).sum(1)
