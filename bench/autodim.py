"""AutoDim on MovieLens-1M: what the search costs and what it chooses, against uniform widths.

Per seed, in one process (a one-rank gloo group), interleaved so machine drift hits all alike:
  1. uniform: one plain training epoch at the largest candidate width d_N (build, train, evaluate);
  2. search: `trainer.loop.run_worker` with the `autodim` method for one epoch (its first `--pretrain` share with
     alpha held equal), which writes a decisions file;
  3. retrain: the decisions through `embeddings.policy: decisions`, trained like (1).
Search cost = wall time of (2) / wall time of (1) (goal <= 1.5). AUC is on the validation split
(the search's architecture steps read validation batches too; the paper reports test AUC).

    .venv/bin/python bench/autodim.py [--seeds 3] [--batch-size 1024] [--epochs 1]

Ends with one JSON line and writes bench/results/autodim-movielens.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, bench_main, init_single_process_group, write_json
from quality import prepare_dataset

from embshard.cluster.cli_args import positive
from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    CheckpointConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.planner.pipeline import make_plan
from embshard.planner.topology import TopologySpec
from embshard.trainer.loop import run_worker

ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"
CANDIDATES = [2, 8, 16, 24, 32]
# The paper's Table 4 (MovieLens-1M, AutoDim): identifier fields get large widths, the small
# demographic fields small ones.
PAPER_LARGE, PAPER_SMALL = ["movieId", "userId"], ["gender", "age", "occupation"]


def job(data: Path, run: Path, seed: int, args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        seed=seed,
        output_dir=str(run),
        data=DataConfig(path=str(data), batch_size=args.batch_size, eval_batch_size=8192),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=EmbeddingsConfig(dim=CANDIDATES[-1]),
        train=TrainConfig(epochs=args.epochs, progress=False, log_every=50),
        checkpoint=CheckpointConfig(enabled=False),
    )


def train(cfg: JobConfig) -> tuple[float, dict, int]:
    """Plan + train + evaluate; -> (wall seconds, summary, serving parameters of the plan)."""
    start = time.perf_counter()
    bundle = make_plan(cfg.embeddings, cfg.data.path, TopologySpec(1, "cpu"), cfg.plan_dir,
                       batch_size=cfg.data.batch_size, optimizer=cfg.train.sparse_optimizer)
    bundle.save()
    summary = run_worker(cfg)
    return time.perf_counter() - start, summary, bundle.dimension_plan.serve_params()


def search(cfg: JobConfig, steps_per_epoch: int, args: argparse.Namespace) -> tuple[float, dict]:
    cfg = replace(cfg, train=replace(cfg.train, epochs=1))  # the search is one epoch
    cfg.autodim = AutodimConfig(
        candidates=CANDIDATES,
        pretrain_steps=int(args.pretrain * steps_per_epoch),
        alpha_every=args.alpha_every,
        alpha_lr=args.alpha_lr,
    )
    start = time.perf_counter()
    plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "autodim")
    summary = run_worker(cfg, method="autodim")
    return time.perf_counter() - start, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1, help="epochs of the uniform and retrained models")
    p.add_argument("--pretrain", type=float, default=0.2, help="share of the search epoch with alpha held equal")
    p.add_argument("--alpha-every", type=int, default=10)
    p.add_argument("--alpha-lr", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier autodim-movielens.json")
    args = p.parse_args()
    out = RESULTS / "autodim-movielens.json"
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    warnings.filterwarnings("ignore")
    init_single_process_group()
    data = prepare_dataset("movielens-1m", ML1M.parent)
    work = CACHE / "autodim-bench"

    runs = []
    for seed in range(args.seeds):
        uniform_cfg = job(data, work / f"uniform-{seed}", seed, args)
        uniform_s, uniform, uniform_params = train(uniform_cfg)
        steps_per_epoch = uniform["steps"] // args.epochs
        search_s, searched = search(job(data, work / f"search-{seed}", seed, args), steps_per_epoch, args)
        retrain_cfg = job(data, work / f"retrain-{seed}", seed, args)
        retrain_cfg = replace(retrain_cfg, embeddings=EmbeddingsConfig(
            policy="decisions", dim=CANDIDATES[-1], decisions=searched["decisions"]))
        retrain_s, retrained, retrain_params = train(retrain_cfg)
        run = {
            "seed": seed,
            "dims": searched["dims"],
            "alpha": searched["alpha"],
            "search_seconds": search_s,
            "uniform_epoch_seconds": uniform_s / args.epochs,
            "search_cost": search_s / (uniform_s / args.epochs),
            "search_valid_auc": searched["valid_auc"],
            "uniform_valid_auc": uniform["valid_auc"],
            "autodim_valid_auc": retrained["valid_auc"],
            "uniform_params": uniform_params,
            "autodim_params": retrain_params,
            "retrain_seconds": retrain_s,
        }
        runs.append(run)
        print(f"seed {seed}: dims {run['dims']}; search {search_s:.1f}s = {run['search_cost']:.2f} x "
              f"uniform epoch {run['uniform_epoch_seconds']:.1f}s; AUC uniform {run['uniform_valid_auc']:.4f} "
              f"autodim {run['autodim_valid_auc']:.4f}; params {uniform_params:,} -> {retrain_params:,}",
              file=sys.stderr)

    fields = list(runs[0]["dims"])

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in runs)

    chosen = {f: Counter(r["dims"][f] for r in runs).most_common(1)[0][0] for f in fields}
    result = {
        "bench": "autodim",
        "dataset": "ml-1m",
        "candidates": CANDIDATES,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "search_epochs": 1,
        "pretrain_share": args.pretrain,
        "dims_per_seed": {f: [r["dims"][f] for r in runs] for f in fields},
        "dims_mode": chosen,
        "alpha_mean": {f: [round(statistics.mean(r["alpha"][f][i] for r in runs), 4)
                           for i in range(len(CANDIDATES))] for f in fields},
        "paper_large_fields_mean_dim": statistics.mean(chosen[f] for f in PAPER_LARGE),
        "paper_small_fields_mean_dim": statistics.mean(chosen[f] for f in PAPER_SMALL),
        "search_cost": round(mean("search_cost"), 3),
        "search_cost_goal": 1.5,
        "uniform_valid_auc": round(mean("uniform_valid_auc"), 4),
        "autodim_valid_auc": round(mean("autodim_valid_auc"), 4),
        "search_valid_auc": round(mean("search_valid_auc"), 4),
        "uniform_params": runs[0]["uniform_params"],
        "autodim_params": round(mean("autodim_params")),
        "params_ratio": round(mean("autodim_params") / runs[0]["uniform_params"], 3),
        "runs": runs,
    }
    write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "alpha_mean")}))


if __name__ == "__main__":
    bench_main(main)
