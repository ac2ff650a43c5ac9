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
approximate; every candidate is rebuilt and its exact total checked before it is returned. The
window's ends are bucket edges: a bucket that straddled one kept the assignment of least deviation,
which could be the one outside, so budgets a plan on the grid meets were refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embshard.planner.rounding import RoundingRule, step_up

# Totals above this multiple of the budget are never needed: they only serve to name the
# nearest reachable total above the budget.
_SPAN = 1.25
# Bound on the back-pointer tables (blocks x grid widths x buckets; 6 bytes a cell): 48 MB.
_CELLS = 8_000_000
# A few tables get as many buckets as the cells allow: a bucket merges partial totals, so wide
# ones lost exact plans ((16, 8, 4) on three equal tables merged with (12, 12) and overshot).
_MAX_BUCKETS = 1 << 20
_MIN_BUCKETS = 512


@dataclass(frozen=True)
class GridFit:
    dims: np.ndarray | None  # widths per block (input order) that land; None when none found
    params: int | None  # their exact total
    below: int | None  # largest total found under the window (when nothing lands)
    above: int | None  # smallest total found over the budget (when nothing lands)


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
    is one block's parameter count. Of the landing assignments the search keeps, it returns the
    one with the least sum |width - raw|.
    """
    order = np.argsort(-p, kind="stable")
    n, g = len(order), len(widths)
    # Bucket of total t: low + i * window / inside for integer i, in integers (exact edges).
    low = int(np.ceil(low))
    window = budget + 1 - low
    about = int(np.clip(_CELLS // max(1, n * g), _MIN_BUCKETS, _MAX_BUCKETS))
    inside = max(1, round(window * about / (_SPAN * budget)))
    below = -(-low * inside // window)  # buckets under the window, from total 0

    def bucket_of(t: np.ndarray) -> np.ndarray:
        return (t - low) * inside // window + below

    buckets = int(bucket_of(np.array(int(_SPAN * budget)))) + 1
    exact = np.array([[cost(int(rows[i]), w) for w in widths] for i in order], dtype=np.int64)
    dev = np.abs(np.array(widths, dtype=np.float64)[None, :] - raw[order][:, None])

    # Cell (j, b) keeps one assignment of the blocks so far, the last at widths[j], with an exact
    # total in bucket b: the one with the least deviation. Exact totals, so no rounding error
    # builds up over many blocks; only assignments sharing a cell are merged.
    best = np.full((g, buckets), np.inf)
    total = np.zeros((g, buckets), dtype=np.int64)
    back_width = np.zeros((n, g, buckets), dtype=np.int16)
    back_bucket = np.zeros((n, g, buckets), dtype=np.int32)

    def place(k: int, j: int, devs: np.ndarray, totals: np.ndarray, width_from, bucket_from) -> None:
        target = bucket_of(totals)
        ok = target < buckets
        target, devs, totals = target[ok], devs[ok], totals[ok]
        width_from, bucket_from = width_from[ok], bucket_from[ok]
        first = np.lexsort((devs, target))
        keep = first[np.unique(target[first], return_index=True)[1]]  # least deviation per cell
        best[j, target[keep]] = devs[keep]
        total[j, target[keep]] = totals[keep]
        back_width[k, j, target[keep]] = width_from[keep]
        back_bucket[k, j, target[keep]] = bucket_from[keep]

    zero = np.zeros(1, dtype=np.int64)
    for j in range(g):
        place(0, j, dev[0, j : j + 1], exact[0, j : j + 1], zero, zero)
    for k in range(1, n):
        prev_best, prev_total = best, total
        best = np.full((g, buckets), np.inf)
        total = np.zeros((g, buckets), dtype=np.int64)
        # The previous block may be any width >= this one's: running minimum from the widest.
        suffix = np.full(buckets, np.inf)
        suffix_total = np.zeros(buckets, dtype=np.int64)
        suffix_width = np.zeros(buckets, dtype=np.int64)
        for j in range(g - 1, -1, -1):
            better = prev_best[j] < suffix
            suffix = np.where(better, prev_best[j], suffix)
            suffix_total = np.where(better, prev_total[j], suffix_total)
            suffix_width = np.where(better, j, suffix_width)
            live = np.flatnonzero(np.isfinite(suffix))
            place(k, j, suffix[live] + dev[k, j], suffix_total[live] + exact[k, j],
                  suffix_width[live], live)

    def rebuild(j: int, b: int) -> np.ndarray:
        chosen = np.empty(n, dtype=np.int64)
        for k in range(n - 1, -1, -1):
            chosen[k] = j
            j, b = int(back_width[k, j, b]), int(back_bucket[k, j, b])
        dims = np.empty(n, dtype=np.int64)
        dims[order] = np.array(widths)[chosen]
        return dims

    live = np.isfinite(best)
    landing = live & (total >= low) & (total <= budget)
    if landing.any():
        at = np.unravel_index(np.argmin(np.where(landing, best, np.inf)), best.shape)
        j, b = int(at[0]), int(at[1])
        return GridFit(rebuild(j, b), int(total[j, b]), None, None)
    under, over = total[live & (total < low)], total[live & (total > budget)]
    return GridFit(
        None,
        None,
        int(under.max()) if under.size else None,
        int(over.min()) if over.size else None,
    )
