"""MDE: embedding widths that scale with popularity.

Ginart, Naumov, Mudigere, Yang, Zou, "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems" (arXiv:1909.11810). Two steps, kept apart:

- blocking (the paper's block partition by popularity): which rows share a width. `within` ranks a
  table's rows by training frequency and cuts the ranking into k blocks carrying equal shares of
  the lookups; `across` (the paper's CTR setting) makes each table one block.
- sizing (Alg. 3): d_i = lambda * p_i^alpha, where p_i is block i's popularity: the mean lookups
  per row, p_i = lookups_i / rows_i (normalised by all lookups). Across tables this is the
  paper's p_i proportional to 1/n_i (also the default of its reference code, DLRM's
  `md_solver`) when every table is looked up once per example (single-hot), and it stays right
  for multi-hot features. lambda comes from the base dim (the most popular block gets d-bar) or
  is solved from a parameter / byte budget. alpha = 0 gives every block d-bar, the paper's
  uniform limit. Widths are clipped to [min_dim, d-bar] (never wider than the base dim, the
  paper's convention) and rounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from embshard.config import EmbeddingsConfig
from embshard.datasets.profile import IdCounts
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import PlanError
from embshard.planner.grid_fit import fit_on_grid, grid_widths
from embshard.planner.remap import frequency_ranking, save_remap
from embshard.planner.rounding import Rounded, nearest_widths, round_width, step_up
from embshard.planner.types import Block, DimensionPlan, RowOrder, TablePlan, table_name
from embshard.typed_config import to_dict

BYTES_PER_PARAM = 4  # tables are trained and stored in fp32
LANDING = 0.99  # a budgeted plan lands in [0.99 * budget, budget]


@dataclass(frozen=True)
class BlockedTable:
    feature: SparseFeature
    bounds: list[int]  # cut points in ranked rows: [0, c_1, ..., n]
    lookups: np.ndarray  # per block: training lookups that hit it
    remap: np.ndarray | None  # id -> ranked row; None when rows keep their ids


def equipartition(ranked_counts: np.ndarray, k: int) -> list[int]:
    """Cut points splitting rows (ranked by descending count) into k blocks of equal lookup mass.

    Equipartition of the popularity mass, the paper's within-table blocking: cut j lands on the
    smallest prefix holding at least j/k of all lookups. An id heavier than 1/k of the mass
    makes two cuts coincide; the duplicate is dropped, so fewer than k blocks can come back.
    """
    n = len(ranked_counts)
    total = int(ranked_counts.sum())
    if total == 0 or k <= 1:
        return [0, n]
    prefix = np.cumsum(ranked_counts)
    cuts = np.searchsorted(prefix, total * np.arange(1, k) / k, side="left") + 1
    return [0, *sorted({int(c) for c in cuts if 0 < c < n}), n]


def base_lambda(p: np.ndarray, alpha: float, base_dim: int) -> float:
    """lambda such that the most popular block gets exactly the base dim."""
    return base_dim * float(p.max()) ** -alpha


def mde_dims(p: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    """Alg. 3: d_i = lambda * p_i^alpha (real-valued; rounding comes after)."""
    return lam * np.power(p, alpha)


def served_dim(rows: Any, dim: Any, base_dim: int) -> Any:
    """d_i, or d-bar where the projection P_i (d_i x d-bar) costs at least what narrowing the rows
    saves (rows x (d-bar - d_i)): a block of few rows is cheaper served unprojected at d-bar, and
    of full rank. Small tables' popular rows are the ones MDE makes wide; projected, 3 rows at
    width 28 cost 28 x 67 parameters instead of 3 x 64. Numbers or numpy arrays of them (a budget
    is solved over every block at once)."""
    return np.where((dim < base_dim) & (rows * (base_dim - dim) <= dim * base_dim), base_dim, dim)


def block_cost(rows: Any, dim: Any, base_dim: int) -> Any:
    """Serving parameters of a block sized d_i: rows x its served width, plus P_i if narrower."""
    served = served_dim(rows, dim, base_dim)
    return rows * served + np.where(served < base_dim, served * base_dim, 0)


def serve_params(rows: np.ndarray, dims: np.ndarray, base_dim: int) -> int:
    return int(block_cost(rows.astype(np.int64), dims.astype(np.int64), base_dim).sum())


def mde_plan(
    cfg: EmbeddingsConfig,
    spec: DatasetSpec,
    counts: Mapping[str, np.ndarray] | None,
    out_dir: Path | None,
) -> DimensionPlan:
    ids = None if counts is None else IdCounts.of(counts)
    tables = [_block_table(f, cfg, ids) for f in spec.sparse]
    total = sum(float(t.lookups.sum()) for t in tables)
    if total <= 0:
        raise PlanError(f"{spec.name}: the id counts hold no lookups at all; no popularity to rank")
    rows = np.concatenate([np.diff(t.bounds) for t in tables])
    p = np.concatenate([t.lookups for t in tables]) / rows / total
    budget = _budget(cfg)
    if budget is None:
        lam = base_lambda(p, cfg.mde.alpha, cfg.dim)
        rounded = _round(p, lam, cfg)
        dims = np.array([r.value for r in rounded])
        notes = [
            f"mde {cfg.mde.mode}: lambda = {lam:.4g} from dim {cfg.dim} (most popular block gets it)"
        ]
    else:
        lam, rounded, dims, notes = _fit_budget(p, rows, budget, cfg)
    if counts is None:
        notes.append("mde across: no id counts, so p_i = 1/n_i (one lookup per table per example)")

    plans, i = [], 0
    for t in tables:
        name = table_name(t.feature.name)
        wanted = min(cfg.mde.blocks, t.feature.cardinality)
        if cfg.mde.mode == "within" and len(t.bounds) - 1 < wanted:
            notes.append(
                f"{name}: {len(t.bounds) - 1} blocks instead of {wanted} (equal-lookup cuts "
                f"coincide: ids heavier than 1/{wanted} of the lookups, or no lookups)"
            )
        blocks = []
        for j, (start, end) in enumerate(pairwise(t.bounds)):
            if rounded[i].note:
                notes.append(f"{name} block {j}: {rounded[i].note}")
            if dims[i] != rounded[i].value:
                moved = "grown" if dims[i] > rounded[i].value else "narrowed"
                notes.append(
                    f"{name} block {j}: {rounded[i].value} -> {dims[i]} ({moved} to fit the budget)"
                )
            served = int(served_dim(end - start, int(dims[i]), cfg.dim))
            if served != dims[i]:
                notes.append(f"{name} block {j}: {dims[i]} -> {served} ({end - start:,} rows at {dims[i]} and a "
                             f"{dims[i]} x {cfg.dim} projection cost no less than the rows at {served})")
            source = {
                "policy": "mde", "mode": cfg.mde.mode, "alpha": cfg.mde.alpha, "lambda": lam,
                "popularity": float(p[i]), "raw_dim": float(mde_dims(p[i], cfg.mde.alpha, lam)),
                "sized_dim": int(dims[i]),  # Alg. 3's rounded width, before `served_dim`
            }
            blocks.append(Block(start, end, served, source=source))
            i += 1
        remap = None if t.remap is None else save_remap(out_dir, name, t.remap)
        row_order: RowOrder = "identity" if remap is None else "frequency"
        plans.append(
            TablePlan(name, [t.feature.name], t.feature.cardinality, blocks, row_order, remap)
        )
    return DimensionPlan(cfg.dim, plans, policy=to_dict(cfg), notes=notes)


def _block_table(feature: SparseFeature, cfg: EmbeddingsConfig, counts: IdCounts | None) -> BlockedTable:
    n = feature.cardinality
    if cfg.mde.mode == "across":
        # Without counts, assume one lookup per table per example: p_i proportional to 1/n_i.
        total = 1.0 if counts is None else float(counts.total(_known(counts, feature)))
        return BlockedTable(feature, [0, n], np.array([total]), None)
    if counts is None:
        raise PlanError(
            f"embeddings.mde.mode within ranks rows by training frequency: feature {feature.name!r} "
            "needs id counts (run `embshard data profile`)"
        )
    c = _counts(counts, feature)
    ranks = frequency_ranking(c)
    ranked = np.empty_like(c)
    ranked[ranks] = c
    bounds = equipartition(ranked, min(cfg.mde.blocks, n))
    lookups = np.add.reduceat(ranked, bounds[:-1]).astype(np.float64)
    # One block needs no reordering: rows keep their ids and no remap file is written.
    return BlockedTable(feature, bounds, lookups, ranks if len(bounds) > 2 else None)


def _known(counts: Mapping[str, np.ndarray], feature: SparseFeature) -> str:
    if feature.name not in counts:
        raise PlanError(f"id counts: no entry for feature {feature.name!r}")
    return feature.name


def _counts(counts: Mapping[str, np.ndarray], feature: SparseFeature) -> np.ndarray:
    c = np.asarray(counts[_known(counts, feature)])
    if c.shape != (feature.cardinality,) or not np.issubdtype(c.dtype, np.integer):
        raise PlanError(
            f"id counts for {feature.name!r}: expected {feature.cardinality} integers, "
            f"got {c.dtype} {c.shape}"
        )
    if len(c) and c.min() < 0:
        raise PlanError(f"id counts for {feature.name!r}: negative counts")
    return c.astype(np.int64, copy=False)


def _budget(cfg: EmbeddingsConfig) -> int | None:
    if cfg.mde.budget_bytes is not None:
        return cfg.mde.budget_bytes // BYTES_PER_PARAM
    return cfg.mde.budget_params


def _round(p: np.ndarray, lam: float, cfg: EmbeddingsConfig) -> list[Rounded]:
    return [round_width(x, cfg.rounding, cfg.min_dim, cfg.dim) for x in mde_dims(p, cfg.mde.alpha, lam)]


def _widths(p: np.ndarray, lam: float, cfg: EmbeddingsConfig) -> np.ndarray:
    """`_round`'s values, every block at once (the solver tries a hundred lambdas)."""
    return np.clip(nearest_widths(mde_dims(p, cfg.mde.alpha, lam), cfg.rounding), cfg.min_dim, cfg.dim)


