"""Two-tower retrieval quality against serving bytes on MovieLens-1M: uniform vs MDE vs MLET.

Trains embshard's two_tower arch (trainer.build + trainer.loop.train_step, one process, a world
size 1 gloo group) on ML-1M converted once into bench/results/cache/ (with its item catalog) and
evaluates on the TEST split through the arch's own evaluation: recall@K and NDCG@K of every test
positive ranked among all movies. Serving bytes: the plan's embedding parameters
(`DimensionPlan.serve_params()`, tables plus projections; fp32) and, apart, the towers' MLPs.

    .venv/bin/python bench/two_tower.py                      # uniform d=8, 32; MDE and MLET at d=8's bytes
    .venv/bin/python bench/two_tower.py --seeds 0 1 2 --overwrite

`--rows-from A.json B.json` trains nothing and reports the rows those runs saved (seeds run side
by side in separate processes: `--seeds 2 --out /tmp/seed2`).

Writes OUT.json (default bench/results/two-tower-movielens-1m): every row, rewritten after each
run so an interrupted benchmark keeps what finished, and per config the mean ± std over seeds of
each metric; then OUT.png, recall@10 and recall@50 against embedding serving bytes with error
bars. Refuses to replace an earlier OUT.json / OUT.png without --overwrite. Prints the per-config
table and ends with one JSON line of every row and config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import quality
import torch
from common import CACHE, RESULTS, bench_main, init_single_process_group, out_files, write_json

from embshard.config import (
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.planner.pipeline import plan_with
from embshard.planner.policies.uniform import uniform_plan
from embshard.planner.topology import TopologySpec
from embshard.sharding.embedding_module import inner_module
from embshard.trainer.build import build_sharded
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.models.two_tower_model import TwoTowerModel
from embshard.trainer.planning import planning_step

CPU = torch.device("cpu")
BYTES_PER_PARAM = 4  # fp32
METRICS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50")
# What a report reads of each row of --rows-from.
ROW_KEYS = ("config", "seed", "epochs", "embedding_serve_bytes", "tower_bytes", *(f"test_{m}" for m in METRICS))


def prepare_dataset(data_root: Path) -> Path:
    """Its own cache folder: the ranking benchmarks' ML-1M cache may predate the item catalog."""
    return quality.prepare_dataset("movielens-1m", data_root, cache="movielens-1m-retrieval")


