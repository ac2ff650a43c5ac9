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
from embshard.planner.topology import GIB, TopologySpec

# Share of each rank's HBM held back from embedding tables for dense parameters, activations and
# input batches. TorchRec's heuristic reservation uses the same share but adds an estimate of
# dense tensors that over-counts on meta-device modules (its own FutureWarning says so). TorchRec
# reserves HBM only: host DDR (CPU ranks, UVM tables) is offered whole.
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
        return ", ".join(f"{name} ({b / GIB:.2f} GiB)" for name, b in self.sizes[:n])


def usable_bytes_per_rank(topology: TopologySpec) -> int:
    """A rank's own device memory (HBM on CUDA, DDR on CPU) left to embedding tables."""
    if topology.device == "cuda":
        return int(topology.capacity_bytes * (1 - RESERVED_FRACTION))
    return topology.capacity_bytes


def usable_bytes(torchrec_topology: Topology) -> int:
    """All memory TorchRec may place tables in: reserved HBM plus host DDR (UVM kernels, CPU ranks)."""
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
        f"{topology.world_size} x {topology.device} at {topology.capacity_bytes / GIB:.1f} GiB per rank "
        f"({usable_bytes_per_rank(topology) / GIB:.1f} GiB usable)"
    )
    need = f"weights and {demand.optimizer} state need {demand.total / GIB:.2f} GiB"
    if demand.total > available:
        why = f"{need}, the ranks offer {available / GIB:.2f} GiB: short by {(demand.total - available) / GIB:.2f} GiB"
    else:
        # Enough bytes in all, but TorchRec found no placement: some table cannot be split finely
        # enough for the ranks it may use.
        biggest = demand.sizes[0][1]
        per_rank = usable_bytes_per_rank(topology)
        why = (
            f"{need} of {available / GIB:.2f} GiB in all, but TorchRec found no placement; the "
            f"largest table is {biggest / GIB:.2f} GiB against {per_rank / GIB:.2f} GiB per rank "
            f"(short by {max(biggest - per_rank, 0) / GIB:.2f} GiB on one rank)"
        )
    return PlanError(
        f"plan does not fit {where}: {why}; largest tables: {demand.largest()}. "
        f"Add ranks or memory, or shrink the dims (MDE budget, PEP)."
    )
