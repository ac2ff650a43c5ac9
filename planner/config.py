"""`embeddings:` section of a job config: which policy decides the embedding dimensions.

Checks here are the ones a config can answer on its own; those that need the dataset (feature
names, counts, budget feasibility) are PlanErrors raised while planning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embshard.errors import ConfigError
from embshard.planner.rounding import RoundingRule, width_problem


# MLET W2 initialisation: the paper draws W2 from a Gaussian N(0, 0.0625). We read 0.0625 as the
# variance (std 0.25): N(mu, sigma^2) notation puts the variance second, and 0.0625 = 0.25^2.
MLET_INIT_STD = 0.25


@dataclass
class MletConfig:
    """Train blocks factorised, W = W1 (n x k) . W2 (k x d), collapsed to n x d for serving."""

    ratio: float | None = None  # k = round(ratio * d) per block
    width: int | None = None  # the same k for every block
    features: list[str] | None = None  # sparse features trained with MLET; None = all
    init_std: float = MLET_INIT_STD  # W2 ~ N(0, init_std^2)
    # Checkpoints also keep W1 (as training state, never served) so a resume is bit-exact
    # instead of restarting from the minimum-norm W1 = W . pinv(W2).
    exact_resume: bool = False

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.width is None):
            raise ConfigError("ratio: set exactly one of mlet.ratio or mlet.width")
        # k < d caps the rank of W1.W2 at k, so it cannot represent every n x d table
        # (MLET paper, Theorem 2.2): only widening factorisations are useful.
        if self.ratio is not None and self.ratio < 1:
            raise ConfigError(
                f"ratio: {self.ratio} < 1 gives k < d, which shrinks the space of tables the "
                "factorisation can represent (MLET paper, Theorem 2.2); use ratio >= 1"
            )
        if self.width is not None and self.width < 1:
            raise ConfigError(f"width: must be positive, got {self.width}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std: must be positive, got {self.init_std}")


@dataclass
class EmbeddingsConfig:
    policy: Literal["uniform", "mde", "decisions"] = "uniform"  # uniform: dim everywhere; mde: by popularity
    dim: int = 16  # base dim d-bar: the width every feature reaches the model at
    alpha: float = 0.3  # MDE temperature: 0 = uniform dims, 1 = dims proportional to popularity
    mode: Literal["within", "across"] = "across"  # MDE: blocks inside each table, or one per table
    blocks: int = 8  # MDE within-table mode: blocks per table (k)
    budget_params: int | None = None  # MDE: serving parameters to aim for (instead of dim's lambda)
    budget_bytes: int | None = None  # MDE: the same budget in bytes of fp32 parameters
    decisions: str | None = None  # decisions file (policy: decisions), written by AutoDim / PEP
    rounding: RoundingRule = "multiple4"  # how widths are rounded; FBGEMM's fused kernels need multiples of 4
    min_dim: int = 4  # no block is narrower than this
    mlet: MletConfig | None = None  # train blocks factorised (MLET); null = plain tables

    def __post_init__(self) -> None:
        for name in ("dim", "min_dim"):
            problem = width_problem(getattr(self, name), self.rounding)
            if problem:
                raise ConfigError(f"{name}: {problem}")
        if self.min_dim > self.dim:
            raise ConfigError(f"min_dim: {self.min_dim} is above dim {self.dim}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.blocks < 1:
            raise ConfigError(f"blocks: must be >= 1, got {self.blocks}")
        if self.budget_params is not None and self.budget_bytes is not None:
            raise ConfigError("budget_bytes: set budget_params or budget_bytes, not both")
        for name in ("budget_params", "budget_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
            if value is not None and self.policy != "mde":
                raise ConfigError(
                    f"{name}: only policy mde takes a budget (policy is {self.policy})"
                )
        if self.policy == "decisions" and not self.decisions:
            raise ConfigError("decisions: policy decisions needs the path of a decisions file")
        if self.policy != "decisions" and self.decisions:
            raise ConfigError(f"decisions: only read by policy decisions (policy is {self.policy})")
