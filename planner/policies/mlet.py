"""MLET on top of any plan: blocks trained factorised, W1 (n x k) . W2 (k x d), served as n x d.

Orthogonal to how `dim` was chosen, so it runs after every policy and method. A width k < d is
refused by the plan's own validation (MLET paper, Theorem 2.2).
"""

from __future__ import annotations

import dataclasses

from embshard.config import MletConfig
from embshard.errors import ConfigError, PlanError
from embshard.planner.rounding import MAX_DIM, RoundingRule, round_width
from embshard.planner.types import DimensionPlan


def apply_mlet(plan: DimensionPlan, mlet: MletConfig, rule: RoundingRule) -> DimensionPlan:
    known = {f for t in plan.tables for f in t.features}
    chosen = known if mlet.features is None else set(mlet.features)
    unknown = sorted(chosen - known)
    if unknown:
        raise PlanError(
            f"embeddings.mlet.features: no sparse feature {unknown[0]!r} "
            f"(have {', '.join(sorted(known))})"
        )
    notes = list(plan.notes)
    tables = []
    for t in plan.tables:
        if not chosen & set(t.features):
            tables.append(t)
            continue
        blocks = []
        for i, b in enumerate(t.blocks):
            if b.mlet_width is not None:  # a method that factorised the block itself keeps its k
                blocks.append(b)
                continue
            raw: float
            setting: dict[str, float]
            if mlet.ratio is not None:
                raw, setting = b.dim * mlet.ratio, {"ratio": mlet.ratio}
            elif mlet.width is not None:
                if mlet.width < b.dim:  # said here, before rounding makes it another number
                    raise ConfigError(
                        f"embeddings.mlet.width: {mlet.width} < d = {b.dim} (table {t.name!r} block {i}): "
                        f"k < d caps the rank of W1.W2 at k (MLET paper, Theorem 2.2); use a width >= {b.dim}")
                raw, setting = mlet.width, {"width": mlet.width}
            else:  # MletConfig.__post_init__ refuses this already; this narrows the types
                raise ConfigError("embeddings.mlet.ratio: set exactly one of mlet.ratio or mlet.width")
            if raw > MAX_DIM:  # said before rounding: it overflowed to k = 1 there ("k=1 < d")
                key = next(iter(setting))
                # Past 24 digits as a power of ten: ratio 1e300 printed a k of 300 digits.
                shown = f"{raw:,.0f}" if raw < 1e24 else f"{raw:.3g}"
                raise ConfigError(f"embeddings.mlet.{key}: {setting[key]:g} gives k = {shown} for table "
                                  f"{t.name!r} block {i} (d = {b.dim}); at most {MAX_DIM:,}")
            width = round_width(raw, rule, lo=1)
            if width.note:
                notes.append(f"{t.name} block {i} mlet width: {width.note}")
            source = {**b.source, "mlet": setting}
            blocks.append(dataclasses.replace(b, mlet_width=width.value, source=source))
        tables.append(dataclasses.replace(t, blocks=blocks))
    return dataclasses.replace(plan, tables=tables, notes=notes)
