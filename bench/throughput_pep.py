"""PEP's pruning-stage training throughput against plain training of the same table width, same run.

Plain: embshard's uniform DLRM (`trainer.build.build_sharded`, pooled EmbeddingBagCollection).
PEP: the same DLRM over `PepEmbeddings` (`trainer.pep.build_pep`: unpooled EmbeddingCollection,
threshold per looked-up row, then sum pooling), once per granularity. Both step through
`trainer.loop.train_step` on the same in-memory batches, interleaved; the prune callback's periodic
count is left out (it runs every `pep.count_every` steps, not per step).

    .venv/bin/python bench/throughput_pep.py [--steps 20] [--repeats 2] [--dim 16]

Ends with one JSON line: samples/s of each variant, `ratios` = PEP / plain per granularity, and
`ratio` = the lower of the global and dimension-wise ratios (goal >= 0.87; the paper reports
+20-30% training time for PEP).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import init_single_process_group, interleaved_rates, load_batches, median, synth_dataset  # noqa: E402

from embshard.planner.config import EmbeddingsConfig  # noqa: E402
from embshard.planner.pipeline import make_plan  # noqa: E402
from embshard.planner.topology import TopologySpec  # noqa: E402
from embshard.sharding.pep import GRANULARITIES  # noqa: E402
from embshard.trainer.build import ShardedModel, build_sharded  # noqa: E402
from embshard.trainer.config import DataConfig, ModelConfig  # noqa: E402
from embshard.trainer.loop import train_step  # noqa: E402
from embshard.trainer.pep import build_pep  # noqa: E402
from embshard.trainer.config import JobConfig
from embshard.trainer.pep_config import PepConfig  # noqa: E402

RATIO_GOAL = 0.87


def rate(sharded: ShardedModel, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        train_step(sharded, b)
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--max-cardinality", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per pass")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    init_single_process_group()
    data = synth_dataset(args.rows, args.max_cardinality)
    cfg = JobConfig(
        output_dir=str(Path(__file__).resolve().parent / "results" / "cache" / "throughput-pep-run"),
        data=DataConfig(path=str(data), batch_size=args.batch_size),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=EmbeddingsConfig(policy="uniform", dim=args.dim),
    )
    bundle = make_plan(cfg.embeddings, data, TopologySpec(1, "cpu"), cfg.plan_dir,
                       batch_size=args.batch_size, optimizer=cfg.train.sparse_optimizer)
    batches = load_batches(data, args.batch_size, args.steps + args.warmup)
    warm, timed = batches[: args.warmup], batches[args.warmup:]
    num_dense = batches[0].dense.shape[1]
    cpu = torch.device("cpu")

    models = {"plain": build_sharded(cfg, bundle, num_dense, cpu)}
    for g in GRANULARITIES:
        models[g] = build_pep(JobConfig(**{**vars(cfg), "pep": PepConfig(granularity=g)}), bundle, num_dense, cpu)
    for m in models.values():
        rate(m, warm)

    print(f"{len(timed)} steps x {args.batch_size} per pass, {args.repeats} passes each, dim {args.dim}, "
          f"{len(bundle.dimension_plan.tables)} tables", file=sys.stderr)
    rates = interleaved_rates({name: (lambda m=m: rate(m, timed)) for name, m in models.items()}, args.repeats)
    for name, xs in rates.items():
        print(f"{name:>18}: " + ", ".join(f"{x:,.0f}" for x in xs) + " samples/s", file=sys.stderr)
    m = {k: median(v) for k, v in rates.items()}
    ratios = {g: round(m[g] / m["plain"], 3) for g in GRANULARITIES}
    print(json.dumps({
        "bench": "throughput_pep",
        "dim": args.dim,
        "batch_size": args.batch_size,
        "samples_per_s": {k: round(v) for k, v in m.items()},
        "ratios": ratios,
        "ratio": min(ratios["global"], ratios["dimension"]),
        "ratio_goal": RATIO_GOAL,
    }))


if __name__ == "__main__":
    main()
