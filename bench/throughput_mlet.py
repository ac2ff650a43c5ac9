"""Training throughput of MLET (tables n x k, k = ratio * d, collapsed by W2 to d) against uniform
tables of width k and of width d, in the same run on the same in-memory batches.

All three are embshard models from `trainer.build`, stepped as a run steps them (`train.pipeline`'s
default; the per-step work of `bench/throughput.py`'s `run_embshard`, callbacks off), on one gloo
rank.
Uniform-k is the model MLET trains like (same table widths) and uniform-d the one it serves as.

    .venv/bin/python bench/throughput_mlet.py [--dim 16] [--ratio 4] [--steps 20] [--repeats 3]

Ends with one JSON line: samples/s of each variant, `ratio` = MLET / uniform-k (goal >= 0.95)
and `ratio_vs_d` = MLET / uniform-d (the paper reports about 25% runtime cost for MLET).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchData, bench_arguments, bench_job, bench_main, interleaved_rates, median_rates, prepare  # noqa: E402
from throughput import embshard_steps, run_embshard

from embshard.config import EmbeddingsConfig, JobConfig, MletConfig
from embshard.trainer.build import build_sharded
from embshard.trainer.pipeline import TrainSteps


def build(name: str, embeddings: EmbeddingsConfig, data: BenchData, batch_size: int) -> TrainSteps:
    cfg, bundle = bench_job(f"throughput-mlet/{name}", data, batch_size, embeddings)
    return embshard_steps(build_sharded(cfg, bundle, data.spec, torch.device("cpu")), cfg.train.pipeline)


def main(argv: list[str] | None = None) -> None:
    p = bench_arguments(__doc__)
    p.add_argument("--ratio", type=int, default=4, help="MLET width k = ratio * d")
    args = p.parse_args(argv)
    data = prepare(args)
    warm, timed_batches = data.warm, data.timed
    k = args.dim * args.ratio
    models = {
        "mlet": build("mlet", EmbeddingsConfig(dim=args.dim, mlet=MletConfig(ratio=args.ratio)), data, args.batch_size),
        "uniform_k": build("uniform_k", EmbeddingsConfig(dim=k), data, args.batch_size),
        "uniform_d": build("uniform_d", EmbeddingsConfig(dim=args.dim), data, args.batch_size),
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
    m = median_rates(rates)
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
    bench_main(main)
