"""AutoDim's search embedding (Zhao et al., "Memory-efficient Embedding for Recommendations").

Every field looks up N candidate embeddings of widths d_1 < ... < d_N, unifies each to d_N (its own
linear transform, or zero padding; then BatchNorm so magnitudes compare), and mixes them with a
Gumbel-softmax over the field's architecture weights alpha. After the search each field keeps
argmax alpha, and the model is retrained at those widths through an ordinary decisions plan.

The tables are plain TorchRec tables described by a DimensionPlan
(`planner.policies.autodim.search_plan`), so TorchRec's planner and `DistributedModelParallel`
shard them like any plan:

- weight_sharing: one d_N-wide table per field; candidate n reads the first d_n columns of the
  pooled output. Sum pooling commutes with column slicing, so one lookup serves every candidate.
- separate: one table per candidate per field, all in the same collection; the input KJT repeats
  each field once per candidate. FBGEMM's fused kernels (the only ones that train on CPU) need
  widths divisible by 4, so a narrower candidate is stored in the next multiple of 4 and reads
  only its first d_n columns: the same model, a few idle columns, and a note in the plan.

The output is a KeyedTensor at d_N per field: a drop-in for `PlannedEmbeddingBags` in DLRM.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.config import Lookup, Unify
from embshard.planner.policies.autodim import candidate_feature_name, search_plan, stored_width
from embshard.planner.shard_plan import block_table_configs
from embshard.planner.types import DimensionPlan
from embshard.sharding.embedding_module import EmbeddingModule


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples g = -log(-log(u)), u ~ U(0, 1)."""
    u = torch.rand(shape, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """The paper's p_n = softmax((log alpha_n + g_n) / tau) over the last axis. With alpha =
    softmax(logits), log alpha differs from logits by a per-field constant, which softmax drops."""
    return torch.softmax((logits + noise) / tau, dim=-1)


class ArchitectureWeights(nn.Module):
    """alpha as unnormalised logits [fields, candidates]; all equal (zeros) at the start."""

    def __init__(self, num_fields: int, num_candidates: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_fields, num_candidates, device=device))

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), dim=-1)


