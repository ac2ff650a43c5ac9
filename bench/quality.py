"""Test-split quality against embedding size: uniform widths versus MDE (Ginart et al.).

Trains embshard's own DLRM (trainer.build + trainer.loop.train_step, one process, world size 1
gloo group) on a real dataset converted once into bench/results/cache/, and evaluates on the TEST
split: AUC, logloss, and the serving embedding parameters of the plan
(`DimensionPlan.serve_params()`: tables plus MDE's projections).

    .venv/bin/python bench/quality.py --dataset movielens-1m --policy mde --alpha 0.3 --budget-params 66496
    .venv/bin/python bench/quality.py --dataset movielens-1m --sweep     # the whole comparison

`--sweep`: uniform d in {4, 8, 16, 32, 64}; MDE alpha in {0.2, 0.3, 0.4, 0.6} at the budgets of
uniform d = 4, 8, 16 (budget_params = that uniform model's serving params; MDE's base dim is
`--base-mult` times that d, so popular rows can get wider than the uniform model's while rare ones
get narrower). Every config runs once per seed. Writes bench/results/quality-<dataset>.json and
.png; ends with one JSON line: per config mean/std test AUC and params, and the paper's claim
check (the fewest parameters at which each policy comes within 0.002 AUC of the best uniform
model, and their ratio).

`--target rating` (MovieLens only): the same DLRM trained as a regressor on the raw rating kept in
the `rating` extra column, predicting 1 + 4 * sigmoid(logit) (so every prediction lies in the
1..5 star range and a zero logit means 3 stars) under MSE loss; reports test MSE and RMSE
instead of AUC. The ratings are {1, 2, 4, 5} only: the converter drops the 3s, so this MSE is not
comparable to papers' MSE over all ratings. Its sweep is smaller (uniform d in {4, 8, 16, 32, 64};
MDE alpha in {0.3, 0.6} at the budgets of uniform d = 8, 16) and writes
bench/results/quality-<dataset>-mse.json and .png, with the test MSE of predicting the train
split's mean rating as a floor to beat.

    .venv/bin/python bench/quality.py --dataset movielens-1m --target rating --sweep

`--policy mlet` (Multi-Layer Embedding Training): every table trained as W1 (n x k) . W2 (k x d)
and served collapsed to n x d, so its serving params equal uniform d's. `--policy mlet --sweep`
runs d in {4, 8, 16} x k in {d, 4d, 8d}, reuses the uniform rows of the plain sweep's JSON (so
run that first; they are re-run only when it is missing or was trained with other settings) and
writes bench/results/quality-<dataset>[-mse]-mlet.json and .png.

    .venv/bin/python bench/quality.py --dataset movielens-1m --policy mlet --sweep

`--policy pep` (Liu et al.): per seed, one PEP prune run at base dim `--pep-dim` (default 64)
writes a mask each time the non-zero embedding parameters first fall to a target fraction
(`--pep-targets`); every reached target is then retrained for `--epochs` two ways: `pep-lottery`
(the paper's: base-dim tables restart at the prune run's initial values x mask and stay masked;
its parameters are the mask's non-zeros) and `pep-mixed` (the mask's decisions file planned as
mixed-width blocks; its parameters are the plan's serving parameters). `--sweep` adds the uniform
and MDE rows of the plain sweep's JSON (re-run when missing or trained with other settings) and
writes bench/results/quality-<dataset>-pep.json and .png.

    .venv/bin/python bench/quality.py --dataset movielens-1m --policy pep --sweep

The prune defaults are the reference implementation's mechanism at this benchmark's scale:
s_init -15 (the paper's MovieLens value), dimension-wise thresholds under their own Adam with L2
(the decay is what raises s; see `pep:` in embshard/config.py), at a learning rate and decay that reach
the targets within a few epochs instead of the paper's hundreds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, init_single_process_group

from embshard.config import (
    GRANULARITIES,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    PepConfig,
    TrainConfig,
    target_dir_name,
)
from embshard.datasets.convert import convert
from embshard.datasets.profile import load_profile
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE, DatasetSpec, split_dir
from embshard.errors import PlanError
from embshard.planner.pipeline import make_plan, plan_with
from embshard.planner.policies import plan_dimensions
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import ShardedModel, build_sharded
from embshard.trainer.callbacks import StepInfo
from embshard.trainer.evaluate import evaluate_pointwise
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.pep import (
    LotteryTicket,
    MaskKeeper,
    PepLottery,
    PepPrune,
    PruneCallback,
    pep_module,
    table_shards,
)

RESULTS = Path(__file__).resolve().parent / "results"
CPU = torch.device("cpu")
SWEEP_DIMS = (4, 8, 16, 32, 64)
MATCH_AUC = 0.002  # "matches the best uniform model": within this much test AUC
RATING = "rating"  # the converter's extra column with MovieLens' raw stars
MLET_DIMS = (4, 8, 16)  # --policy mlet --sweep: serving widths d ...
MLET_K_MULTS = (1, 4, 8)  # ... each trained at k = this x d
PEP_POLICIES = ("pep-lottery", "pep-mixed")
Log = Callable[[str], None]
# Settings that change what a uniform row measured: reused rows must agree on all of them.
TRAINING_SETTINGS = ("epochs", "batch_size", "sparse_lr", "mode", "threads")


@dataclass(frozen=True)
class Target:
    metric: str  # the test metric the summary and plot report per config
    alphas: tuple[float, ...]  # --sweep: MDE alphas ...
    budget_dims: tuple[int, ...]  # ... at the budgets of these uniform widths
    suffix: str  # of the results files


TARGETS = {
    "like": Target("auc", (0.2, 0.3, 0.4, 0.6), (4, 8, 16), ""),
    # Fewer MDE configs: u4 is infeasible on MovieLens anyway (below MDE's floor).
    "rating": Target("mse", (0.3, 0.6), (8, 16), "-mse"),
}


@dataclass(frozen=True)
class Source:
    kind: str  # converter name
    parts: tuple[str, ...]  # path under --data-root
    mode: str  # MDE mode the paper used for this kind of data
    batch_size: int


DATASETS = {
    # MovieLens: the paper blocks rows by popularity inside the user and item tables.
    "movielens-1m": Source("movielens", ("ml-1m",), "within", 1024),
    # Criteo: the paper's CTR setting, one block per table sized by the table's popularity.
    "criteo-sample": Source("criteo", ("criteo-kaggle-sample", "train_sample.txt"), "across", 256),
}


@dataclass(frozen=True)
class RunSpec:
    policy: str  # uniform | mde | mlet | pep-lottery | pep-mixed
    dim: int  # uniform width, MDE's base dim, MLET's serving width d, or PEP's base dim
    seed: int
    alpha: float | None = None
    budget_params: int | None = None
    budget_dim: int | None = None  # the uniform width whose size the budget copies (sweep only)
    mlet_width: int | None = None  # MLET training width k
    pep_target: float | None = None  # the prune run's target whose mask this retrains

    @property
    def config_key(self) -> str:
        if self.policy == "uniform":
            return f"uniform d={self.dim}"
        if self.policy == "mlet":
            return f"mlet d={self.dim} k={self.mlet_width}"
        if self.policy in PEP_POLICIES:
            return f"{self.policy} t={self.pep_target:g} d={self.dim}"
        budget = f"budget=u{self.budget_dim}" if self.budget_dim else f"budget={self.budget_params}"
        return f"mde a={self.alpha} {budget} base={self.dim}"


def prepare_dataset(name: str, data_root: Path) -> Path:
    """Convert the real dataset once; later runs reuse the cached Parquet and profile."""
    source = DATASETS[name]
    out = CACHE / name
    if not (out / SPEC_FILE).is_file():
        convert(source.kind, data_root.joinpath(*source.parts), out)
    return out


def job_config(args: argparse.Namespace, data: Path, embeddings: EmbeddingsConfig, seed: int) -> JobConfig:
    return JobConfig(
        seed=seed,
        data=DataConfig(path=str(data), batch_size=args.batch_size, eval_batch_size=8192),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=embeddings,
        train=TrainConfig(epochs=args.epochs, sparse_lr=args.sparse_lr, progress=False),
    )


def embeddings_config(args: argparse.Namespace, spec: RunSpec, pep_dir: Path | None = None) -> EmbeddingsConfig:
    if spec.policy in ("uniform", "pep-lottery"):
        return EmbeddingsConfig(policy="uniform", dim=spec.dim)
    if spec.policy == "pep-mixed":
        assert pep_dir is not None and spec.pep_target is not None
        decisions = pep_dir / target_dir_name(spec.pep_target) / "decisions.json"
        return EmbeddingsConfig(policy="decisions", dim=spec.dim, decisions=str(decisions))
    if spec.policy == "mlet":
        return EmbeddingsConfig(policy="uniform", dim=spec.dim, mlet=MletConfig(width=spec.mlet_width))
    mde = MdeConfig(alpha=spec.alpha, mode=args.mode, blocks=args.blocks, budget_params=spec.budget_params)
    return EmbeddingsConfig(policy="mde", dim=spec.dim, mde=mde)


def run_one(args: argparse.Namespace, data: Path, spec: RunSpec, pep_dir: Path | None = None) -> dict[str, Any]:
    """Plan, train for args.epochs and test one config and seed; infeasible plans are rows too.
    PEP retrains read the prune run in `pep_dir`."""
    row: dict[str, Any] = {"config": spec.config_key, **asdict(spec)}
    cfg = job_config(args, data, embeddings_config(args, spec, pep_dir), spec.seed)
    with tempfile.TemporaryDirectory(dir=CACHE) as plan_dir:
        try:
            bundle = make_plan(cfg.embeddings, data, TopologySpec(world_size=1), plan_dir,
                               batch_size=cfg.data.batch_size, optimizer=cfg.train.sparse_optimizer)
        except PlanError as e:
            return {**row, "error": str(e)}
        started = time.perf_counter()
        train = make_reader(cfg, bundle, "train", 0, 1)
        ticket = None
        if spec.policy == "pep-lottery":
            assert pep_dir is not None and spec.pep_target is not None
            ticket = LotteryTicket.load(pep_dir, spec.pep_target)
            sharded = build_sharded(cfg, bundle, train.spec, CPU, method=PepLottery(ticket))
            keeper = MaskKeeper(table_shards(sharded), ticket.masks)
        else:
            sharded = build_sharded(cfg, bundle, train.spec, CPU)
        step = rating_step if args.target == "rating" else train_step
        for epoch in range(cfg.train.epochs):
            train.set_epoch(epoch)
            for batch in train:
                loss = step(sharded, batch)
                if ticket is not None:
                    keeper.on_step(None)
        test = ParquetBatchReader(data, "test", cfg.data.eval_batch_size, shuffle=False, drop_last=False,
                                  id_maps=bundle.id_maps())
        if args.target == "rating":
            metrics = rating_errors(sharded.model, test)
        else:
            result = evaluate_pointwise(sharded.model, test, CPU)
            metrics = {"auc": result.auc, "logloss": result.logloss, "test_examples": result.examples}
    plan = bundle.dimension_plan
    return {
        **row,
        # The lottery ticket's tables are dense in memory; what it keeps is its non-zeros.
        "params": ticket.nonzero if ticket is not None else plan.serve_params(),
        "widths": sorted({b.dim for t in plan.tables for b in t.blocks}),
        **metrics,
        "last_train_loss": loss.item(),
        "seconds": time.perf_counter() - started,
    }


def prune_run(args: argparse.Namespace, data: Path, seed: int, out: Path) -> dict[str, Any]:
    """PEP's prune stage: train until every target's mask is written or --prune-steps run out."""
    pep = PepConfig(granularity=args.granularity, s_init=args.s_init, threshold_lr=args.threshold_lr,
                    weight_decay=args.pep_weight_decay, targets=args.pep_targets, out=str(out))
    cfg = replace(job_config(args, data, EmbeddingsConfig(dim=args.pep_dim), seed), pep=pep)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=CACHE) as plan_dir:
        method = PepPrune()  # its tables carry thresholds: planned by the method, not uniform
        bundle = plan_with(partial(method.dimension_plan, cfg), data, TopologySpec(world_size=1), plan_dir,
                           batch_size=cfg.data.batch_size, optimizer=cfg.train.sparse_optimizer)
        train = make_reader(cfg, bundle, "train", 0, 1)
        sharded = build_sharded(cfg, bundle, train.spec, CPU, method=method)
        callback = PruneCallback(pep_module(sharded.model), cfg, None)
        step, epoch = 0, 0
        while step < args.prune_steps and not callback.stop_requested:
            train.set_epoch(epoch)
            for batch in train:
                train_step(sharded, batch)
                step += 1
                callback.on_step(StepInfo(step, epoch, batch.labels.numel(), 0.0, 0.0, None))
                if callback.stop_requested or step >= args.prune_steps:
                    break
            epoch += 1
        summary: dict[str, Any] = {}
        callback.on_train_end(summary)
    return {**summary["pep"], "steps": step, "seconds": time.perf_counter() - started}


def pep_rows(args: argparse.Namespace, data: Path, seed: int, log: Log) -> list[dict[str, Any]]:
    """One prune run, then both retrains of every target it reached; missed targets are rows too."""
    with tempfile.TemporaryDirectory(dir=CACHE) as out:
        pruned = prune_run(args, data, seed, Path(out))
        log(f"prune seed {seed}: reached {sorted(pruned['reached'], key=float, reverse=True)} in "
            f"{pruned['steps']} steps ({pruned['seconds']:.0f}s), missed {pruned['missed']}, "
            f"kept {pruned['kept_fraction']:.4f} at the end")
        rows = []
        for target in args.pep_targets:
            for policy in PEP_POLICIES:
                spec = RunSpec(policy, args.pep_dim, seed, pep_target=target)
                reached = pruned["reached"].get(f"{target:g}")
                if reached is None:
                    rows.append({"config": spec.config_key, **asdict(spec),
                                 "error": f"target {target:g} not reached in {pruned['steps']} prune steps"})
                    continue
                rows.append({**run_one(args, data, spec, Path(out)), "prune_step": reached["step"]})
                log_row(log, rows[-1], args)
    return rows


def predicted_rating(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The DLRM's logit squashed onto the 1..5 star scale: bounded, and a zero logit means 3 stars."""
    return 1.0 + 4.0 * torch.sigmoid(model(batch)[1])


