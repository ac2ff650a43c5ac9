"""Training throughput of MLET (tables n x k, k = ratio * d, collapsed by W2 to d) against uniform
tables of width k and of width d, in the same run on the same in-memory batches.

All three are embshard models from `trainer.build`, stepped by `trainer.loop.train_step` (the
per-step work of `bench/throughput.py`'s `run_embshard`, callbacks off), on one gloo rank.
Uniform-k is the model MLET trains like (same table widths) and uniform-d the one it serves as.

    .venv/bin/python bench/throughput_mlet.py [--dim 16] [--ratio 4] [--steps 20] [--repeats 3]

Ends with one JSON line: samples/s of each variant, `ratio` = MLET / uniform-k (goal >= 0.95)
and `ratio_vs_d` = MLET / uniform-d (the paper reports about 25% runtime cost for MLET).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    init_single_process_group,
    interleaved_rates,
    load_batches,
    median,
    synth_dataset,
)
from embshard.planner.config import EmbeddingsConfig, MletConfig
from embshard.planner.pipeline import make_plan
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import ShardedModel, build_sharded
from embshard.trainer.config import DataConfig, JobConfig, ModelConfig
from throughput import run_embshard


def build(name: str, embeddings: EmbeddingsConfig, data: Path, batch_size: int, num_dense: int) -> ShardedModel:
    cfg = JobConfig(
        output_dir=str(CACHE / "throughput-mlet" / name),
        data=DataConfig(path=str(data), batch_size=batch_size),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=embeddings,
    )
    bundle = make_plan(cfg.embeddings, data, TopologySpec(1, "cpu"), cfg.plan_dir,
                       batch_size=batch_size, optimizer=cfg.train.sparse_optimizer)
    return build_sharded(cfg, bundle, num_dense, torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--max-cardinality", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16, help="serving width d")
    p.add_argument("--ratio", type=int, default=4, help="MLET width k = ratio * d")
    p.add_argument("--steps", type=int, default=20, help="timed steps per pass")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    init_single_process_group()
    data = synth_dataset(args.rows, args.max_cardinality)
    batches = load_batches(data, args.batch_size, args.steps + args.warmup)
    warm, timed_batches = batches[: args.warmup], batches[args.warmup:]
    num_dense = batches[0].dense.shape[1]
    k = args.dim * args.ratio
    models = {
        "mlet": build("mlet", EmbeddingsConfig(dim=args.dim, mlet=MletConfig(ratio=args.ratio)), data,
                      args.batch_size, num_dense),
        "uniform_k": build("uniform_k", EmbeddingsConfig(dim=k), data, args.batch_size, num_dense),
        "uniform_d": build("uniform_d", EmbeddingsConfig(dim=args.dim), data, args.batch_size, num_dense),
    }
    log_every = JobConfig().train.log_every
    for model in models.values():
        run_embshard(model, warm, [], log_every)

    print(f"{len(timed_batches)} steps x {args.batch_size} per pass, {args.repeats} passes each, "
          f"d {args.dim}, k {k}", file=sys.stderr)
    rates = interleaved_rates(
        {name: (lambda m=model: run_embshard(m, timed_batches, [], log_every)) for name, model in models.items()},
        args.repeats,
    )
    for name, xs in rates.items():
        print(f"{name:>10}: " + ", ".join(f"{x:,.0f}" for x in xs) + " samples/s", file=sys.stderr)
    m = {name: median(xs) for name, xs in rates.items()}
    print(json.dumps({
        "bench": "throughput_mlet",
        "dim": args.dim,
        "mlet_width": k,
        "batch_size": args.batch_size,
        "mlet_samples_per_s": round(m["mlet"]),
        "uniform_k_samples_per_s": round(m["uniform_k"]),
        "uniform_d_samples_per_s": round(m["uniform_d"]),
        "ratio": round(m["mlet"] / m["uniform_k"], 3),
        "ratio_goal": 0.95,
        "ratio_vs_d": round(m["mlet"] / m["uniform_d"], 3),
    }))


if __name__ == "__main__":
    main()
