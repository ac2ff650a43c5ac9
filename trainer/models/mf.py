"""`mf`: matrix factorisation on a rating matrix, the model of MDE's MovieLens experiments (Ginart
et al.): prediction = <user vector, item vector> + user bias + item bias + global bias, trained with
MSE on the rating, evaluated by MSE and RMSE.

The dot product needs one width, so both vectors reach it at the base dim (MDE's projections and
MLET's collapse apply as for DLRM; MDE within tables is the paper's setting). The biases are
n x 1 tables kept as dense, data-parallel parameters outside the planned embedding collection:
no method plans them and they are the same for every plan, so a plan's serving size (and so a
sweep's budgets and byte figures) counts the user and item vectors only.

Options (`model.options`): user and item (the two features; default: the dataset's one feature
with role query, and its one with role item), init_bias, the global bias's start (a rating
scale's midpoint saves the steps it would take to get there from 0), and l2, regularised MF's
penalty (Koren et al. 2009): l2 x the batch mean of |u|^2 + |v|^2 + b_u^2 + b_i^2 added to the
loss. It is taken on the rows a batch reads, as the model sees them (after MDE's projection or
MLET's product), so it reaches every table optimizer: the fused ones take no weight decay on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.config import JobConfig, ModelConfig
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.evaluate import EvalResult, evaluate_regression
from embshard.trainer.models.arch import ModelArch
from embshard.trainer.models.dlrm import embedded_in_order
from embshard.typed_config import from_dict

WHERE = "model.options"


@dataclass
class MfOptions:
    user: str | None = None  # default: the dataset's feature with role "query"
    item: str | None = None  # default: the dataset's feature with role "item"
    init_bias: float = 0.0  # the global bias before training
    l2: float = 0.0  # lambda of the penalty on the batch's vectors and biases (0: none)


def mf_features(spec: DatasetSpec, options: MfOptions) -> tuple[str, str]:
    """(user, item); ConfigError naming the option, or the dataset, that is wrong."""
    user = options.user or _one_with_role(spec, "query", "user")
    item = options.item or _one_with_role(spec, "item", "item")
    for key, name in (("user", user), ("item", item)):
        if name not in spec.sparse_names:
            raise ConfigError(f"{WHERE}.{key}: unknown feature {name!r} (dataset {spec.name!r} has "
                              f"{', '.join(spec.sparse_names)})")
    if user == item:
        raise ConfigError(f"{WHERE}: user and item are both {user!r}")
    others = [f for f in spec.sparse_names if f not in (user, item)]
    if others:
        # Their tables would be planned, counted in the serving size and never read.
        raise ConfigError(f"model.arch 'mf': dataset {spec.name!r} has features besides {user} and {item} "
                          f"({', '.join(others)}) that matrix factorisation does not use; convert it with "
                          "`embshard data convert movielens --target rating`, which keeps only the two ids")
    if any(spec.feature(f).multi_hot for f in (user, item)):
        raise ConfigError(f"model.arch 'mf': {user} and {item} must be single ids per row, not multi-hot")
    return user, item


def _one_with_role(spec: DatasetSpec, role: str, option: str) -> str:
    found = spec.with_role(role)
    if len(found) != 1:
        raise ConfigError(f"{WHERE}.{option}: dataset {spec.name!r} has {len(found)} features with role "
                          f"{role!r} ({', '.join(found) or 'none'}); name the {option} feature")
    return found[0]


def parse_options(options: Mapping[str, Any]) -> MfOptions:
    return from_dict(MfOptions, options, WHERE)


class Rated(NamedTuple):
    prediction: torch.Tensor  # [B] predicted ratings
    penalty: torch.Tensor  # [] the l2 penalty of the batch (0 without l2)


class MfArch(ModelArch):
    uniform_width = True  # a dot product: both vectors at the base dim
    reads_layers = False
    reads_dense = False  # ids alone
    options = tuple(f.name for f in fields(MfOptions))
    targets = ("rating",)

    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        super().check(cfg, spec)
        options = parse_options(cfg.model.options)
        mf_features(spec, options)
        if not options.l2 >= 0:
            raise ConfigError(f"{WHERE}.l2: must be >= 0, got {options.l2}")

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        options = parse_options(cfg.options)
        user, item = mf_features(spec, options)
        return MatrixFactorization(embeddings, user, item, spec.feature(user).cardinality,
                                   spec.feature(item).cardinality, options.init_bias, options.l2, device)

    def loss(self, output: Rated, batch: Batch) -> torch.Tensor:
        return F.mse_loss(output.prediction, batch.labels) + output.penalty

    def evaluate(self, model: nn.Module, reader: ParquetBatchReader, device: torch.device,
                 max_batches: int | None) -> EvalResult:
        return evaluate_regression(model, reader, device, max_batches, lambda output: output.prediction)


class MatrixFactorization(nn.Module):
    def __init__(self, embeddings: EmbeddingModule, user: str, item: str, users: int, items: int,
                 init_bias: float, l2: float = 0.0, device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.l2 = l2
        self.names = [user, item]
        self.user_bias = nn.Embedding(users, 1, device=device)
        self.item_bias = nn.Embedding(items, 1, device=device)
        self.global_bias = nn.Parameter(torch.full((1,), float(init_bias), device=device))
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> Rated:
        vectors = embedded_in_order(self.embeddings, sparse, self.names)
        pair = vectors.reshape(-1, 2, self.embeddings.base_dim)
        user_ids, item_ids = ids_of(sparse, self.names[0]), ids_of(sparse, self.names[1])
        user_bias, item_bias = self.user_bias(user_ids).squeeze(-1), self.item_bias(item_ids).squeeze(-1)
        prediction = (pair[:, 0] * pair[:, 1]).sum(-1) + user_bias + item_bias + self.global_bias
        if not (self.l2 and self.training):  # only a training loss reads it: no work on every other batch
            return Rated(prediction, prediction.new_zeros(()))
        penalty = self.l2 * (pair.square().sum((1, 2)) + user_bias.square() + item_bias.square()).mean()
        return Rated(prediction, penalty)


@torch.fx.wrap
def ids_of(sparse: KeyedJaggedTensor, name: str) -> torch.Tensor:
    # Wrapped: one node in the trace TorchRec's train pipeline makes of the model (it follows the
    # KJT only into the sharded collection). One id per row: mf_features checked single-hot.
    return sparse[name].values()