def rating_step(sharded: ShardedModel, batch: Any) -> torch.Tensor:
    """trainer.loop.train_step with MSE on the raw rating in place of BCE on the like label."""
    loss = F.mse_loss(predicted_rating(sharded.model, batch), batch.extra[RATING].float())
    sharded.optimizer.zero_grad()
    loss.backward()
    sharded.optimizer.step()
    return loss.detach()


@torch.no_grad()
def rating_errors(model: torch.nn.Module, reader: ParquetBatchReader) -> dict[str, Any]:
    """Test MSE and RMSE of the predicted rating (one process, so no gather as in evaluate)."""
    model.eval()
    squared, n = 0.0, 0
    for batch in reader:
        squared += F.mse_loss(predicted_rating(model, batch), batch.extra[RATING].float(), reduction="sum").item()
        n += batch.labels.numel()
    model.train()
    return {"mse": squared / n, "rmse": (squared / n) ** 0.5, "test_examples": n}


def mean_rating_baseline(data: Path) -> dict[str, float]:
    """Test MSE of always predicting the train split's mean rating: what any model must beat."""
    def ratings(split: str) -> Any:
        return pq.read_table(split_dir(data, split), columns=[RATING])[RATING].to_numpy().astype("float64")

    mean = float(ratings("train").mean())
    mse = float(((ratings("test") - mean) ** 2).mean())
    return {"train_mean_rating": mean, "mse": mse, "rmse": mse ** 0.5}


