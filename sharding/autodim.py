"""AutoDim's search embedding (Zhao et al., "Memory-efficient Embedding for Recommendations").

Every field looks up N candidate embeddings of widths d_1 < ... < d_N, unifies each to d_N (its own
linear transform, or zero padding; then BatchNorm so magnitudes compare), and mixes them with a
Gumbel-softmax over the field's architecture weights alpha. After the search each field keeps
argmax alpha, and the model is retrained at those widths through an ordinary decisions plan.

The tables are plain TorchRec tables described by a DimensionPlan (`search_plan`), so TorchRec's
planner and `DistributedModelParallel` shard them like any plan:

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
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from embshard.errors import PlanError
from embshard.planner.rounding import FBGEMM_ALIGN
from embshard.planner.shard_plan import block_table_configs
from embshard.planner.types import Block, DimensionPlan, TablePlan, table_name

Lookup = Literal["weight_sharing", "separate"]
Unify = Literal["linear", "zero_pad"]

SEARCH_POLICY = "autodim_search"


def candidate_feature_name(feature: str, dim: int) -> str:
    return f"{feature}__d{dim}"


def stored_width(dim: int) -> int:
    """Width of a separate candidate's table: the next multiple FBGEMM's fused kernels take."""
    return FBGEMM_ALIGN * math.ceil(dim / FBGEMM_ALIGN)


def search_plan(base: DimensionPlan, candidates: list[int], lookup: Lookup) -> DimensionPlan:
    """The tables a search trains. `base`: the uniform plan at d_N = max(candidates), one feature
    per table. weight_sharing trains exactly `base`; separate, one table per candidate."""
    if not base.is_uniform or any(len(t.features) != 1 for t in base.tables):
        raise PlanError("AutoDim searches a uniform plan with one feature per table")
    if base.base_dim != candidates[-1]:
        raise PlanError(
            f"AutoDim: base dim {base.base_dim} differs from the largest candidate {candidates[-1]}"
        )
    if lookup == "weight_sharing":
        return base
    tables, notes = [], []
    for t in base.tables:
        feature = t.features[0]
        for d in candidates:
            width = stored_width(d)
            name = table_name(candidate_feature_name(feature, d))
            if width != d:
                notes.append(
                    f"{name}: candidate width {d} is stored {width} wide (FBGEMM fused kernels need "
                    f"multiples of {FBGEMM_ALIGN}); the candidate reads only its first {d} columns"
                )
            source = {"policy": SEARCH_POLICY, "feature": feature, "candidate": d}
            block = Block(0, t.num_embeddings, width, source=source)
            tables.append(TablePlan(name, [candidate_feature_name(feature, d)], t.num_embeddings, [block]))
    policy = {**base.policy, "autodim_lookup": lookup, "autodim_candidates": list(candidates)}
    return DimensionPlan(base.base_dim, tables, policy=policy, notes=[*base.notes, *notes])


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


class AutodimEmbeddingBags(nn.Module):
    """Search embedding over the uniform plan `base` (d_N wide). `tau` is set by the search loop
    every step; in training mode the mixture is a Gumbel-softmax sample, in eval mode its
    noise-free softmax(logits / tau)."""

    def __init__(
        self,
        base: DimensionPlan,
        candidates: list[int],
        lookup: Lookup = "weight_sharing",
        unify: Unify = "linear",
        batchnorm: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.plan = search_plan(base, candidates, lookup)
        self.base_dim = base.base_dim
        self.feature_names = [t.features[0] for t in base.tables]
        self.candidates = list(candidates)
        self.lookup = lookup
        self.unify = unify
        self.tau = 1.0
        self.ebc = EmbeddingBagCollection(tables=block_table_configs(self.plan), device=device)
        dense_device = device if device is not None and device.type != "meta" else None
        f, n, d = len(self.feature_names), len(candidates), self.base_dim
        self.arch = ArchitectureWeights(f, n, device=dense_device)
        # Column j of candidate n exists iff j < d_n: zero padding keeps the rest at zero.
        mask = torch.tensor([[1.0 if j < dn else 0.0 for j in range(d)] for dn in candidates])
        self.register_buffer("mask", mask.to(dense_device), persistent=False)
        if unify == "linear":
            # One (d_n -> d_N) transform per field and candidate, stored d_N x d_N: rows >= d_n
            # only ever see zero inputs, so one batched einsum serves every candidate.
            self.weight = nn.Parameter(torch.empty(f, n, d, d, device=dense_device))
            self.bias = nn.Parameter(torch.empty(f, n, d, device=dense_device))
            self.reset_transforms()
        self.norm = nn.BatchNorm1d(f * n * d, device=dense_device) if batchnorm else None
        self._generator: torch.Generator | None = None
        self._tables_frozen = False
        self._gather: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def reset_transforms(self) -> None:
        """nn.Linear's default init for each d_n -> d_N transform (bound 1/sqrt(d_n))."""
        for i, dn in enumerate(self.candidates):
            bound = 1.0 / math.sqrt(dn)
            self.weight[:, i].uniform_(-bound, bound).mul_(self.mask[i][None, :, None])
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

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.lookup == "separate":
            features = _repeat_features(features, self.feature_names, self.candidates)
        if self._tables_frozen:
            with torch.no_grad():
                pooled = self.ebc(features)
        else:
            pooled = self.ebc(features)
        x = self.candidate_embeddings(pooled)  # [B, F, N, d_N], zero beyond each d_n
        if self.unify == "linear":
            x = torch.einsum("bfnd,fnde->bfne", x, self.weight) + self.bias
        if self.norm is not None:
            x = self.norm(x.flatten(1)).view_as(x)
            if self.unify == "zero_pad":
                x = x * self.mask  # BatchNorm's shift would otherwise fill the padding
        mixed = torch.einsum("bfne,fn->bfe", x, self.mixing_weights())
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[self.base_dim] * len(self.feature_names),
            values=mixed.flatten(1),
        )

    def candidate_embeddings(self, pooled: KeyedTensor) -> torch.Tensor:
        """[B, fields, candidates, d_N]: candidate n of field f holds the first d_n columns of its
        pooled table (the shared one, or its own) and zeros after."""
        src, dst = self._gather_index(pooled)
        values = pooled.values()
        f, n, d = len(self.feature_names), len(self.candidates), self.base_dim
        out = values.new_zeros(values.shape[0], f * n * d)
        return out.index_copy(1, dst, values.index_select(1, src)).view(-1, f, n, d)

    def _gather_index(self, pooled: KeyedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = tuple(pooled.keys())
        if keys not in self._gather:
            offset = dict(zip(keys, pooled.offset_per_key()))
            src, dst = [], []
            n, d = len(self.candidates), self.base_dim
            for fi, feature in enumerate(self.feature_names):
                for ni, dn in enumerate(self.candidates):
                    key = feature if self.lookup == "weight_sharing" else candidate_feature_name(feature, dn)
                    src.extend(range(offset[key], offset[key] + dn))
                    dst.extend(range((fi * n + ni) * d, (fi * n + ni) * d + dn))
            device = pooled.values().device
            self._gather[keys] = (torch.tensor(src, device=device), torch.tensor(dst, device=device))
        return self._gather[keys]

    def choices(self) -> dict[str, tuple[int, list[float]]]:
        """feature -> (argmax width, softmax(alpha) over the candidates)."""
        probs = self.arch.probabilities().cpu()
        return {
            feature: (self.candidates[int(p.argmax())], [float(x) for x in p])
            for feature, p in zip(self.feature_names, probs)
        }


def _repeat_features(features: KeyedJaggedTensor, names: list[str], candidates: list[int]) -> KeyedJaggedTensor:
    """Each field once per candidate (`f__d2`, `f__d8`, ...), in the search plan's table order."""
    by_key = features.to_dict()
    keys, values, lengths = [], [], []
    for feature in names:
        jt = by_key[feature]
        for d in candidates:
            keys.append(candidate_feature_name(feature, d))
            values.append(jt.values())
            lengths.append(jt.lengths())
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
