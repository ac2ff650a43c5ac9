"""Figures as a person reads them: sizes (the planner's memory figures, the dataset writer),
durations (a sweep's trials) and an evaluation's metrics (progress bars, the console's summary
lines)."""

from __future__ import annotations

from collections.abc import Mapping


def human_bytes(n: float) -> str:
    """1.5 MiB, 80.0 GiB: a size in the unit that keeps its digits (a fixed GiB printed 0.00)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def duration_text(seconds: float) -> str:
    """"48 s", "5 min 2 s", "1 h 7 min": whole seconds, in the two largest units it has."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def metrics_text(metrics: Mapping[str, float | None], primary: str) -> str:
    """"AUC 0.7612, logloss 0.4701": the primary metric first, "n/a" for one not measured."""
    names = [primary, *(k for k in metrics if k != primary)]
    return ", ".join(f"{'AUC' if k == 'auc' else k} {'n/a' if metrics.get(k) is None else format(metrics[k], '.4f')}"
                     for k in names)