def uniform_params(data: Path, dim: int) -> int:
    """Serving parameters of the uniform model at `dim`: the budget an MDE plan is held to."""
    spec = DatasetSpec.load(data)
    profile = load_profile(data)
    counts = {f: profile.counts(f) for f in spec.sparse_names}
    with tempfile.TemporaryDirectory(dir=CACHE) as out:
        return plan_dimensions(EmbeddingsConfig(policy="uniform", dim=dim), spec, counts, Path(out)).serve_params()


def uniform_specs(args: argparse.Namespace) -> list[RunSpec]:
    return [RunSpec("uniform", d, s) for d in SWEEP_DIMS for s in args.seeds]


def sweep_specs(args: argparse.Namespace, data: Path) -> list[RunSpec]:
    if args.policy == "mlet":
        # Uniform comes from the saved plain sweep (see baseline_rows), so only MLET runs here.
        return [RunSpec("mlet", d, s, mlet_width=m * d) for d in MLET_DIMS for m in MLET_K_MULTS for s in args.seeds]
    return plain_sweep_specs(args, data)


def plain_sweep_specs(args: argparse.Namespace, data: Path) -> list[RunSpec]:
    """Uniform widths, and MDE at the budgets of some of them."""
    target = TARGETS[args.target]
    specs = uniform_specs(args)
    for d in target.budget_dims:
        budget = uniform_params(data, d)
        specs += [RunSpec("mde", d * args.base_mult, s, a, budget, d) for a in target.alphas for s in args.seeds]
    return specs