def configs(args: argparse.Namespace, data: Path) -> dict[str, EmbeddingsConfig]:
    small, large = args.dims
    budget = uniform_plan(EmbeddingsConfig(policy="uniform", dim=small), DatasetSpec.load(data)).serve_params()
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
    bundle = plan_with(planning_step(cfg), data, TopologySpec(world_size=1),
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
    towers = inner_module(sharded.model, TwoTowerModel)
    assert towers is not None, "a two_tower model without its towers"
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


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config (in first-run order): seeds, mean embedding bytes, and mean/std of each test metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    out = []
    for config, rs in groups.items():
        stats: dict[str, Any] = {"config": config, "seeds": len(rs),
                                 "embedding_serve_bytes": statistics.fmean(r["embedding_serve_bytes"] for r in rs),
                                 "tower_bytes": statistics.fmean(r["tower_bytes"] for r in rs)}
        for m in METRICS:
            values = [r[f"test_{m}"] for r in rs]
            stats[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out.append(stats)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| config | embedding serving bytes | seeds | "
             + " | ".join(f"test {m} (mean ± std)" for m in METRICS) + " |",
             "| --- | ---: | ---: | " + " | ".join("---" for _ in METRICS) + " |"]
    for c in summary:
        lines.append(f"| {c['config']} | {c['embedding_serve_bytes']:,.0f} | {c['seeds']} | "
                     + " | ".join(f"{c[m]['mean']:.4f} ± {c[m]['std']:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    """Recall@10 and recall@50 against embedding serving bytes (log x), error bars over seeds; the
    uniform configs joined by a line (the width frontier), every other config a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    uniform = sorted((c for c in summary if c["config"].startswith("uniform")),
                     key=lambda c: c["embedding_serve_bytes"])
    for ax, metric in zip(axes, ("recall@10", "recall@50"), strict=True):
        ax.errorbar([c["embedding_serve_bytes"] for c in uniform], [c[metric]["mean"] for c in uniform],
                    yerr=[c[metric]["std"] for c in uniform], marker="o", capsize=3, linewidth=2, label="uniform")
        for c in summary:
            if c in uniform:
                continue
            ax.errorbar([c["embedding_serve_bytes"]], [c[metric]["mean"]], yerr=[c[metric]["std"]],
                        marker="s", capsize=3, linestyle="none", label=c["config"])
        ax.set_xscale("log")
        ax.set_xlabel("embedding serving bytes (fp32)")
        ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_rows(args: argparse.Namespace, out_json: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    init_single_process_group()
    data = prepare_dataset(args.data_root)
    chosen = configs(args, data)
    unknown = sorted(set(args.configs or ()) - set(chosen))
    if unknown:
        raise SystemExit(f"two_tower.py: error: --configs: unknown {unknown}; the configs are {sorted(chosen)}")
    rows = []
    for seed in args.seeds:
        for name, embeddings in chosen.items():
            if args.configs and name not in args.configs:
                continue
            row = run_one(args, data, name, embeddings, seed)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
            write_json(out_json, {**header, "rows": rows})
    return rows


def saved_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of earlier runs' JSON files, in order; a config and seed twice, or rows of
    different epochs, would make the means mix unlike runs, so they are refused."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], Path] = {}
    for path in paths:
        try:
            saved = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a bench/two_tower.py output ({e})") from None
        if not isinstance(saved, list):
            raise ValueError(f"{path}: not a bench/two_tower.py output (its rows are no list)")
        for row in saved:
            missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else ["config"]
            if missing:
                raise ValueError(f"{path}: not a bench/two_tower.py output (a row without {missing[0]!r})")
            key = (row["config"], row["seed"])
            if key in seen:
                raise ValueError(f"{path}: {row['config']} seed {row['seed']} is already in {seen[key]}")
            seen[key] = path
            rows.append(row)
    if len({r["epochs"] for r in rows}) > 1:
        raise ValueError(f"rows of different epochs {sorted({r['epochs'] for r in rows})}: one report, one setting")
    if not rows:
        raise ValueError("no rows in " + ", ".join(map(str, paths)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dims", type=int, nargs=2, default=[8, 32], metavar=("SMALL", "LARGE"))
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS / "two-tower-movielens-1m",
                   help="OUT.json and OUT.png (default bench/results/two-tower-movielens-1m)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier OUT.json / OUT.png")
    p.add_argument("--configs", nargs="+", metavar="NAME",
                   help="run only these of the configs (e.g. mde-32@8 mlet-8k32; default: all four)")
    p.add_argument("--rows-from", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: report the rows of earlier runs' OUT.json files (seeds run side by side)")
    args = p.parse_args(argv)
    out_json, out_png = out_files(p, args.out, [".json", ".png"], args.overwrite)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    header = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.rows_from:
        try:
            rows = saved_rows(args.rows_from)
        except ValueError as e:
            p.error(f"--rows-from: {e}")
    else:
        rows = train_rows(args, out_json, header)
    summary = summarise(rows)
    write_json(out_json, {**header, "rows": rows, "configs": summary})
    epochs = sorted({r["epochs"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    plot(summary, f"two-tower on MovieLens-1M: {', '.join(map(str, epochs))} epoch(s), "
                  f"seeds {', '.join(map(str, seeds))}", out_png)
    print(table(summary))
    print(json.dumps({"rows": rows, "configs": summary, "files": [str(out_json), str(out_png)]}))


if __name__ == "__main__":
    bench_main(main)
