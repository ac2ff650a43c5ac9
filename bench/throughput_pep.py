"""PEP's pruning-stage training throughput against plain training of the same table width, same run.

Plain: embshard's uniform DLRM (`trainer.build.build_sharded`, pooled EmbeddingBagCollection).
PEP: the same DLRM over `PepEmbeddings` (`trainer.build.build_sharded` with
`trainer.pep.PepPrune`), once per granularity, with the default lookup (the synthetic features are
single-hot, so every table is looked up pooled and thresholded after the lookup) and with
`pep.pooled_lookup: false` (unpooled EmbeddingCollection, threshold per looked-up row, then sum
pooling: the path of multi-hot features). All step through `trainer.loop.train_step` on the same
in-memory batches, interleaved; the prune callback's periodic count is left out (it runs every
`pep.count_every` steps, not per step).

    .venv/bin/python bench/throughput_pep.py [--granularity G] [--steps 20] [--repeats 2] [--dim 16]

Ends with one JSON line: samples/s of each variant, `ratios` = PEP / plain per granularity,
`unpooled_ratios` the same with every table unpooled, and `ratio` = the lower of the global and
dimension-wise ratios measured (goal >= 0.87; the paper reports +20-30% training time for PEP),
or of the granularity asked for.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_arguments, bench_job, bench_main, interleaved_rates, median_rates, prepare  # noqa: E402

from embshard.config import (
    GRANULARITIES,  # noqa: E402
    EmbeddingsConfig,  # noqa: E402
    PepConfig,  # noqa: E402
)
from embshard.planner.pipeline import plan_with  # noqa: E402
from embshard.planner.topology import TopologySpec  # noqa: E402
from embshard.trainer.build import ShardedModel, build_sharded  # noqa: E402
from embshard.trainer.loop import train_step  # noqa: E402
from embshard.trainer.pep import PepPrune  # noqa: E402

RATIO_GOAL = 0.87


def rate(sharded: ShardedModel, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        train_step(sharded, b)
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--granularity", choices=GRANULARITIES, action="append",
                        help="measure only this granularity (repeatable; default: all)")
    args = parser.parse_args(argv)
    granularities = args.granularity or list(GRANULARITIES)
    data = prepare(args)
    cfg, bundle = bench_job("throughput-pep-run", data, args.batch_size, EmbeddingsConfig(dim=args.dim))
    warm, timed = data.warm, data.timed
    cpu = torch.device("cpu")

    models = {"plain": build_sharded(cfg, bundle, data.spec, cpu)}
    for pooled in (True, False):
        for g in granularities:
            name = g if pooled else f"{g}/unpooled"
            pep_cfg = replace(cfg, output_dir=str(Path(cfg.output_dir) / name.replace("/", "-")),
                              pep=PepConfig(granularity=g, pooled_lookup=pooled))
            method = PepPrune()  # its tables carry thresholds: planned by the method, not uniform
            pep_bundle = plan_with(partial(method.dimension_plan, pep_cfg), data.path, TopologySpec(1, "cpu"),
                                   pep_cfg.plan_dir, batch_size=args.batch_size, optimizer=cfg.train.sparse_optimizer)
            models[name] = build_sharded(pep_cfg, pep_bundle, data.spec, cpu, method=method)
    for m in models.values():
        rate(m, warm)

    print(f"{len(timed)} steps x {args.batch_size} per pass, {args.repeats} passes each, dim {args.dim}, "
          f"{len(bundle.dimension_plan.tables)} tables", file=sys.stderr)
    rates = interleaved_rates({name: (lambda m=m: rate(m, timed)) for name, m in models.items()}, args.repeats)
    m = median_rates(rates)
    ratios = {g: round(m[g] / m["plain"], 3) for g in granularities}
    unpooled = {g: round(m[f"{g}/unpooled"] / m["plain"], 3) for g in granularities}
    headline = [ratios[g] for g in ("global", "dimension") if g in ratios] or list(ratios.values())
    print(json.dumps({
        "bench": "throughput_pep",
        "dim": args.dim,
        "batch_size": args.batch_size,
        "samples_per_s": {k: round(v) for k, v in m.items()},
        "ratios": ratios,
        "unpooled_ratios": unpooled,
        "ratio": min(headline),
        "ratio_goal": RATIO_GOAL,
    }))


if __name__ == "__main__":
    bench_main(main)
