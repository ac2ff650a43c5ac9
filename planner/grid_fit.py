"""Pick one rounded width per block so a plan's parameter count lands in a window.

MDE's budget solver (policies/mde.py) first solves lambda and rounds; with few, large tables
every single rounding step moves the total by several percent, so no lambda lands in the 1%
window even though a mix of steps up and down would. This module searches that mix: a dynamic
programme over blocks in popularity order whose state is (width of the previous block, parameter
total), so every assignment it considers keeps widths on the rounding grid, inside
[min_dim, base dim] and non-increasing in popularity (Alg. 3's monotonicity). Among assignments
that land it takes the one closest to the unrounded Alg. 3 widths, so the blocks nearest a
rounding boundary are the ones that move.

Totals are kept in buckets (a fixed number per plan, to bound memory), so a bucket's total is
approximate; every candidate is rebuilt and its exact total checked before it is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embshard.planner.rounding import RoundingRule, step_up

# Totals above this multiple of the budget are never needed: they only serve to name the
# nearest reachable total above the budget.
_SPAN = 1.25
# Bound on the back-pointer table (blocks x grid widths x buckets, int16): 16M cells = 32 MB.
_CELLS = 16_000_000
_MAX_BUCKETS = 8192
_MIN_BUCKETS = 512
_TRIES = 64  # candidate buckets rebuilt and checked exactly before giving up on one side


@dataclass(frozen=True)
class GridFit:
    dims: np.ndarray | None  # widths per block (input order) that land; None when none found
    params: int | None  # their exact total
    below: int | None  # largest exact total found under the window (when nothing lands)
    above: int | None  # smallest exact total found over the budget (when nothing lands)


def grid_widths(lo: int, hi: int, rule: RoundingRule) -> list[int]:
    widths = [lo]
    while step_up(widths[-1], rule) <= hi:
        widths.append(step_up(widths[-1], rule))
    return widths


def fit_on_grid(
    p: np.ndarray,
    raw: np.ndarray,
    cost: Callable[[int, int], int],
    rows: np.ndarray,
    widths: list[int],
    low: float,
    budget: int,
) -> GridFit:
    """Widths for blocks with popularity `p` whose total cost lies in [low, budget].

    `raw` holds the unrounded widths (already clipped to the grid's range); `cost(rows, width)`
    is one block's parameter count. The assignment minimises sum |width - raw| over all landing
    ones the bucketed search sees.
    """
    order = np.argsort(-p, kind="stable")
    n, g = len(order), len(widths)
    buckets = int(np.clip(_CELLS // max(1, n * g), _MIN_BUCKETS, _MAX_BUCKETS))
    unit = max(1.0, _SPAN * budget / buckets)
    exact = np.array([[cost(int(rows[i]), w) for w in widths] for i in order], dtype=np.int64)
    steps = np.rint(exact / unit).astype(np.int64)
    dev = np.abs(np.array(widths, dtype=np.float64)[None, :] - raw[order][:, None])

    # best[j, b]: least deviation of the blocks so far, the last one at widths[j], total bucket b.
    best = np.full((g, buckets), np.inf)
    back = np.zeros((n, g, buckets), dtype=np.int16)  # the previous block's width index
    for j in range(g):
        if steps[0, j] < buckets:
            best[j, steps[0, j]] = dev[0, j]
    for k in range(1, n):
        # The previous block may be any width >= this one's: suffix minimum over width indices.
        suffix, arg = best[g - 1].copy(), np.full(buckets, g - 1, dtype=np.int16)
        shifted = np.full((g, buckets), np.inf)
        for j in range(g - 1, -1, -1):
            better = best[j] < suffix
            suffix = np.where(better, best[j], suffix)
            arg = np.where(better, j, arg)
            s = steps[k, j]
            if s < buckets:
                shifted[j, s:] = suffix[: buckets - s] + dev[k, j]
                back[k, j, s:] = arg[: buckets - s]
        best = shifted

    def rebuild(j: int, b: int) -> tuple[np.ndarray, int]:
        chosen = np.empty(n, dtype=np.int64)
        for k in range(n - 1, -1, -1):
            chosen[k] = j
            prev = int(back[k, j, b])
            b -= int(steps[k, j])
            j = prev
        dims = np.empty(n, dtype=np.int64)
        dims[order] = np.array(widths)[chosen]
        return dims, int(exact[np.arange(n), chosen].sum())

    final = best.min(axis=0)
    state = best.argmin(axis=0)
    live = np.flatnonzero(np.isfinite(final))
    slack = n * unit / 2  # the most the bucket totals can be off by
    window = live[(live * unit >= low - slack) & (live * unit <= budget + slack)]
    for b in window[np.argsort(final[window], kind="stable")][:_TRIES]:
        dims, total = rebuild(int(state[b]), int(b))
        if low <= total <= budget:
            return GridFit(dims, total, None, None)

    def nearest(
        candidates: np.ndarray, keep: Callable[[int], bool], pick: Callable[[list[int]], int]
    ) -> int | None:
        totals = [rebuild(int(state[b]), int(b))[1] for b in candidates[:_TRIES]]
        totals = [t for t in totals if keep(t)]
        return pick(totals) if totals else None

    below = nearest(live[live * unit < low + slack][::-1], lambda t: t < low, max)
    above = nearest(live[live * unit > budget - slack], lambda t: t > budget, min)
    return GridFit(None, None, below, above)
