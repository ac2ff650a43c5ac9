"""The fused sparse optimizers embshard trains embeddings with, and the state each one keeps.

The state size matters twice: TorchRec's planner sizes shards with it, and the memory report
prints it. One table here keeps both in step.
"""

from __future__ import annotations

import torch
from torchrec.optim import RowWiseAdagrad

from embshard.config import SparseOptimizer

BYTES_PER_ELEMENT = 4  # fp32 weights and optimizer state

# Optimizer state per embedding row, in multiples of (row width, 1): Adagrad keeps a full
# accumulator per element, row-wise Adagrad one scalar per row, Adam two moments per element.
STATE_PER_ROW: dict[str, tuple[int, int]] = {
    "sgd": (0, 0),
    "rowwise_adagrad": (0, 1),
    "adagrad": (1, 0),
    "adam": (2, 0),
}


def torch_optimizer_class(name: SparseOptimizer) -> type[torch.optim.Optimizer]:
    return {
        "sgd": torch.optim.SGD,
        "rowwise_adagrad": RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "adam": torch.optim.Adam,
    }[name]


def optimizer_state_elements(name: SparseOptimizer, rows: int, width: int) -> int:
    per_width, per_row = STATE_PER_ROW[name]
    return rows * (per_width * width + per_row)