class AutodimEmbeddingBags(EmbeddingModule):
    """Search embedding over the uniform plan `base` (d_N wide). `tau` is set by the search loop
    every step; in training mode the mixture is a Gumbel-softmax sample, in eval mode its
    noise-free softmax(logits / tau).

    Computed in one matmul per field rather than one per candidate: each candidate's transform
    and BatchNorm are linear in the field's pooled input X once the batch statistics are known,
    and those follow from X's mean and covariance, so
        sum_n p_n BN_n(X W_n) = (X - mean X) @ sum_n W_n diag(p_n gamma_n / sigma_n) + sum_n p_n beta_n
    exactly (sigma_n^2 = diag(W_n^T cov(X) W_n), BatchNorm's biased batch variance). W_n reads only
    candidate n's columns of X (`read`): the first d_n of the shared table, or its own table.
    """

    # Registered buffers, declared so that they type as tensors (nn.Module's __getattr__ says
    # `Tensor | Module`); running_* exist only with batchnorm.
    read: torch.Tensor
    rows: torch.Tensor
    out_mask: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        base: DimensionPlan,
        candidates: list[int],
        lookup: Lookup = "weight_sharing",
        unify: Unify = "linear",
        batchnorm: bool = True,
        device: torch.device | None = None,
        momentum: float = 0.1,  # BatchNorm's running statistics, as nn.BatchNorm1d
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.plan = search_plan(base, candidates, lookup)
        self.base_dim = base.base_dim
        self.feature_names = [t.features[0] for t in base.tables]
        self.candidates = list(candidates)
        self.lookup = lookup
        self.unify = unify
        self.batchnorm = batchnorm
        self.momentum, self.eps = momentum, eps
        self.tau = 1.0
        self.ebc = EmbeddingBagCollection(tables=block_table_configs(self.plan), device=device)
        # The pooled tables of one field side by side, in the collection's key order.
        self._keys = [k for c in block_table_configs(self.plan) for k in c.feature_names]
        dense_device = device if device is not None and device.type != "meta" else None
        f, n, d = len(self.feature_names), len(candidates), self.base_dim
        self.arch = ArchitectureWeights(f, n, device=dense_device)
        stored = [stored_width(dn) for dn in candidates] if lookup == "separate" else None
        read, starts = _read_layout(candidates, stored, d)
        self.register_buffer("read", read.to(dense_device), persistent=False)  # [N, K, d_N]
        # rows[n, k] = 1 where input column k belongs to candidate n
        self.register_buffer("rows", read.sum(-1, keepdim=True).to(dense_device), persistent=False)
        # Output column j of candidate n exists iff j < d_n when zero padding (BatchNorm's shift
        # must not fill the padding); a linear transform fills all d_N.
        out_mask = torch.tensor([[1.0 if j < dn or unify == "linear" else 0.0 for j in range(d)] for dn in candidates])
        self.register_buffer("out_mask", out_mask.to(dense_device), persistent=False)  # [N, d_N]
        self._starts = starts
        self.register_parameter("bias", None)
        if unify == "linear":
            # W_n (d_n x d_N) lives in rows starts[n] : starts[n] + d_n of weight[:, n] (K x d_N).
            self.weight = nn.Parameter(torch.empty(f, n, read.shape[1], d, device=dense_device))
            # BatchNorm subtracts the batch mean, which cancels a bias: only kept without it.
            self.bias = None if batchnorm else nn.Parameter(torch.empty(f, n, d, device=dense_device))
            self.reset_transforms()
        if batchnorm:
            self.gamma = nn.Parameter(torch.ones(f, n, d, device=dense_device))
            self.beta = nn.Parameter(torch.zeros(f, n, d, device=dense_device))
            self.register_buffer("running_mean", torch.zeros(f, n, d, device=dense_device))
            self.register_buffer("running_var", torch.ones(f, n, d, device=dense_device))
        self._generator: torch.Generator | None = None
        self._tables_frozen = False
        # A module without parameters, so TorchRec's train pipeline can run it ahead on the next
        # batch (see BlockSplit).
        self.repeat = RepeatFeatures(self.feature_names, self.candidates) if lookup == "separate" else None

    @torch.no_grad()
    def reset_transforms(self) -> None:
        """nn.Linear's default init for each d_n -> d_N transform (bound 1/sqrt(d_n))."""
        self.weight.zero_()
        for i, dn in enumerate(self.candidates):
            bound = 1.0 / math.sqrt(dn)
            rows = slice(self._starts[i], self._starts[i] + dn)
            self.weight[:, i, rows].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias[:, i].uniform_(-bound, bound)

    def seed_noise(self, seed: int) -> None:
        """Make the Gumbel samples reproducible (tests; one stream per rank)."""
        self._generator = torch.Generator().manual_seed(seed)

    @contextmanager
    def tables_frozen(self) -> Iterator[None]:
        """Look the tables up without autograd: a backward through this forward cannot reach the
        fused optimizer that TorchRec runs inside the tables' backward (the architecture step)."""
        self._tables_frozen = True
        try:
            yield
        finally:
            self._tables_frozen = False

    def mixing_weights(self) -> torch.Tensor:
        """[fields, candidates]"""
        logits = self.arch.logits
        if not self.training:
            return torch.softmax(logits / self.tau, dim=-1)
        noise = gumbel_noise(tuple(logits.shape), self._generator).to(logits.device)
        return gumbel_softmax(logits, self.tau, noise)

    def transforms(self) -> torch.Tensor:
        """[F, N, K, d_N]: candidate n's map from the field's pooled columns to d_N."""
        if self.unify == "zero_pad":
            return self.read.expand(len(self.feature_names), -1, -1, -1)
        return self.weight * self.rows

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.repeat is not None:
            features = self.repeat(features)
        if self._tables_frozen:
            with torch.no_grad():
                pooled = self.ebc(features)
        else:
            pooled = self.ebc(features)
        return _mixed(self, pooled)

    def mix(self, pooled: KeyedTensor) -> KeyedTensor:
        """The candidates' pooled tables -> each field at the base dim, mixed by alpha."""
        x = self.field_inputs(pooled)  # [B, F, K]
        p = self.mixing_weights()  # [F, N]
        w = self.transforms()  # [F, N, K, d]
        if not self.batchnorm:
            out = torch.einsum("bfk,fkd->bfd", x, torch.einsum("fnkd,fn->fkd", w, p))
            if self.bias is not None:
                out = out + torch.einsum("fnd,fn->fd", self.bias, p)
        elif self.training:
            mean = x.mean(0)  # [F, K]
            centred = x - mean
            cov = torch.einsum("bfk,bfl->fkl", centred, centred) / x.shape[0]
            var = (w * torch.einsum("fkl,fnld->fnkd", cov, w)).sum(2)  # [F, N, d] biased, as BN
            self._track(torch.einsum("fk,fnkd->fnd", mean.detach(), w.detach()), var.detach(), x.shape[0])
            scale = self.gamma * self.out_mask * p[..., None] * torch.rsqrt(var + self.eps)
            out = torch.einsum("bfk,fkd->bfd", centred, torch.einsum("fnkd,fnd->fkd", w, scale))
            out = out + torch.einsum("fnd,fn->fd", self.beta * self.out_mask, p)
        else:
            scale = self.gamma * self.out_mask * p[..., None] * torch.rsqrt(self.running_var + self.eps)
            shift = (self.beta * self.out_mask * p[..., None] - scale * self.running_mean).sum(1)
            out = torch.einsum("bfk,fkd->bfd", x, torch.einsum("fnkd,fnd->fkd", w, scale)) + shift
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[self.base_dim] * len(self.feature_names),
            values=out.flatten(1),
        )

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, batch: int) -> None:
        """BatchNorm's running statistics (unbiased variance), for evaluation."""
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * batch / max(batch - 1, 1), self.momentum)

    def field_inputs(self, pooled: KeyedTensor) -> torch.Tensor:
        """[B, F, K]: each field's pooled table(s) side by side."""
        if pooled.keys() == self._keys:
            values = pooled.values()
        else:
            by_key = pooled.to_dict()
            values = torch.cat([by_key[k] for k in self._keys], dim=1)
        return values.view(values.shape[0], len(self.feature_names), -1)

    def choices(self) -> dict[str, tuple[int, list[float]]]:
        """feature -> (argmax width, softmax(alpha) over the candidates)."""
        probs = self.arch.probabilities().cpu()
        return {
            feature: (self.candidates[int(p.argmax())], [float(x) for x in p])
            for feature, p in zip(self.feature_names, probs, strict=True)
        }


