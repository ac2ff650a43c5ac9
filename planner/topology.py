"""The hardware a plan is made for, described without touching any hardware.

`embshard plan --world-size 64 --device cuda --device-memory-gb 80` runs on a laptop: the
topology is a description handed to TorchRec's planner, never a probe of local devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    Topology,
    TopologyFactory,
    TrainerConfig,
)

from embshard.config import device_memory_problem
from embshard.errors import ConfigError

GIB = 1024**3
# Per-rank capacities assumed when the user gives none. CPU ranks share host DRAM; 16 GiB per
# rank is a conservative laptop/CI figure. CUDA ranks default to an 80 GiB H100/A100.
DEFAULT_CPU_MEMORY_GB = 16.0
DEFAULT_CUDA_MEMORY_GB = 80.0

# Sharding types TorchRec's EmbeddingBagCollection trains correctly per device. Measured here on
# CPU: row-wise and grid need CUDA kernels, and data-parallel tables use FBGEMM's dense lookup,
# which has no CPU autograd kernel, so their rows silently never update (torch warns
# "an autograd kernel was not registered"); on CPU they are left out.
SHARDING_TYPES: dict[str, list[str]] = {
    "cpu": ["table_wise", "column_wise", "table_column_wise"],
    "cuda": [
        "table_wise",
        "row_wise",
        "column_wise",
        "table_row_wise",
        "table_column_wise",
        "data_parallel",
    ],
}


# torch.device keeps its index in 8 bits, so cuda:127 is the last a host's ranks can be given.
_CUDA_DEVICES_PER_HOST = 128


@dataclass(frozen=True)
class TopologySpec:
    world_size: int = 2
    device: Literal["cpu", "cuda"] = "cpu"
    device_memory_gb: float | None = None  # per rank; None -> the device default above
    local_world_size: int | None = None  # ranks per host; None -> all on one host

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size: must be >= 1, got {self.world_size}")
        problem = device_memory_problem(self.device_memory_gb)
        if problem:
            raise ConfigError(f"device_memory_gb: {problem}")
        if self.local_world_size is not None and not (
            1 <= self.local_world_size <= self.world_size
            and self.world_size % self.local_world_size == 0
        ):
            raise ConfigError(
                f"local_world_size: {self.local_world_size} must divide world_size {self.world_size}"
            )
        per_host = self.local_world_size or self.world_size
        if self.device == "cuda" and per_host > _CUDA_DEVICES_PER_HOST:
            # TorchRec places shard r on cuda:(r % per_host), and torch keeps a device index in 8
            # bits: rank 128 of one host became "cuda:-128", a traceback from deep in the planner.
            what = (f"local_world_size: {per_host} cuda ranks on a host" if self.local_world_size else
                    f"sharding.local_world_size is unset, so all {per_host} cuda ranks are planned on one host")
            raise ConfigError(f"{what}: more than the {_CUDA_DEVICES_PER_HOST} devices torch can number on a host; "
                              "give the GPUs per host (sharding.local_world_size, plan --local-world-size), e.g. 8")

    @property
    def capacity_bytes(self) -> int:
        gb = self.device_memory_gb
        if gb is None:
            gb = DEFAULT_CUDA_MEMORY_GB if self.device == "cuda" else DEFAULT_CPU_MEMORY_GB
        return int(gb * GIB)

    @property
    def hosts(self) -> int:
        return self.world_size // (self.local_world_size or self.world_size)

    @property
    def sharding_types(self) -> list[str]:
        return SHARDING_TYPES[self.device]

    def to_torchrec(self) -> Topology:
        cap = self.capacity_bytes
        # TorchRec keeps CPU tables in "ddr" and CUDA tables in "hbm"; give the capacity to the
        # tier the tables will live in, and none to the other. On CUDA its default of 128 GiB of
        # host memory per rank let it choose UVM kernels, tables in host memory that the memory
        # report (and the check of a plan against its ranks) counted in HBM; and the refusal of
        # a plan counted host memory no one had declared.
        hardware = HardwareConfig(hbm_cap_bytes=cap, ddr_cap_bytes=0) if self.device == "cuda" else HardwareConfig(
            hbm_cap_bytes=0, ddr_cap_bytes=cap
        )
        return TopologyFactory.create_topology(
            trainer_config=TrainerConfig(
                world_size=self.world_size,
                local_world_size=self.local_world_size or self.world_size,
            ),
            hardware_config=hardware,
            kernel_config=KernelConfig(compute_device=self.device),
        )
