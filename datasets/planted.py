"""A Criteo-shaped dataset with planted embedding dimensions: a benchmark where the right answer is known.

Each table gets a latent rank drawn log-uniformly from a range (2 to 32 by default), and within a
table the rank falls with row popularity, MDE's own generative assumption: the rows of the top 1%
of frequency ranks span `rank` latent dimensions, the next 9% `rank // 2`, the rest `rank // 4`
(at least 1; blocks too small to hold their rank merge into the block above). Row vectors live in
a latent space of `rank_range[1]` dimensions shared by all tables, so fields can interact; the
logit is the sum of dot products over all field pairs plus per-id biases and dense terms, and
labels are Bernoulli(sigmoid(logit)).

Each table's subspace is random by default. With `aligned` it is the table's first `rank` latent
coordinates (the same draws otherwise): every table's vectors are then zero past their rank in one
basis, the structure element-wise pruning (PEP) can find. In a random orientation a rank-r
table's vectors have every coordinate non-zero, and the one freedom the dot products leave a model,
a rotation of the latent space shared by all tables, cannot align 26 random subspaces at once.

`dataset.json` records what was planted under `planted` (ranks per table and popularity block,
and the Bayes AUC of every split: the AUC the true probabilities reach on that split's rows, in
expectation over the labels). It is there for benchmarks only: no planner or training code reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from embshard.datasets.schema import SPLITS, DatasetSpec, SparseFeature
from embshard.datasets.synth import (
    CHUNK_ROWS,
    DEFAULT_MAX_CARDINALITY,
    NUM_DENSE,
    PILOT_ROWS,
    HiddenModel,
    chunk_table,
    draw_features,
    hidden_model,
    offset_for_rate,
)
from embshard.datasets.writer import DatasetWriter, SplitPlan
from embshard.errors import DataError

DEFAULT_RANK_RANGE = (2, 32)
# Cumulative shares of frequency ranks that end each popularity block; a block's rank halves.
BLOCK_SHARES = (0.01, 0.1, 1.0)
# Standard deviation of the summed field-pair interactions on the pilot rows: large enough that
# the interactions, not the per-id biases, carry most of the signal a model can learn.
INTERACTION_STD = 1.5


@dataclass(frozen=True)
class RankBlock:
    start: int  # first frequency rank (0 = the most popular row)
    end: int
    rank: int


@dataclass(frozen=True)
class PlantedModel:
    """Everything random about a planted dataset, drawn once per seed."""

    base: HiddenModel  # cardinalities, Zipf skew, id permutation, dense terms, per-id biases
    latent_dim: int
    blocks: list[list[RankBlock]]  # per table, its popularity blocks in rank order
    coords: list[np.ndarray]  # per table [cardinality, rank]: row coordinates in the table's subspace
    bases: list[np.ndarray]  # per table [rank, latent_dim]: orthonormal rows spanning the subspace
    aligned: bool  # each subspace is its table's first `rank` latent coordinates
    scale: float  # multiplies the field-pair interactions
    offset: float

    def rank(self, table: int) -> int:
        return self.blocks[table][0].rank

    def latent(self, table: int) -> np.ndarray:
        """The table's row vectors [cardinality, latent_dim], rows in frequency-rank order."""
        return self.coords[table] @ self.bases[table]

    def logit(self, ranks: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
        return self.base.first_order(ranks, dense) + self.scale * self.interactions(ranks) + self.offset

    def interactions(self, ranks: list[np.ndarray]) -> np.ndarray:
        """Sum over field pairs i < j of <v_i, v_j>, as (|sum v|^2 - sum |v|^2) / 2: linear in fields."""
        total = np.zeros((len(ranks[0]), self.latent_dim))
        squares = np.zeros(len(ranks[0]))
        for c, q, r in zip(self.coords, self.bases, ranks, strict=True):
            u = c[r].astype(np.float64)
            total += u @ q
            squares += np.einsum("ij,ij->i", u, u)  # |u q| = |u|: q has orthonormal rows
        return (np.einsum("ij,ij->i", total, total) - squares) / 2


def popularity_blocks(cardinality: int, rank: int) -> list[RankBlock]:
    blocks: list[RankBlock] = []
    start = 0
    for b, share in enumerate(BLOCK_SHARES):
        r = max(1, rank >> b)
        end = max(start + r, math.ceil(cardinality * share))
        if end > cardinality:  # too few rows left to span r dimensions: the block above takes them
            last = blocks[-1]
            blocks[-1] = RankBlock(last.start, cardinality, last.rank)
            break
        if blocks and blocks[-1].rank == r:
            blocks[-1] = RankBlock(blocks[-1].start, end, r)
        else:
            blocks.append(RankBlock(start, end, r))
        start = end
        if end == cardinality:
            break
    return blocks


# The latent space is HI wide (an HI x HI identity per table when aligned): 1:2000 took 3 min and
# 3 GB before a row was written, 1:100000 asked for 40 GB. Wider than any embedding trained here.
MAX_PLANTED_RANK = 512


def planted_model(seed: int = 0, max_cardinality: int = DEFAULT_MAX_CARDINALITY,
                  rank_range: tuple[int, int] = DEFAULT_RANK_RANGE, positive_rate: float = 0.25,
                  aligned: bool = False) -> PlantedModel:
    lo, hi = rank_range
    if not 1 <= lo <= hi <= MAX_PLANTED_RANK:
        raise DataError(f"synth --planted: rank range must be 1 <= LO <= HI <= {MAX_PLANTED_RANK}, got {lo}:{hi}")
    base = hidden_model(seed, max_cardinality, positive_rate)
    rng = np.random.default_rng([seed, 10])
    blocks, coords, bases = [], [], []
    for c in base.cardinalities:
        rank = min(c, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))
        table_blocks = popularity_blocks(c, rank)
        u = np.zeros((c, rank), dtype=np.float32)
        for b in table_blocks:
            # Unit expected norm whatever the block's rank, so rare rows differ in span, not size.
            u[b.start : b.end, : b.rank] = rng.standard_normal((b.end - b.start, b.rank)) / np.sqrt(b.rank)
        q, _ = np.linalg.qr(rng.standard_normal((hi, rank)))  # drawn either way: same draws after it
        blocks.append(table_blocks)
        coords.append(u)
        bases.append(np.eye(hi)[:rank] if aligned else q.T.copy())
    model = PlantedModel(base, hi, blocks, coords, bases, aligned, scale=1.0, offset=0.0)
    ranks, dense = draw_features(base, PILOT_ROWS, np.random.default_rng([seed, 1]))
    model = replace(model, scale=INTERACTION_STD / float(model.interactions(ranks).std()))
    return replace(model, offset=offset_for_rate(model.logit(ranks, dense), positive_rate))


