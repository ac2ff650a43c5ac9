"""`autodim:` section of a job config: the knobs of an AutoDim dimension search.

Read by `trainer.autodim.search_worker` (and the search's planning step); `embshard train` ignores
it. The retrain after a search is an ordinary `embshard train` with
`embeddings: {policy: decisions, decisions: FILE}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embshard.sharding.autodim import Lookup, Unify

from embshard.errors import ConfigError


@dataclass
class AutodimConfig:
    # Candidate widths per field, ascending; the largest (d_N) is the width every candidate is
    # unified to, so it must equal embeddings.dim (the retrain's base dim).
    candidates: list[int] = field(default_factory=lambda: [2, 8, 16, 24, 32])
    # weight_sharing: one d_N-wide table per field, candidate n reads its first d_n columns;
    # separate: one table per candidate per field.
    lookup: Lookup = "weight_sharing"
    # linear: candidate -> d_N by its own linear transform; zero_pad: pad with zeros to d_N.
    unify: Unify = "linear"
    batchnorm: bool = True  # BatchNorm after unifying, so candidates' magnitudes are comparable
    alpha_every: int = 10  # f: one architecture step per f model steps (bi-level mode)
    pretrain_steps: int = 0  # model steps with the architecture weights held equal
    single_level: bool = False  # AutoDim-s: architecture and model weights on the same train batch
    tau_start: float = 1.0  # Gumbel-softmax temperature tau = max(tau_min, tau_start - tau_decay * t)
    tau_decay: float = 5e-5  # per model step t
    tau_min: float = 0.01  # the floor of tau
    alpha_optimizer: Literal["adam", "sgd"] = "adam"  # optimizer of the architecture weights alpha
    alpha_lr: float = 0.01  # its learning rate
    alpha_weight_decay: float = 0.0  # its weight decay
    decisions: str | None = None  # where the decisions file goes; None = <output_dir>/decisions.json

    def __post_init__(self) -> None:
        if len(self.candidates) < 2:
            raise ConfigError(f"candidates: need at least two widths to choose from, got {self.candidates}")
        if any(d < 1 for d in self.candidates):
            raise ConfigError(f"candidates: widths must be >= 1, got {self.candidates}")
        if list(self.candidates) != sorted(set(self.candidates)):
            raise ConfigError(f"candidates: must be strictly ascending, got {self.candidates}")
        if self.alpha_every < 1:
            raise ConfigError(f"alpha_every: must be >= 1, got {self.alpha_every}")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps: must be >= 0, got {self.pretrain_steps}")
        if not 0 < self.tau_min <= self.tau_start:
            raise ConfigError(f"tau_min: must be in (0, tau_start={self.tau_start}], got {self.tau_min}")
        if self.tau_decay < 0:
            raise ConfigError(f"tau_decay: must be >= 0, got {self.tau_decay}")
        if self.alpha_lr <= 0:
            raise ConfigError(f"alpha_lr: must be positive, got {self.alpha_lr}")
        if self.alpha_weight_decay < 0:
            raise ConfigError(f"alpha_weight_decay: must be >= 0, got {self.alpha_weight_decay}")

    @property
    def max_dim(self) -> int:
        return self.candidates[-1]

    def temperature(self, step: int) -> float:
        """Gumbel-softmax temperature at model step `step` (the paper's linear decay, floored)."""
        return max(self.tau_min, self.tau_start - self.tau_decay * step)