def _fit_budget(
    p: np.ndarray, rows: np.ndarray, budget: int, cfg: EmbeddingsConfig
) -> tuple[float, list[Rounded], np.ndarray, list[str]]:
    """Solve lambda so the rounded plan lands in [LANDING * budget, budget] serving parameters.

    1. Bisection on log(lambda) for the largest lambda whose rounded dims fit the budget (rounding
       makes the parameter count a step function of lambda, so the step can overshoot the window).
    2. If that plan is below the window, grow one block by one rounding step at a time, taking
       the largest step that still fits (coarse steps first, so the fine ones are left to close
       the gap) but never making a block wider than a more popular one: d stays monotone in p,
       as Alg. 3 has it. Stop when the plan lands.
    3. If no single step fits before it does, search the whole grid (`_search_grid`); PlanError
       naming the nearest reachable plans if that finds none either.
    """
    what = f"budget of {budget:,} params" + (
        f" ({cfg.mde.budget_bytes:,} bytes of fp32)" if cfg.mde.budget_bytes is not None else ""
    )
    floor = serve_params(rows, np.full(len(rows), cfg.min_dim), cfg.dim)
    ceiling = serve_params(rows, np.full(len(rows), cfg.dim), cfg.dim)
    if budget < floor:
        raise PlanError(
            f"embeddings: {what} is below the smallest MDE plan, {floor:,} params with every "
            f"block at min_dim {cfg.min_dim}; raise the budget or lower min_dim"
        )
    if ceiling < LANDING * budget:
        raise PlanError(
            f"embeddings: {what} is above the largest MDE plan, {ceiling:,} params with every "
            f"block at dim {cfg.dim} (the base dim caps every block); raise dim or lower the budget"
        )

    def params_at(lam: float) -> int:
        return serve_params(rows, _widths(p, lam, cfg), cfg.dim)

    live = p[p > 0]
    lo = cfg.min_dim / float(live.max()) ** cfg.mde.alpha / 2  # every block at min_dim
    hi = cfg.dim / float(live.min()) ** cfg.mde.alpha * 2  # every popular block at dim
    if params_at(hi) <= budget:
        lo = hi
    else:
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if params_at(mid) <= budget else (lo, mid)
    rounded = _round(p, lo, cfg)
    dims = np.array([r.value for r in rounded], dtype=np.int64)
    params = serve_params(rows, dims, cfg.dim)

    # Fill: dims are non-increasing in popularity order; keep it so while growing. Each step
    # weighs every block at once: the largest step that fits, the most popular of equals.
    order = np.argsort(-p, kind="stable")
    ranked, ranked_rows = dims[order], rows[order].astype(np.int64)

    def step_costs(at: slice | int) -> tuple[np.ndarray, np.ndarray]:
        grown = step_up(ranked[at], cfg.rounding)
        return grown, block_cost(ranked_rows[at], grown, cfg.dim) - block_cost(ranked_rows[at], ranked[at], cfg.dim)

    grown, delta = step_costs(slice(None))
    while params < LANDING * budget:
        caps = np.concatenate([[cfg.dim], ranked[:-1]])
        fits = (grown <= caps) & (params + delta <= budget)
        if not fits.any():
            return lo, rounded, *_search_grid(p, rows, budget, lo, cfg, what)
        k = int(np.argmax(np.where(fits, delta, np.iinfo(np.int64).min)))
        ranked[k] = grown[k]
        params += int(delta[k])
        grown[k], delta[k] = step_costs(k)  # only block k's next step changed
    dims[order] = ranked
    notes = [f"mde {cfg.mde.mode}: lambda = {lo:.4g} solved for the {what}: plan has "
             f"{params:,} serving params ({params / budget:.2%} of the budget)"]
    return lo, rounded, dims, notes