def saved_rows(args: argparse.Namespace, policies: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """The plain sweep's rows of `policies` (uniform among them), if saved with these training
    settings and every uniform row of these seeds is there: the baseline MLET and PEP reuse."""
    path = RESULTS / f"quality-{args.dataset}{TARGETS[args.target].suffix}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if any(saved["settings"].get(k) != getattr(args, k) for k in TRAINING_SETTINGS):
        return None
    rows = [r for r in saved["rows"] if r["policy"] in policies and r["seed"] in args.seeds]
    uniform = sum(r["policy"] == "uniform" for r in rows)
    return rows if uniform == len(SWEEP_DIMS) * len(args.seeds) else None


def single_spec(args: argparse.Namespace, seed: int) -> RunSpec:
    if args.policy == "uniform":
        return RunSpec("uniform", args.dim, seed)
    if args.policy == "mlet":
        return RunSpec("mlet", args.dim, seed, mlet_width=args.mlet_width)
    return RunSpec("mde", args.dim, seed, args.alpha, args.budget_params)


def summarise(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per config mean/std of `metric` over seeds; for AUC also the paper's claim check."""
    configs: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = configs.setdefault(r["config"], {"policy": r["policy"], "values": [], "params": [],
                                             "error": r.get("error")})
        if metric in r:
            c["values"].append(r[metric])
            c["params"].append(r["params"])
    per_config = {}
    for key, c in configs.items():
        values = c["values"]
        per_config[key] = {
            "policy": c["policy"],
            # A PEP mask, and so its size, differs by seed; every other config's size does not.
            "params": round(statistics.fmean(c["params"])) if c["params"] else None,
            f"{metric}_mean": statistics.fmean(values) if values else None,
            f"{metric}_std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            "seeds": len(values),
            **({"error": c["error"]} if c["error"] else {}),
        }
    trained = {k: v for k, v in per_config.items() if v[f"{metric}_mean"] is not None}
    uniform = [v for v in trained.values() if v["policy"] == "uniform"]
    claim: dict[str, Any] = {}
    # The paper states its claim, and MATCH_AUC its tolerance, in AUC only.
    if uniform and metric == "auc":
        best = max(v["auc_mean"] for v in uniform)

        def smallest(policy: str) -> int | None:
            ok = [v["params"] for v in trained.values() if v["policy"] == policy and v["auc_mean"] >= best - MATCH_AUC]
            return min(ok) if ok else None

        u = smallest("uniform")
        claim = {"best_uniform_auc": best, "target_auc": best - MATCH_AUC, "uniform_params_at_target": u}
        for other in sorted({v["policy"] for v in trained.values()} - {"uniform"}):
            m = smallest(other)
            claim[f"{other}_params_at_target"] = m
            claim[f"param_ratio_uniform_over_{other}"] = (u / m) if u and m else None
        claim |= {
            # Per config: the largest uniform model whose mean AUC it reaches within MATCH_AUC,
            # and how many times its serving params that model has (the "d x smaller" question).
            "matches_uniform": {key: matched_uniform(v, trained) for key, v in trained.items()
                                if v["policy"] != "uniform"},
        }
    return {"configs": per_config, "claim": claim}


def series_label(key: str, config: dict[str, Any]) -> str:
    """One plotted curve per uniform, per MDE alpha, per MLET k/d (keys as RunSpec.config_key)."""
    if config["policy"] == "uniform":
        return "uniform"
    if config["policy"] == "mlet":
        d, k = (int(part.split("=")[1]) for part in key.split()[1:3])
        return f"MLET k={k // d}d"
    if config["policy"] == "pep-lottery":
        return "PEP lottery ticket (non-zeros)"
    if config["policy"] == "pep-mixed":
        return "PEP mixed-dim retrain"
    return f"MDE alpha={key.split()[1][2:]}"


def matched_uniform(config: dict[str, Any], trained: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The largest uniform model whose mean AUC `config` reaches within MATCH_AUC, and its size ratio."""
    reached = [(k, u) for k, u in trained.items()
               if u["policy"] == "uniform" and config["auc_mean"] >= u["auc_mean"] - MATCH_AUC]
    if not reached:
        return None
    key, u = max(reached, key=lambda ku: ku[1]["params"])
    return {"uniform": key, "param_ratio": u["params"] / config["params"]}


def plot(summary: dict[str, Any], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, c in summary["configs"].items():
        if c[f"{metric}_mean"] is None:
            continue
        label = series_label(key, c)
        groups.setdefault(label, []).append(c)
    for label, cs in sorted(groups.items()):
        cs = sorted(cs, key=lambda c: c["params"])
        ax.errorbar([c["params"] for c in cs], [c[f"{metric}_mean"] for c in cs],
                    yerr=[c[f"{metric}_std"] for c in cs],
                    marker="o" if label == "uniform" else "s", capsize=3, label=label,
                    linewidth=2 if label == "uniform" else 1)
    if summary["claim"]:
        ax.axhline(summary["claim"]["target_auc"], color="grey", linestyle=":", label="best uniform - 0.002")
    if "mean_rating_baseline" in summary:
        # As text, not a line: the baseline sits far above every model and would flatten the curves.
        ax.text(0.02, 0.97, f"predicting the train mean rating: MSE {summary['mean_rating_baseline']['mse']:.3f}",
                transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (serving, incl. projections; PEP lottery: non-zeros)")
    ax.set_ylabel(f"test {metric.upper()} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--policy", choices=["uniform", "mde", "mlet", "pep"], default="uniform")
    p.add_argument("--dim", type=int, default=16, help="uniform width, MDE base dim or MLET d (default 16)")
    p.add_argument("--mlet-width", type=int, default=64, help="MLET: training width k (default 64)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--budget-params", type=int, default=None, help="MDE: serving params to aim for")
    p.add_argument("--mode", choices=["within", "across"], default=None,
                   help="MDE blocking (default: within for movielens, across for criteo, as the paper)")
    p.add_argument("--blocks", type=int, default=8, help="MDE within: blocks per table")
    p.add_argument("--base-mult", type=int, default=2, help="--sweep: MDE base dim = this x the budget's d")
    pep = p.add_argument_group("PEP (--policy pep)")
    pep.add_argument("--pep-dim", type=int, default=64, help="base dim the prune run starts from (default 64)")
    pep.add_argument("--pep-targets", type=lambda s: [float(x) for x in s.split(",")],
                     default=[0.5, 0.25, 0.125, 0.0625], help="kept fractions to save masks at")
    pep.add_argument("--granularity", choices=GRANULARITIES, default="dimension",
                     help="threshold granularity (default dimension)")
    pep.add_argument("--s-init", type=float, default=-15.0)
    pep.add_argument("--threshold-lr", type=float, default=0.05)
    pep.add_argument("--pep-weight-decay", type=float, default=1e-3, help="L2 on s (default 1e-3)")
    pep.add_argument("--prune-steps", type=int, default=3000, help="most steps of a prune run")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--target", choices=sorted(TARGETS), default="like",
                   help="like: classify rating >= 4 (AUC); rating: regress the raw rating (MSE; MovieLens only)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 1024 for movielens, 256 for criteo-sample (8k train rows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sparse-lr", type=float, default=0.05)
    args = p.parse_args(argv)
    if args.target == "rating" and args.policy == "pep":
        p.error("--policy pep prunes under the like label's loss; --target rating is not supported")
    if args.target == "rating" and DATASETS[args.dataset].kind != "movielens":
        p.error(f"--target rating needs a dataset with ratings (MovieLens), not {args.dataset}")
    args.mode = args.mode or DATASETS[args.dataset].mode
    args.batch_size = args.batch_size or DATASETS[args.dataset].batch_size
    return args


def log_row(log: Log, row: dict[str, Any], args: argparse.Namespace, prefix: str = "") -> None:
    if "error" in row:
        shown = f"skipped: {row['error']}"
    else:
        scores = f"mse {row['mse']:.4f} rmse {row['rmse']:.4f}" if args.target == "rating" \
            else f"auc {row['auc']:.4f} logloss {row['logloss']:.4f}"
        shown = f"{scores} params {row['params']:,} ({row['seconds']:.0f}s)"
    log(f"{prefix}{row['config']} seed {row['seed']}: {shown}")


def baseline_rows(args: argparse.Namespace, data: Path, policies: tuple[str, ...], log: Log) -> list[dict[str, Any]]:
    """The plain sweep's rows of `policies`, reused when saved with these settings, else run."""
    saved = saved_rows(args, policies)
    if saved is not None:
        log(f"reusing {len(saved)} {' and '.join(policies)} rows from the saved sweep")
        return saved
    specs = [s for s in plain_sweep_specs(args, data) if s.policy in policies]
    rows = []
    for i, spec in enumerate(specs):
        rows.append(run_one(args, data, spec))
        log_row(log, rows[-1], args, f"[{i + 1}/{len(specs)}] ")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Intra-op threads spin-wait when other processes hold the cores (this machine's normal
    # state while tests run beside a benchmark): one thread is steadier and, at these sizes, no slower.
    torch.set_num_threads(args.threads)
    init_single_process_group()
    CACHE.mkdir(parents=True, exist_ok=True)
    data = prepare_dataset(args.dataset, args.data_root)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    if args.sweep and args.policy in ("mlet", "pep"):
        rows += baseline_rows(args, data, ("uniform",) if args.policy == "mlet" else ("uniform", "mde"), log)
    if args.policy == "pep":
        for seed in args.seeds:
            rows += pep_rows(args, data, seed, log)
    else:
        specs = sweep_specs(args, data) if args.sweep else [single_spec(args, s) for s in args.seeds]
        for i, spec in enumerate(specs):
            rows.append(run_one(args, data, spec))
            log_row(log, rows[-1], args, f"[{i + 1}/{len(specs)}] ")
    target = TARGETS[args.target]
    summary = summarise(rows, target.metric)
    if args.target == "rating":
        summary["mean_rating_baseline"] = mean_rating_baseline(data)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.sweep:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = f"-{args.policy}" if args.policy in ("mlet", "pep") else ""
        out = RESULTS / f"quality-{args.dataset}{target.suffix}{suffix}.json"
        out.write_text(json.dumps({"settings": settings, "rows": rows, **summary}, indent=1) + "\n")
        plot(summary, target.metric,
             f"{args.dataset}: test {target.metric.upper()} vs embedding size ({args.epochs} epochs)",
             out.with_suffix(".png"))
    print(json.dumps({"dataset": args.dataset, **summary}))


if __name__ == "__main__":
    main()
