"""A synthetic Criteo-shaped dataset whose labels come from a hidden, seeded ground-truth model.

With `bag_sizes` every sparse feature is multi-hot with a fixed number of ids per row (`--multi-hot`
defaults to MLPerf DLRMv2's pooling factors), each id drawn from the feature's Zipf law on its own; a bag
enters the label as the sum of its ids' weights over sqrt(size), so each feature keeps the weight
of its single-hot counterpart whatever its bag size.

Sparse ids are Zipf-distributed over frequency *ranks*; a fixed random permutation per feature
turns ranks into ids, so ids are not sorted by frequency and a planner has to rank them from the
profile. Labels are Bernoulli(sigmoid(hidden logit)), so a model that learns beats AUC 0.5 and the
hidden logit itself gives the Bayes-optimal AUC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from embshard.datasets.schema import DatasetSpec, SparseFeature, flat_ids
from embshard.datasets.writer import DatasetWriter, SplitPlan
from embshard.errors import DataError

# Criteo Kaggle's per-feature cardinalities (C1..C26), the shape the synthetic data imitates.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# Ids per row of C1..C26 in MLPerf Training's DLRMv2 (recommendation_v2/torchrec_dlrm,
# `--multi_hot_sizes`); its synthetic multi-hot Criteo gives every row exactly these many ids.
MLPERF_MULTI_HOT_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
NUM_DENSE = 13
DEFAULT_MAX_CARDINALITY = 100_000
CHUNK_ROWS = 1 << 17
# Rank buckets of the one pairwise interaction (C1 x C2): coarse enough that a model can learn it.
PAIR_BUCKETS = 64
PILOT_ROWS = 50_000
# Ids a multi-hot pilot draws at most (MLPerf's bags, 214 ids a row, draw 10.7M), in one row at
# least: 1,000 ids per bag drew 1.3 billion whatever --rows was, and ran out of memory.
PILOT_IDS = 16_000_000
# Ids per row of one feature: MLPerf's largest bag is 100.
MAX_BAG = 10_000


@dataclass(frozen=True)
class HiddenModel:
    """Everything random about the data, drawn once per seed."""

    cardinalities: list[int]
    exponents: np.ndarray  # Zipf exponent per sparse feature
    rank_weights: list[np.ndarray]  # per feature, logit weight of each frequency rank
    id_of_rank: list[np.ndarray]  # per feature, the fixed permutation rank -> id
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_weights: np.ndarray
    pair_weights: np.ndarray  # [PAIR_BUCKETS, PAIR_BUCKETS] for C1 x C2
    offset: float  # chosen so the positive rate is `positive_rate`
    bag_sizes: tuple[int, ...] | None = None  # ids per row of each feature; None: single-hot

    def logit(self, ranks: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
        z = self.first_order(ranks, dense) + self.offset
        first = [r if r.ndim == 1 else r[:, 0] for r in ranks[:2]]  # a bag's first id stands for it
        z += self.pair_weights[first[0] % PAIR_BUCKETS, first[1] % PAIR_BUCKETS]
        return z

    def first_order(self, ranks: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
        """The dense and per-id terms of the logit, without interaction or offset."""
        # log(1 + e^mu) is the median of log(1 + lognormal(mu, .)): centres each dense feature.
        z = (dense - np.log1p(np.exp(self.dense_mu))) @ self.dense_weights
        for w, r in zip(self.rank_weights, ranks, strict=True):
            z += w[r] if r.ndim == 1 else w[r].sum(axis=1) / np.sqrt(r.shape[1])
        return z

    def logit_of_table(self, table: pa.Table, spec: DatasetSpec) -> np.ndarray:
        """The hidden logit of rows read back from Parquet (ids are mapped back to ranks)."""
        ranks = []
        for f, perm in zip(spec.sparse_names, self.id_of_rank, strict=True):
            rank_of_id = np.empty_like(perm)
            rank_of_id[perm] = np.arange(len(perm))
            ids, _ = flat_ids(table[f])
            r = rank_of_id[ids]
            ranks.append(r if self.bag_sizes is None else r.reshape(table.num_rows, -1))
        dense = np.column_stack([table[d].to_numpy() for d in spec.dense]).astype(np.float64)
        return self.logit(ranks, dense)


def cardinalities(max_cardinality: int = DEFAULT_MAX_CARDINALITY) -> list[int]:
    if max_cardinality < 2:
        raise DataError(f"max_cardinality must be >= 2, got {max_cardinality}")
    return [min(c, max_cardinality) for c in CRITEO_CARDINALITIES]


def hidden_model(seed: int = 0, max_cardinality: int = DEFAULT_MAX_CARDINALITY,
                 positive_rate: float = 0.25, bag_sizes: Sequence[int] | None = None) -> HiddenModel:
    rng = np.random.default_rng([seed, 0])
    cards = cardinalities(max_cardinality)
    exponents = rng.uniform(1.05, 1.2, size=len(cards))
    importance = rng.uniform(0.15, 0.6, size=len(cards))
    # Tail ids get smaller weights: they are seen too rarely for any model to learn them, and
    # the label signal should sit where a learner can find it.
    rank_weights = [
        (rng.standard_normal(c) * s / (1.0 + 0.25 * np.log1p(np.arange(c)))).astype(np.float32)
        for c, s in zip(cards, importance, strict=True)
    ]
    id_of_rank = [rng.permutation(c) for c in cards]
    model = HiddenModel(
        cardinalities=cards,
        exponents=exponents,
        rank_weights=rank_weights,
        id_of_rank=id_of_rank,
        dense_mu=rng.uniform(0.0, 3.0, size=NUM_DENSE),
        dense_sigma=rng.uniform(0.5, 1.5, size=NUM_DENSE),
        dense_weights=rng.normal(0.0, 0.25, size=NUM_DENSE),
        pair_weights=rng.normal(0.0, 0.5, size=(PAIR_BUCKETS, PAIR_BUCKETS)),
        offset=0.0,
        bag_sizes=None if bag_sizes is None else tuple(bag_sizes),
    )
    pilot = PILOT_ROWS if bag_sizes is None else max(1, min(PILOT_ROWS, PILOT_IDS // sum(bag_sizes)))
    ranks, dense = draw_features(model, pilot, np.random.default_rng([seed, 1]))
    z = model.logit(ranks, dense)
    return replace(model, offset=offset_for_rate(z, positive_rate))


def synthesize(out_dir: str | Path, rows: int = 100_000, seed: int = 0, *,
               max_cardinality: int = DEFAULT_MAX_CARDINALITY,
               positive_rate: float = 0.25, bag_sizes: Sequence[int] | None = None,
               overwrite: bool = False) -> DatasetSpec:
    """Writes `rows` rows (80/10/10 train/valid/test) and the profile to `out_dir`; deterministic
    per arguments. With `bag_sizes` (one per sparse feature) every sparse feature is multi-hot
    with exactly that many ids per row. A non-empty `out_dir` needs overwrite=True and is
    replaced whole."""
    if rows < 10:
        raise DataError(f"synth: rows must be >= 10 so every split gets a row, got {rows}")
    if bag_sizes is not None and (len(bag_sizes) != len(CRITEO_CARDINALITIES) or min(bag_sizes) < 1
                                  or max(bag_sizes) > MAX_BAG):
        raise DataError(f"synth: --multi-hot needs {len(CRITEO_CARDINALITIES)} bag sizes from 1 to {MAX_BAG:,} "
                        f"(one per feature C1..C{len(CRITEO_CARDINALITIES)}), got {','.join(map(str, bag_sizes))}")
    model = hidden_model(seed, max_cardinality, positive_rate, bag_sizes)
    multi_hot = bag_sizes is not None
    spec = DatasetSpec(
        name="synth-criteo-multihot" if multi_hot else "synth-criteo",
        dense=[f"I{i + 1}" for i in range(NUM_DENSE)],
        sparse=[SparseFeature(f"C{i + 1}", c, multi_hot) for i, c in enumerate(model.cardinalities)],
        source=f"synth(rows={rows}, seed={seed}, max_cardinality={max_cardinality}, "
               f"positive_rate={positive_rate}"
               + (f", bag_sizes={','.join(map(str, bag_sizes))})" if bag_sizes is not None else ")"),
    )
    plan = SplitPlan(rows)
    with DatasetWriter(out_dir, spec.arrow_schema(), overwrite=overwrite, total_rows=rows,
                       desc="synth") as writer:
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            rng = np.random.default_rng([seed, 2, chunk])
            table, _ = chunk_table(model, model.logit, spec, n, rng)
            writer.write_ordered(table, np.arange(start, start + n), plan)
        return writer.finish(spec, source=spec.source)


def chunk_table(model: HiddenModel, logit: Callable[[list[np.ndarray], np.ndarray], np.ndarray],
                spec: DatasetSpec, n: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """`n` rows drawn from `model`, labelled by `logit` (of ranks and dense), and their click probabilities."""
    ranks, dense = draw_features(model, n, rng)
    p = 1.0 / (1.0 + np.exp(-logit(ranks, dense)))
    columns = {spec.label: (rng.random(n) < p).astype(np.float32)}
    columns.update({d: dense[:, i].astype(np.float32) for i, d in enumerate(spec.dense)})
    columns.update({f: _id_column(perm, r)
                    for f, perm, r in zip(spec.sparse_names, model.id_of_rank, ranks, strict=True)})
    return pa.table(columns), p


def _id_column(id_of_rank: np.ndarray, ranks: np.ndarray) -> np.ndarray | pa.ListArray:
    if ranks.ndim == 1:
        return id_of_rank[ranks]
    n, k = ranks.shape
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, id_of_rank[ranks].ravel())


def draw_features(model: HiddenModel, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    cards = model.cardinalities
    shapes: list[int | tuple[int, int]] = (
        [n] * len(cards) if model.bag_sizes is None else [(n, k) for k in model.bag_sizes]
    )
    ranks = [zipf_ranks(rng.random(shape), c, s) for shape, c, s in zip(shapes, cards, model.exponents, strict=True)]
    # Criteo's integer features are heavy-tailed counts; DLRM feeds log(1 + x), which is what we emit.
    dense = np.log1p(rng.lognormal(model.dense_mu, model.dense_sigma, size=(n, NUM_DENSE)))
    return ranks, dense


def zipf_ranks(u: np.ndarray, n: int, s: float) -> np.ndarray:
    """Inverse CDF of the continuous power law x^-s on [1, n + 1), floored to ranks 0..n-1:
    Zipf-shaped, vectorised and needing no per-rank table (cardinalities may be millions)."""
    a = 1.0 - s
    x = (1.0 - u * (1.0 - (n + 1.0) ** a)) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def offset_for_rate(z: np.ndarray, rate: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