def _search_grid(
    p: np.ndarray, rows: np.ndarray, budget: int, lam: float, cfg: EmbeddingsConfig, what: str
) -> tuple[np.ndarray, list[str]]:
    """When growing alone cannot land, search steps up and down over the whole rounding grid.

    Few, large tables make every single step move the total by percents (MovieLens-100K at
    multiple4), yet a mix of steps up and down can land; if none can, say which budgets can.
    """
    raw = np.clip(mde_dims(p, cfg.mde.alpha, lam), cfg.min_dim, cfg.dim)
    widths = grid_widths(cfg.min_dim, cfg.dim, cfg.rounding)
    fit = fit_on_grid(
        p, raw, lambda n, d: block_cost(n, d, cfg.dim), rows, widths, LANDING * budget, budget
    )
    if fit.dims is None or fit.params is None:  # both None together: nothing landed
        near = [f"{t:,} params (budgets {t:,} to {math.floor(t / LANDING):,} land)"
                for t in (fit.below, fit.above) if t is not None]
        raise PlanError(
            f"embeddings: cannot land within 1% of the {what} with rounding {cfg.rounding}: a "
            f"search of its grid (widths {widths[0]}..{widths[-1]}, non-increasing in popularity) "
            f"found no MDE plan with {math.ceil(LANDING * budget):,} to {budget:,} params; the "
            f"nearest plans have {' and '.join(near) or 'none found'}; set the budget "
            f"(mde.budget_params, or {BYTES_PER_PARAM}x that in mde.budget_bytes) in one of those ranges"
        )
    notes = [f"mde {cfg.mde.mode}: lambda = {lam:.4g} solved for the {what}, then the rounded widths "
             f"nearest a rounding boundary moved one way or the other: plan has {fit.params:,} "
             f"serving params ({fit.params / budget:.2%} of the budget)"]
    return fit.dims, notes
