"""`pep:` section of a job config: the PEP prune run and its lottery-ticket retrain."""

from __future__ import annotations

from dataclasses import dataclass, field

from embshard.errors import ConfigError
from embshard.sharding.pep import GRANULARITIES, Granularity


@dataclass
class PepConfig:
    # dimension: the granularity whose thresholds rise under their own Adam on any device (the
    # paper's best, feature_dimension, needs a fused optimizer with weight decay: see weight_decay).
    granularity: Granularity = "dimension"
    # sigmoid(s_init) is the starting threshold: the paper uses -15 (MovieLens), -150 (Criteo,
    # Avazu), i.e. nothing is pruned at first.
    s_init: float = -15.0
    # Learning rate of the dense thresholds (global / dimension granularity), trained with their
    # own Adam: s rises about this much per step while the decay dominates, so from -15 the
    # first entries fall after ~200 steps. (The reference: 1e-3 over hundreds of epochs.) Row
    # thresholds (feature / feature_dimension) share their row's fused optimizer and
    # train.sparse_lr.
    threshold_lr: float = 0.05
    # L2 on s. It is what raises the thresholds: at s = -15 the loss gradient on s is scaled by
    # sigmoid'(s) ~ 3e-7, so a decay pulling s toward 0 dominates until the threshold starts
    # cutting entries the loss needs. (The reference implementation decays every parameter with
    # Adam at 1e-5 over hundreds of epochs; 1e-3 reaches the targets within ~2 epochs on
    # MovieLens-1M, bench/QUALITY.md.) Dense thresholds (global, dimension) decay alone under
    # their Adam. Row thresholds share their row's fused optimizer, so the decay applies to the
    # whole [V | s] row, as in the reference, and needs rowwise_adagrad or adam (CUDA only); but
    # FBGEMM's CPU row-wise Adagrad ignores it (tests/test_pep.py), so on CPU feature-wise
    # thresholds barely rise.
    weight_decay: float = 1e-3
    # Fractions of the dense embedding parameters to keep; a mask and a decisions file are written
    # the first time the non-zero count falls to each (one run, several targets).
    targets: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.1, 0.03])
    # Single-hot tables through the pooled EmbeddingBagCollection (exact: a one-row bag is its row;
    # about twice as fast); false: every table through the unpooled EmbeddingCollection, which
    # can also shard row-wise on CPU.
    pooled_lookup: bool = True
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
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.count_every < 1:
            raise ConfigError(f"count_every: must be >= 1, got {self.count_every}")
        if self.retrain_target is not None and not 0 < self.retrain_target < 1:
            raise ConfigError(f"retrain_target: expected a fraction in (0, 1), got {self.retrain_target}")


def target_dir_name(target: float) -> str:
    return f"target-{target:g}"
