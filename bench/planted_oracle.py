"""The planted benchmark's reference point: train the generator's own widths.

    nice .venv/bin/python bench/planted_oracle.py --data outputs/sweep-planted/data \
        [--scales 1,2] [--seeds 2] [--epochs 10] [--uniform auto|none|8,16] [--set key=value ...]

`--set model.arch=fm` trains the factorization machine, the generator's own model shape.

`embshard data synth --planted` records each table's popularity blocks and their latent ranks
(dataset.json `planted`). This writes them as a decisions file: the blocks' rows in train
frequency order (the order MDE ranks rows in), each block `scale` x its planted rank wide, rounded
like any decisions file and projected to the base width. It trains that plan with
configs/sweep-planted.yaml beside uniform models at the base width and at the width the sweep
gives the smallest planted plan's budget (its share of the base model's bytes), every run reported
at its best validation step.

It answers what the sweep's planted goals take for granted: does a plan with the planted widths
reach the best uniform AUC with a fraction of its parameters, and how close does any plan come to
the Bayes AUC on this much data? Only benchmarks read the planted ranks; no method does.

Writes bench/results/planted-oracle/{oracle.json,oracle.md} (`--label` names another folder); the
runs go under bench/results/cache/<label>/<time>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    bench_main,
    init_single_process_group,
    results_folder,
    train_here,
    write_atomic,
    write_json,
)

from embshard.cluster.cli_args import positive
from embshard.cluster.sweep_methods import base_params, uniform_width
from embshard.config import JobConfig, load_job_config
from embshard.datasets.profile import load_profile
from embshard.datasets.schema import DatasetSpec
from embshard.errors import EmbshardError
from embshard.planner.decisions import BlockDecision, Decisions, TableDecision
from embshard.planner.policies import plan_dimensions
from embshard.planner.remap import frequency_ranking

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sweep-planted.yaml"


def planted_decisions(data: Path, base_dim: int, scale: int, out: Path) -> Path:
    """The planted blocks as a decisions file in `out`, widths `scale` x the planted ranks (capped
    at the base width); rows ranked by their train counts, as MDE ranks them."""
    spec = DatasetSpec.load(data)
    profile = load_profile(data)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for feature, planted in spec.planted["ranks"].items():
        remap = f"{feature}.npy"
        np.save(out / remap, frequency_ranking(profile.counts(feature)), allow_pickle=False)
        blocks = [BlockDecision(b["end"] - b["start"], min(base_dim, scale * b["rank"])) for b in planted["blocks"]]
        tables[feature] = TableDecision(blocks=blocks, row_order="frequency", remap=remap)
    meta = {"source": "dataset.json planted ranks", "scale": scale}
    decisions = Decisions(method=f"planted-x{scale}", base_dim=base_dim, tables=tables, meta=meta)
    return decisions.save(out / "decisions.json")


def planted_params(cfg: JobConfig, data: Path, out: Path) -> int:
    """What the generator itself holds: the planted widths unrounded (x1), counted by the planner's
    own `serve_params` (blocks plus their maps into the base width)."""
    exact = replace(cfg.embeddings, policy="decisions", rounding="none", min_dim=1,
                    decisions=str(planted_decisions(data, cfg.embeddings.dim, 1, out / "decisions")))
    return plan_dimensions(exact, DatasetSpec.load(data), None, out / "plan").serve_params()


def run(cfg: JobConfig, name: str, seed: int, runs: Path, method: str, **embeddings: Any) -> dict[str, Any]:
    cfg = replace(cfg, seed=seed, output_dir=str(runs / f"{name}-s{seed}"),
                  embeddings=replace(cfg.embeddings, **embeddings))
    plan, summary = train_here(cfg, method)
    params = plan.serve_params()
    print(f"{name} seed {seed}: test AUC {summary['test_auc']:.4f} at step {summary['selected_step']}, "
          f"{params:,} serving params", file=sys.stderr)
    return {"plan": name, "seed": seed, "serving_params": params, "test_auc": summary["test_auc"],
            "valid_auc": summary["valid_auc"], "selected_step": summary["selected_step"], "steps": summary["steps"]}


def summarise(runs: list[dict[str, Any]], base: int, bayes: float) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(r["plan"] for r in runs):
        mine = [r for r in runs if r["plan"] == name]
        aucs = [r["test_auc"] for r in mine]
        rows.append({"plan": name, "serving_params": mine[0]["serving_params"],
                     "share_of_base": mine[0]["serving_params"] / base,
                     "test_auc": statistics.mean(aucs),
                     "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                     "to_bayes": bayes - statistics.mean(aucs),
                     "selected_steps": [r["selected_step"] for r in mine], "seeds": len(mine)})
    return rows


def markdown(rows: list[dict[str, Any]], bayes: float, planted: int, epochs: int, arch: str) -> str:
    against = " against uniform" if any(r["plan"].startswith("uniform") for r in rows) else ""
    lines = [f"# Planted widths{against} (model.arch {arch}, {epochs} epochs, each run at its best "
             "validation step)", "",
             "| plan | serving params | share of the base model | test AUC (mean ± std) | distance to Bayes AUC "
             "| selected steps |",
             "| --- | ---: | ---: | --- | ---: | --- |"]
    lines += [f"| {r['plan']} | {r['serving_params']:,} | {r['share_of_base']:.3f} | {r['test_auc']:.4f} ± "
              f"{r['test_auc_std']:.4f} | {r['to_bayes']:.4f} | {', '.join(map(str, r['selected_steps']))} |"
              for r in rows]
    return "\n".join(lines + ["", f"Bayes test AUC {bayes:.4f}; the generator's own parameters: {planted:,}.", ""])


def _uniform_widths(text: str) -> list[int] | None:
    """--uniform: None for `auto` (chosen per seed from the planted plans), no widths for `none`."""
    if text in ("auto", "none"):
        return None if text == "auto" else []
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or comma-separated widths, got {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset from `embshard data synth --planted`")
    p.add_argument("--scales", default="1,2", help="widths as multiples of the planted ranks (default 1,2)")
    p.add_argument("--seeds", type=positive, default=2)
    p.add_argument("--epochs", type=positive, default=10)
    p.add_argument("--uniform", type=_uniform_widths, default="auto",
                   help="uniform widths trained beside the planted plans: comma-separated widths, `none`, or "
                        "`auto` (default): the width at the smallest planted plan's bytes and the base width")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/sweep-planted.yaml")
    p.add_argument("--label", default="planted-oracle", help="the results folder under bench/results/")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier oracle.json / oracle.md there")
    args = p.parse_args()
    try:
        scales = [int(s) for s in args.scales.split(",")]
    except ValueError:
        p.error(f"--scales: expected comma-separated whole multiples, got {args.scales!r}")
    if min(scales) < 1:  # a width of 0 was refused by the planner after the scales before it trained
        p.error(f"--scales: multiples must be at least 1, got {args.scales!r}")
    out = results_folder(p, args.label, ["oracle.json", "oracle.md"], args.overwrite)
    try:
        spec = DatasetSpec.load(args.data)
    except EmbshardError as e:
        p.error(str(e))
    if not spec.planted:
        p.error(f"{args.data}: not a planted dataset (no `planted` in dataset.json); make one with "
                "`embshard data synth --planted`")
    cfg = load_job_config(CONFIG, args.overrides)
    cfg = replace(cfg, data=replace(cfg.data, path=str(args.data)),
                  train=replace(cfg.train, epochs=args.epochs, test=True, report_at="best_valid", progress=False))
    # A folder per invocation: a run resumes from checkpoints it finds in its output folder.
    runs_dir = CACHE / args.label / time.strftime("%Y%m%d-%H%M%S")
    warnings.filterwarnings("ignore")
    init_single_process_group()

    base_dim = cfg.embeddings.dim
    decisions = {s: planted_decisions(args.data, base_dim, s, runs_dir / f"decisions-x{s}") for s in scales}
    base = base_params(cfg, spec)
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        runs += [run(cfg, f"planted x{s}", seed, runs_dir, "decisions", policy="decisions", decisions=str(d))
                 for s, d in decisions.items()]
        widths = args.uniform
        if widths is None:
            smallest = min(r["serving_params"] for r in runs if r["seed"] == seed)
            widths = sorted({uniform_width(cfg.embeddings, smallest / base), base_dim})
        for w in widths:
            runs.append(run(cfg, f"uniform {w}", seed, runs_dir, "uniform", policy="uniform", dim=w))

    bayes = spec.planted["bayes_auc"]["test"]
    rows = summarise(runs, base, bayes)
    planted = planted_params(cfg, args.data, runs_dir / "planted-exact")
    result = {"bench": "planted-oracle", "data": spec.source, "config": str(CONFIG.relative_to(ROOT)),
              "overrides": args.overrides, "arch": cfg.model.arch, "epochs": args.epochs, "bayes_test_auc": bayes,
              "planted_params": planted, "base_params": base, "rows": rows, "runs": runs}
    write_json(out / "oracle.json", result)
    write_atomic(out / "oracle.md", lambda tmp: tmp.write_text(markdown(rows, bayes, planted, args.epochs,
                                                                        cfg.model.arch)))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    bench_main(main)
