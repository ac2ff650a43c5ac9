"""What a plan's block tables need against what a topology holds, and the error that says by how much.

The figures are fp32 weights plus the sparse optimizer's state: the floor every sharding pays.
TorchRec's own estimate adds kernel buffers on top, so a plan above this floor can never be
placed and is refused before TorchRec searches for minutes to find that out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner.types import Topology

from embshard.errors import PlanError
from embshard.planner.optimizers import BYTES_PER_ELEMENT, SparseOptimizer, optimizer_state_elements
from embshard.planner.topology import TopologySpec
from embshard.units import human_bytes

# Share of each rank's HBM held back from embedding tables for dense parameters, activations and
# input batches. TorchRec's heuristic reservation uses the same share but adds an estimate of
# dense tensors that over-counts on meta-device modules (its own FutureWarning says so). TorchRec
# reserves HBM only: host DDR (CPU ranks) is offered whole.
RESERVED_FRACTION = 0.15


def table_train_bytes(config: EmbeddingBagConfig, optimizer: SparseOptimizer) -> int:
    """Training bytes of one whole block table: weights plus optimizer state."""
    rows, width = config.num_embeddings, config.embedding_dim
    return (rows * width + optimizer_state_elements(optimizer, rows, width)) * BYTES_PER_ELEMENT


@dataclass(frozen=True)
class Demand:
    """Training bytes per block table, largest first, for one optimizer."""

    sizes: list[tuple[str, int]]  # (block table, bytes), descending
    optimizer: SparseOptimizer

    @staticmethod
    def of(configs: list[EmbeddingBagConfig], optimizer: SparseOptimizer) -> "Demand":
        sizes = sorted(((c.name, table_train_bytes(c, optimizer)) for c in configs), key=lambda s: -s[1])
        return Demand(sizes, optimizer)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.sizes)

    def largest(self, n: int = 3) -> str:
        return ", ".join(f"{name} ({human_bytes(b)})" for name, b in self.sizes[:n])


def usable_bytes_per_rank(topology: TopologySpec) -> int:
    """A rank's own device memory (HBM on CUDA, DDR on CPU) left to embedding tables."""
    if topology.device == "cuda":
        return int(topology.capacity_bytes * (1 - RESERVED_FRACTION))
    return topology.capacity_bytes


def usable_bytes(torchrec_topology: Topology) -> int:
    """All memory TorchRec may place tables in: reserved HBM (CUDA ranks) plus host DDR (CPU ranks)."""
    return sum(
        int(d.storage.hbm * (1 - RESERVED_FRACTION)) + d.storage.ddr for d in torchrec_topology.devices
    )


def check_can_fit(demand: Demand, topology: TopologySpec, torchrec_topology: Topology) -> None:
    """Refuse at once a plan whose tables exceed every byte the topology offers."""
    available = usable_bytes(torchrec_topology)
    if demand.total > available:
        raise shortfall_error(demand, topology, available)


def shortfall_error(demand: Demand, topology: TopologySpec, available: int) -> PlanError:
    where = (
        f"{topology.world_size} x {topology.device} at {human_bytes(topology.capacity_bytes)} per rank "
        f"({human_bytes(usable_bytes_per_rank(topology))} usable)"
    )
    need = f"weights and {demand.optimizer} state need {human_bytes(demand.total)}"
    if demand.total > available:
        why = (f"{need}, the ranks offer {human_bytes(available)}: "
               f"short by {human_bytes(demand.total - available)}")
    else:
        # Enough bytes in all, but TorchRec found no placement: some table cannot be split finely
        # enough for the ranks it may use, or what TorchRec adds per rank (input and output
        # buffers, batch x width) does not fit beside the tables.
        biggest = demand.sizes[0][1]
        per_rank = usable_bytes_per_rank(topology)
        why = (
            f"{need} of {human_bytes(available)} in all, but TorchRec found no placement; the "
            f"largest table is {human_bytes(biggest)} against {human_bytes(per_rank)} per rank"
            + (f" (short by {human_bytes(biggest - per_rank)} on one rank)" if biggest > per_rank else
               ", so what does not fit is the placement itself: e.g. what TorchRec reserves beside the tables "
               "(buffers of batch x width), or tables that cannot be split under the allowed sharding types")
        )
    return PlanError(
        f"plan does not fit {where}: {why}; largest tables: {demand.largest()}. "
        f"Add ranks or memory, or shrink the dims (MDE budget, PEP)."
    )


