"""Turn a real-valued embedding width into one the kernels accept, and say what was done.

FBGEMM's fused table-batched embedding (TBE) kernels, which TorchRec uses for every sharded
table, need widths divisible by 4 (4 is also the smallest width they take). `pow2` and
`multiple4` stay on that grid; `none` keeps the nearest integer and flags widths that are not,
so the sharding planner can place those tables on a non-fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

RoundingRule = Literal["pow2", "multiple4", "none"]

FBGEMM_ALIGN = 4  # fused TBE kernels need widths divisible by this, and at least this wide

_WHY = {
    "pow2": "pow2, nearest power of two",
    "multiple4": f"multiple4, FBGEMM needs widths divisible by {FBGEMM_ALIGN}",
    "none": "none, nearest integer",
}


@dataclass(frozen=True)
class Rounded:
    value: int
    note: str | None  # None when there is nothing a user needs to know


# The widest block a config or decisions file may give: far above any embedding (a bound of
# policy, as model.dense_arch has), far below where the rounding to the width grid overflows int64.
MAX_DIM = 1 << 24


def width_problem(width: int, rule: RoundingRule) -> str | None:
    """Why `width` is not on `rule`'s grid (None if it is); config checks use this for dims."""
    if width < 1:
        return f"must be positive, got {width}"
    if width > MAX_DIM:  # embeddings.dim 2**63 was a table's "dim must be positive" in MDE's rounding
        return f"at most {MAX_DIM:,}, got {width:,}"
    if rule == "multiple4" and width % FBGEMM_ALIGN:
        return f"{width} is not a multiple of {FBGEMM_ALIGN} (rounding: multiple4; FBGEMM needs it)"
    if rule == "pow2" and (width < FBGEMM_ALIGN or width & (width - 1)):
        return f"{width} is not a power of two >= {FBGEMM_ALIGN} (rounding: pow2)"
    return None


def nearest(raw: float, rule: RoundingRule) -> int:
    """Nearest width on the rule's grid (ties go up: a wider block never costs accuracy)."""
    return int(nearest_widths(np.array([raw], dtype=np.float64), rule)[0])


def nearest_widths(raw: np.ndarray, rule: RoundingRule) -> np.ndarray:
    """`nearest` of every value at once."""
    # lambda * p^alpha lands on a tie (a half or whole number on every grid) only up to float
    # error, and 5.999999999999999 would round down to 4 where 6 goes up to 8: noise must not
    # decide a tie.
    half = np.round(raw * 2) / 2
    raw = np.where(np.isclose(raw, half, rtol=1e-9, atol=0.0), half, raw)
    if rule == "multiple4":
        return np.maximum(FBGEMM_ALIGN, FBGEMM_ALIGN * np.floor(raw / FBGEMM_ALIGN + 0.5)).astype(np.int64)
    if rule == "pow2":
        lo = 2.0 ** np.maximum(2, np.floor(np.log2(np.maximum(raw, 1.0))))
        return np.where(raw - lo < 2 * lo - raw, lo, 2 * lo).astype(np.int64)
    return np.maximum(1, np.floor(raw + 0.5)).astype(np.int64)


W = TypeVar("W", int, np.ndarray)


def step_up(width: W, rule: RoundingRule) -> W:
    """The next width above `width` (or each of an array) on the rule's grid (budget filling grows
    one step at a time)."""
    if rule == "multiple4":
        return width + FBGEMM_ALIGN
    if rule == "pow2":
        return width * 2
    return width + 1


def round_width(raw: float, rule: RoundingRule, lo: int, hi: int | None = None) -> Rounded:
    """Round `raw` by `rule`, then clamp to [lo, hi]; lo and hi must be on the rule's grid."""
    value = nearest(raw, rule)
    reasons = [_WHY[rule]]
    if value < lo:
        value = lo
        reasons.append(f"raised to min_dim {lo}")
    if hi is not None and value > hi:
        value = hi
        reasons.append(f"capped at base dim {hi}")
    if value % FBGEMM_ALIGN:
        reasons.append(
            f"not divisible by {FBGEMM_ALIGN}: FBGEMM's fused kernels cannot take it, the sharding "
            "planner must use a non-fused kernel"
        )
    elif math.isclose(raw, value, rel_tol=1e-9):  # lambda * p^alpha is exact only up to float error
        return Rounded(value, None)
    return Rounded(value, f"{raw:.4g} -> {value} ({'; '.join(reasons)})")
