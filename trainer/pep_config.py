"""`pep:` section of a job config: the PEP prune run and its lottery-ticket retrain."""

from __future__ import annotations

from dataclasses import dataclass, field

from embshard.errors import ConfigError
from embshard.sharding.pep import GRANULARITIES, Granularity


@dataclass
class PepConfig:
    granularity: Granularity = "feature_dimension"
    # sigmoid(s_init) is the starting threshold: the paper uses -15 (MovieLens), -150 (Criteo,
    # Avazu), i.e. nothing is pruned at first.
    s_init: float = -15.0
    # Learning rate of the dense thresholds (global / dimension granularity), trained with their
    # own Adam: the dense arch's rate would take tens of thousands of steps to move s from s_init.
    # Row thresholds (feature / feature_dimension) share their row's fused optimizer and
    # train.sparse_lr.
    threshold_lr: float = 0.01
    # Fractions of the dense embedding parameters to keep; a mask and a decisions file are written
    # the first time the non-zero count falls to each (one run, several targets).
    targets: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.1, 0.03])
    count_every: int = 20  # steps between global non-zero counts (each reads every local shard)
    out: str | None = None  # masks, decisions, run record; None = <output_dir>/pep
    retrain_target: float | None = None  # lottery retrain: the saved target whose mask it keeps

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise ConfigError(f"targets: expected fractions in (0, 1), got {self.targets}")
        if self.threshold_lr <= 0:
            raise ConfigError(f"threshold_lr: must be positive, got {self.threshold_lr}")
        if self.count_every < 1:
            raise ConfigError(f"count_every: must be >= 1, got {self.count_every}")
        if self.retrain_target is not None and not 0 < self.retrain_target < 1:
            raise ConfigError(f"retrain_target: expected a fraction in (0, 1), got {self.retrain_target}")


def target_dir_name(target: float) -> str:
    return f"target-{target:g}"
