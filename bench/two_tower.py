"""Two-tower retrieval quality against serving bytes on MovieLens-1M: uniform vs MDE vs MLET.

Trains embshard's two_tower arch (trainer.build + trainer.loop.train_step, one process, a world
size 1 gloo group) on ML-1M converted once into bench/results/cache/ (with its item catalog) and
evaluates on the TEST split through the arch's own evaluation: recall@K and NDCG@K of every test
positive ranked among all movies. Serving bytes: the plan's embedding parameters
(`DimensionPlan.serve_params()`, tables plus projections; fp32) and, apart, the towers' MLPs.

    .venv/bin/python bench/two_tower.py                      # uniform d=8, 32; MDE and MLET at d=8's bytes
    .venv/bin/python bench/two_tower.py --epochs 2 --seeds 0 1 2

Writes bench/results/two-tower-movielens-1m.json; ends with one JSON line of every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import CACHE, init_single_process_group
from quality import uniform_params

from embshard.config import (
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.convert import convert
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE, DatasetSpec
from embshard.planner.pipeline import plan_with
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import build_sharded
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.method import get_method, method_name
from embshard.trainer.models.two_tower_model import TwoTowerModel
from embshard.trainer.planning import planning_step

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parent / "results"
BYTES_PER_PARAM = 4  # fp32


def prepare_dataset(data_root: Path) -> Path:
    """Its own cache folder: the ranking benchmarks' ML-1M cache may predate the item catalog."""
    out = CACHE / "movielens-1m-retrieval"
    if not (out / SPEC_FILE).is_file():
        convert("movielens", data_root / "ml-1m", out)
    return out


def configs(args: argparse.Namespace, data: Path) -> dict[str, EmbeddingsConfig]:
    small, large = args.dims
    budget = uniform_params(data, small)
    mde = MdeConfig(alpha=args.alpha, mode="within", blocks=args.blocks, budget_params=budget)
    return {
        f"uniform-{small}": EmbeddingsConfig(policy="uniform", dim=small),
        f"uniform-{large}": EmbeddingsConfig(policy="uniform", dim=large),
        # MDE: popular rows up to `large` wide at `small`'s parameter budget.
        f"mde-{large}@{small}": EmbeddingsConfig(policy="mde", dim=large, mde=mde),
        # MLET: trained k = large wide, served collapsed at `small`.
        f"mlet-{small}k{large}": EmbeddingsConfig(policy="uniform", dim=small, mlet=MletConfig(width=large)),
    }


def run_one(args: argparse.Namespace, data: Path, name: str, embeddings: EmbeddingsConfig, seed: int) -> dict[str, Any]:
    cfg = JobConfig(
        seed=seed,
        output_dir=str(CACHE / "two-tower" / f"{name}-{seed}"),
        data=DataConfig(path=str(data), batch_size=args.batch_size, eval_batch_size=4096),
        model=ModelConfig(arch="two_tower", options={"hidden": [64], "out_dim": 32, "k": [10, 50]}),
        embeddings=embeddings,
        train=TrainConfig(epochs=args.epochs, sparse_optimizer="rowwise_adagrad", sparse_lr=0.05,
                          dense_optimizer="adam", dense_lr=0.001, progress=False),
    )
    bundle = plan_with(planning_step(cfg, get_method(method_name(cfg))), data, TopologySpec(world_size=1),
                       cfg.plan_dir, batch_size=args.batch_size, optimizer=cfg.train.sparse_optimizer)
    bundle.save()
    started = time.perf_counter()
    sharded = build_sharded(cfg, bundle, DatasetSpec.load(data), CPU)
    train = make_reader(cfg, bundle, "train", 0, 1)
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        for batch in train:
            loss = train_step(sharded, batch)
    test = ParquetBatchReader(data, "test", 4096, shuffle=False, drop_last=False, id_maps=bundle.id_maps())
    result = sharded.arch.evaluate(sharded.model, test, CPU, None)
    towers = next(m for m in sharded.model.modules() if isinstance(m, TwoTowerModel))
    tower_params = sum(p.numel() for t in (towers.query_tower, towers.item_tower) for p in t.parameters())
    plan = bundle.dimension_plan
    return {
        "config": name, "seed": seed, "epochs": args.epochs,
        "embedding_serve_bytes": plan.serve_params() * BYTES_PER_PARAM,
        "tower_bytes": tower_params * BYTES_PER_PARAM,
        "widths": sorted({b.dim for t in plan.tables for b in t.blocks}),
        **{f"test_{k}": v for k, v in result.metrics.items()},
        "test_queries": result.examples,
        "last_train_loss": loss.item(),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dims", type=int, nargs=2, default=[8, 32], metavar=("SMALL", "LARGE"))
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--blocks", type=int, default=4)
    args = p.parse_args(argv)
    init_single_process_group()
    data = prepare_dataset(args.data_root)
    rows = []
    for seed in args.seeds:
        for name, embeddings in configs(args, data).items():
            row = run_one(args, data, name, embeddings, seed)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "two-tower-movielens-1m.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps({"rows": rows, "file": str(out)}))


if __name__ == "__main__":
    main()