def _read_layout(candidates: list[int], stored: list[int] | None, d: int) -> tuple[torch.Tensor, list[int]]:
    """read[n, k, j] = 1 where output column j of candidate n is input column k (its j-th read
    column); and the first input column of each candidate. stored=None: weight sharing (every
    candidate starts at column 0 of the one d_N-wide table); else the per-candidate table widths."""
    starts = [0] * len(candidates) if stored is None else [sum(stored[:i]) for i in range(len(stored))]
    k = d if stored is None else sum(stored)
    read = torch.zeros(len(candidates), k, d)
    for i, (dn, start) in enumerate(zip(candidates, starts, strict=True)):
        read[i, torch.arange(start, start + dn), torch.arange(dn)] = 1.0
    return read, starts


@torch.fx.wrap
def _mixed(module: AutodimEmbeddingBags, pooled: KeyedTensor) -> KeyedTensor:
    # One opaque node when TorchRec's train pipeline traces the model to find the collection's
    # input: the mixing branches on the pooled output's keys, which a trace cannot follow.
    return module.mix(pooled)


class RepeatFeatures(nn.Module):
    """Each field once per candidate (`f__d2`, `f__d8`, ...), in the search plan's table order."""

    def __init__(self, names: list[str], candidates: list[int]) -> None:
        super().__init__()
        self.names = list(names)
        self.candidates = list(candidates)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return _repeat_features(features, self.names, self.candidates)


def _repeat_features(features: KeyedJaggedTensor, names: list[str], candidates: list[int]) -> KeyedJaggedTensor:
    by_key = features.to_dict()
    keys, values, lengths = [], [], []
    for feature in names:
        jt = by_key[feature]
        for d in candidates:
            keys.append(candidate_feature_name(feature, d))
            values.append(jt.values())
            lengths.append(jt.lengths())
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
