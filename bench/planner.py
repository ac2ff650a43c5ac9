"""How long TorchRec's planner takes, through `plan_sharding`, for a large model on a large cluster.

Builds N generated tables (half of them 1M rows x 64, the rest a log spread of sizes and widths),
plans them onto W CUDA ranks without any hardware, and prints the time, the per-rank memory spread
and one JSON line of figures.

    .venv/bin/python bench/planner.py [--tables 1000] [--world-size 64] [--local-world-size 8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter

from embshard.planner.memory import memory_report
from embshard.planner.shard_plan import plan_sharding
from embshard.planner.topology import GIB, TopologySpec
from embshard.planner.types import Block, DimensionPlan, TablePlan

GOAL_SECONDS = 10
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--device-memory-gb", type=float, default=80)
    parser.add_argument("--local-world-size", type=int, default=8, help="ranks per host (capped at the world size)")
    args = parser.parse_args(argv)

    plan = generated_plan(args.tables)
    topology = TopologySpec(
        world_size=args.world_size,
        device="cuda",
        device_memory_gb=args.device_memory_gb,
        local_world_size=min(args.local_world_size, args.world_size),
    )
    gib = sum(t.num_embeddings * t.blocks[0].dim for t in plan.tables) * 4 / GIB
    print(
        f"planning {args.tables} tables ({gib:.1f} GiB of fp32 weights) onto {args.world_size} x cuda "
        f"({topology.hosts} hosts) at {args.device_memory_gb:g} GiB ...",
        flush=True,
    )
    # CPU time beside wall time: on a shared machine the wall clock also measures the neighbours.
    start, cpu_start = time.perf_counter(), time.process_time()
    shard_plan = plan_sharding(plan, topology, batch_size=BATCH_SIZE, optimizer=OPTIMIZER)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    report = memory_report(plan, shard_plan, OPTIMIZER)
    train = [r["train_bytes"] for r in report.per_rank.values()]
    types = Counter(ps.sharding_type for ps in shard_plan.sharding.values())
    print(f"planned in {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU (goal {GOAL_SECONDS} s)")
    print(f"train bytes per rank: min {min(train) / GIB:.2f} GiB, max {max(train) / GIB:.2f} GiB")
    print("sharding types: " + ", ".join(f"{t} x{n}" for t, n in types.most_common()))
    for note in shard_plan.notes:
        print(f"note: {note}")
    print(
        json.dumps(
            {
                "bench": "planner",
                "tables": args.tables,
                "world_size": args.world_size,
                "local_world_size": topology.local_world_size,
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                "goal_seconds": GOAL_SECONDS,
                "within_goal": seconds <= GOAL_SECONDS,
                "min_train_bytes": min(train),
                "max_train_bytes": max(train),
                "sharding_types": dict(types),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
