"""Sizes as a person reads them, shared by the planner's memory figures and the dataset writer."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1.5 MiB, 80.0 GiB: a size in the unit that keeps its digits (a fixed GiB printed 0.00)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