def expected_auc(p: np.ndarray) -> float | None:
    """The AUC of scores `p` against labels ~ Bernoulli(p), in expectation over the labels: the
    Bayes AUC of rows whose true click probabilities are `p` (ratio of expected pair counts).
    None for fewer than two rows, where no pair exists (JSON has no NaN)."""
    p = np.sort(p.astype(np.float64))
    q = 1.0 - p
    below = np.cumsum(q) - q  # expected negatives scored below each row (ties: measure zero)
    pairs = p.sum() * q.sum() - float(np.dot(p, q))
    return float(np.dot(p, below) / pairs) if pairs > 0 else None


def synthesize_planted(out_dir: str | Path, rows: int = 100_000, seed: int = 0, *,
                       max_cardinality: int = DEFAULT_MAX_CARDINALITY,
                       rank_range: tuple[int, int] = DEFAULT_RANK_RANGE,
                       positive_rate: float = 0.25, aligned: bool = False, overwrite: bool = False) -> DatasetSpec:
    """Writes `rows` planted rows (80/10/10) and the profile to `out_dir`, like `synthesize`."""
    if rows < 10:
        raise DataError(f"synth: rows must be >= 10 so every split gets a row, got {rows}")
    model = planted_model(seed, max_cardinality, rank_range, positive_rate, aligned)
    spec = DatasetSpec(
        name="synth-planted",
        dense=[f"I{i + 1}" for i in range(NUM_DENSE)],
        sparse=[SparseFeature(f"C{i + 1}", c) for i, c in enumerate(model.base.cardinalities)],
        source=f"synth(rows={rows}, seed={seed}, max_cardinality={max_cardinality}, "
               f"positive_rate={positive_rate}, planted ranks {rank_range[0]}:{rank_range[1]}"
               f"{', aligned' if aligned else ''})",
    )
    plan = SplitPlan(rows)
    probabilities: dict[int, list[np.ndarray]] = {code: [] for code in range(len(SPLITS))}
    with DatasetWriter(out_dir, spec.arrow_schema(), overwrite=overwrite, total_rows=rows,
                       desc="synth") as writer:
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            positions = np.arange(start, start + n)
            table, p = chunk_table(model.base, model.logit, spec, n, np.random.default_rng([seed, 2, chunk]))
            codes = plan.codes(positions)
            for code in probabilities:
                probabilities[code].append(p[codes == code].astype(np.float32))
            writer.write_ordered(table, positions, plan)
        planted = _metadata(model, spec, {s: expected_auc(np.concatenate(probabilities[code]))
                                          for code, s in enumerate(SPLITS)})
        return writer.finish(replace(spec, planted=planted), source=spec.source)


def _metadata(model: PlantedModel, spec: DatasetSpec, bayes_auc: dict[str, float | None]) -> dict[str, Any]:
    return {
        "bayes_auc": bayes_auc,
        "latent_dim": model.latent_dim,
        "basis": "aligned" if model.aligned else "random",
        # Blocks are ranges of frequency rank (0 = most popular in the generator), not of ids: the
        # id permutation hides the order, as in plain synth.
        "ranks": {f: {"rank": model.rank(t),
                      "blocks": [{"start": b.start, "end": b.end, "rank": b.rank} for b in model.blocks[t]]}
                  for t, f in enumerate(spec.sparse_names)},
    }
