"""How long TorchRec's planner takes, through `plan_sharding`, for a large model on a large cluster.

Builds N generated tables (half of them 1M rows x 64, the rest a log spread of sizes and widths),
plans them onto W CUDA ranks without any hardware, and prints the time, the per-rank memory spread
and one JSON line of figures. By default it plans two cases, 1,000 tables on 64 ranks and 10,000
tables on 1,024 ranks (128 hosts of 8); `--tables` plans one size of your choosing instead.

    .venv/bin/python bench/planner.py [--tables N --world-size W] [--local-world-size 8]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

from common import bench_main

from embshard.cluster.cli_args import positive
from embshard.planner.memory import memory_report
from embshard.planner.shard_plan import plan_sharding
from embshard.planner.topology import GIB, TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan

# (tables, ranks, goal in seconds): today's large model on 64 ranks, and a cluster-scale one on
# 1,024 ranks (128 hosts of 8); each goal covers planning and the memory report.
CASES = [(1_000, 64, 10), (10_000, 1_024, 30)]
BATCH_SIZE = 512  # per rank
OPTIMIZER = "rowwise_adagrad"


def generated_plan(num_tables: int, seed: int = 0) -> DimensionPlan:
    """Every other table 1M x 64 (the workhorse size); the others 1k-10M rows at widths 16-128."""
    rng = random.Random(seed)
    tables = []
    for i in range(num_tables):
        if i % 2 == 0:
            rows, dim = 1_000_000, 64
        else:
            rows, dim = int(10 ** rng.uniform(3, 7)), rng.choice([16, 32, 64, 128])
        tables.append(TablePlan(f"t{i}", [f"f{i}"], rows, [Block(0, rows, dim)]))
    return DimensionPlan(base_dim=64, tables=tables)


def measure(tables: int, world_size: int, local_world_size: int, memory_gb: float, goal: float | None) -> dict:
    plan = generated_plan(tables)
    topology = TopologySpec(
        world_size=world_size,
        device="cuda",
        device_memory_gb=memory_gb,
        local_world_size=min(local_world_size, world_size),
    )
    gib = sum(t.num_embeddings * t.blocks[0].dim for t in plan.tables) * 4 / GIB
    print(
        f"planning {tables} tables ({gib:.1f} GiB of fp32 weights) onto {world_size} x cuda "
        f"({topology.hosts} hosts) at {memory_gb:g} GiB ...",
        flush=True,
    )
    # CPU time beside wall time: on a shared machine the wall clock also measures the neighbours.
    start, cpu_start = time.perf_counter(), time.process_time()
    shard_plan = plan_sharding(plan, topology, batch_size=BATCH_SIZE, optimizer=OPTIMIZER)
    report = memory_report(plan, shard_plan, OPTIMIZER)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    train = [r["train_bytes"] for r in report.per_rank.values()]
    types = Counter(ps.sharding_type for ps in shard_plan.sharding.values())
    print(f"planned with memory report in {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU (goal {goal} s)")
    print(f"train bytes per rank: min {min(train) / GIB:.2f} GiB, max {max(train) / GIB:.2f} GiB")
    print("sharding types: " + ", ".join(f"{t} x{n}" for t, n in types.most_common()))
    for note in shard_plan.notes:
        print(f"note: {note}")
    return {
        "tables": tables,
        "world_size": world_size,
        "local_world_size": topology.local_world_size,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "goal_seconds": goal,
        "within_goal": None if goal is None else seconds <= goal,
        "min_train_bytes": min(train),
        "max_train_bytes": max(train),
        "sharding_types": dict(types),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=positive, help="plan this one size instead of the standard cases")
    parser.add_argument("--world-size", type=positive, default=64)
    parser.add_argument("--device-memory-gb", type=float, default=80)
    parser.add_argument("--local-world-size", type=int, default=8, help="ranks per host (capped at the world size)")
    args = parser.parse_args(argv)

    cases = [(args.tables, args.world_size, None)] if args.tables is not None else CASES
    results = [
        measure(tables, world, args.local_world_size, args.device_memory_gb, goal)
        for tables, world, goal in cases
    ]
    print(json.dumps({"bench": "planner", "cases": results}))
    return 0


if __name__ == "__main__":
    bench_main(main)
