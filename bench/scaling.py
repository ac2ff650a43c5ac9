"""Cost curves: how samples/s, step time and peak RSS per rank grow with the work, embshard beside
plain TorchRec measured in the same run.

Curves (gloo on CPU, tables sharded table-wise or column-wise as TorchRec's planner chooses):

  rows    one large table of 1M -> 100M rows beside 25 small ones, 2 ranks
  tables  26 -> 500 small tables, 2 ranks
  batch   batch size per rank, at the smallest `rows` point
  ranks   1 vs 2 ranks, at the smallest `rows` point
  mlet    MLET at the largest `rows` point (training width = --dim, serving width --dim / 2);
          also the collapse to n x d and a checkpoint of it: their time and peak RSS, and a check
          from the shard metadata that no rank gathers a table it does not hold
  mde     MDE (across tables, popularity 1/rows) at the largest `rows` point

Every point is measured as --pairs interleaved pairs: plain TorchRec, then embshard, then TorchRec
again, ..., each pass in fresh processes (one per rank), never both at once: the tables are built
on meta and materialised as shards, as the trainer does. A point's speed ratio is the median of its
per-pair ratios (with their min and max), so load that drifts between passes of a shared machine
hits both sides alike; the 1-minute load average seen around the passes is recorded beside it.
TorchRec's side is `bench/throughput.py`'s baseline (its DLRM, textbook loop) on the uniform plan
at --dim; embshard's is `trainer.build` + `trainer.loop.train_step` on the point's plan. Batches
are random ids (uniform over each table: the worst case for caches), generated per rank in memory,
so data loading is out of the picture (`bench/reader.py` measures it). For every embshard point
the planner's per-rank bytes are compared with what DMP holds (`trainer/held_memory.py`).

Before anything runs, every point's memory is foreseen: planned tables, plus per rank what a
process starts with and one step's dot interaction (`step_bytes`: O(batch x features^2), which at
500 tables dwarfs the tables); a point over --max-memory (or 2/3 of the available memory) is
refused with one line.

    .venv/bin/python bench/scaling.py [--curve rows --curve mlet ...] [--max-rows 10M] [--pairs 3] [--quick]

Prints one JSON line per point, a summary JSON line with the fitted growth exponent per curve
(slope of log y over log x) and writes the lines and a log-log PNG to --out(.jsonl|.png).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))  # the multi-process helper the tests use
from common import bench_main, out_files, write_atomic  # noqa: E402
from distributed import run_ranks  # noqa: E402
from throughput import embshard_steps, run_baseline, run_embshard, torchrec_baseline  # noqa: E402

from embshard.config import DataConfig, EmbeddingsConfig, JobConfig, MdeConfig, MletConfig, ModelConfig  # noqa: E402
from embshard.datasets.reader import Batch  # noqa: E402
from embshard.datasets.schema import DatasetSpec, SparseFeature  # noqa: E402
from embshard.planner.memory import memory_report  # noqa: E402
from embshard.planner.pipeline import PlanBundle  # noqa: E402
from embshard.planner.policies import plan_dimensions  # noqa: E402
from embshard.planner.shard_plan import plan_sharding  # noqa: E402
from embshard.planner.topology import GIB, TopologySpec  # noqa: E402

CURVES = ("rows", "tables", "batch", "ranks", "mlet", "mde")
NUM_DENSE = 13
OPTIMIZER = "rowwise_adagrad"
SHARDING_TYPES = ["table_wise", "column_wise"]
DMP_TOLERANCE = 0.05  # planner bytes vs DMP's, relative (tests/test_plan_memory_dmp.py's bound)
# Distinct random batches per rank, cycled: enough that no step reuses the previous one's rows.
DISTINCT_BATCHES = 8
DENSE_ARCH, OVER_ARCH = [64], [128, 64]
FLOAT_BYTES = 4
# Memory a point may plan for without --max-memory: the rest of what is available stays free for
# allocator slack and the neighbours of a shared machine.
AVAILABLE_SHARE = 2 / 3


@dataclass(frozen=True)
class Shape:
    """One model and topology measured: everything a point's figures depend on."""

    big_rows: int  # rows of the one large table; 0 = none
    small_tables: int
    small_rows: int
    batch_size: int  # per rank
    world: int
    dim: int
    policy: str = "uniform"  # uniform | mlet | mde

    def spec(self) -> DatasetSpec:
        sparse = [SparseFeature(f"s{i}", self.small_rows) for i in range(self.small_tables)]
        if self.big_rows:
            sparse.insert(0, SparseFeature("big", self.big_rows))
        return DatasetSpec("scaling", [f"I{i}" for i in range(NUM_DENSE)], sparse)

    def embeddings(self) -> EmbeddingsConfig:
        if self.policy == "mlet":
            # Trains at k = dim (the curve's tables, so the same training memory), serves dim / 2.
            return EmbeddingsConfig(dim=self.dim // 2, mlet=MletConfig(width=self.dim))
        if self.policy == "mde":
            return EmbeddingsConfig(policy="mde", dim=self.dim, mde=MdeConfig(mode="across"))
        return EmbeddingsConfig(dim=self.dim)


@dataclass(frozen=True)
class Point:
    curve: str
    x: int  # the curve's variable
    shape: Shape


def job_config(shape: Shape, directory: Path) -> JobConfig:
    """The shape's job: bench/common.py's DLRM. No dataset: batches are made in memory. Its
    output folder (MLET's checkpoint) sits beside the plan folder: a checkpoint copies the plan."""
    return JobConfig(
        output_dir=str(directory.parent / "run"),
        data=DataConfig(path=str(directory / "no-data"), batch_size=shape.batch_size),
        model=ModelConfig(dense_arch=DENSE_ARCH, over_arch=OVER_ARCH),
        embeddings=shape.embeddings(),
    )


def plan(shape: Shape, directory: Path) -> PlanBundle:
    """The shape's plan saved in `directory` (no data: MDE across falls back to 1/rows popularity)."""
    cfg = job_config(shape, directory)
    dim_plan = plan_dimensions(cfg.embeddings, shape.spec(), None, directory)
    shard = plan_sharding(dim_plan, TopologySpec(shape.world, "cpu"), batch_size=shape.batch_size,
                          optimizer=OPTIMIZER, sharding_types=SHARDING_TYPES)
    bundle = PlanBundle(dim_plan, shard, memory_report(dim_plan, shard, OPTIMIZER), directory)
    bundle.save()
    return bundle


def step_bytes(shape: Shape) -> int:
    """What one rank's training step adds above its built model: DLRM's dot interaction (TorchRec's
    `InteractionArch`, which both sides run) over f = features + 1 (the dense arch's output) and
    p = f(f-1)/2 pairs. The (B, f, f) matrix of dot products, its upper triangle gathered to
    (B, p) and that concatenated with the dense output (B, p + d) are alive together at the end
    of the forward; the backward has the same sizes in reverse. The over-arch's first layer,
    p + d wide, gets a gradient and Adam's two moments on the first step. Independent of the
    tables' rows: O(batch x features^2), so it, not the tables, bounds the `tables` curve."""
    f = len(shape.spec().sparse) + 1
    pairs = f * (f - 1) // 2
    activations = shape.batch_size * (f * f + 2 * (pairs + shape.dim))
    first_layer = 3 * (pairs + shape.dim) * OVER_ARCH[0]
    return FLOAT_BYTES * (activations + first_layer)


def random_batches(spec: DatasetSpec, batch_size: int, seed: int) -> list[Batch]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(DISTINCT_BATCHES):
        ids = [torch.randint(f.cardinality, (batch_size,), generator=g) for f in spec.sparse]
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=spec.sparse_names, values=torch.cat(ids),
            lengths=torch.ones(batch_size * len(ids), dtype=torch.int32))
        out.append(Batch(torch.randn(batch_size, NUM_DENSE, generator=g), sparse,
                         torch.randint(2, (batch_size,), generator=g).float(), {}))
    return out


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last `reset_peak_rss`) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    # Linux: writing 5 resets VmHWM to the current RSS, so a phase's own peak can be read.
    Path("/proc/self/clear_refs").write_text("5")


def measure(rank: int, world: int, variant: str, plan_dir: str, shape: Shape, steps: int,
            warmup: int, passes: int, collapse: bool) -> dict[str, Any]:
    """One rank of one point: build, `warmup` steps, `passes` timed passes of `steps` steps (the
    median counts: neighbours on a shared machine slow single passes), figures (and MLET's collapse)."""
    from embshard.trainer.build import build_sharded
    from embshard.trainer.held_memory import held_bytes
    from embshard.trainer.loop import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # ranks share the cores; one thread each, as Ray workers get
    directory = Path(plan_dir)
    cfg, bundle = job_config(shape, directory), PlanBundle.load(directory, OPTIMIZER)
    start_rss = rss_bytes("VmRSS")
    started = time.perf_counter()
    if variant == "torchrec":
        model, optimizer = torchrec_baseline(cfg, bundle, NUM_DENSE)
        run = lambda bs: run_baseline(model, optimizer, bs)  # noqa: E731
    else:
        sharded = build_sharded(cfg, bundle, shape.spec(), torch.device("cpu"))
        stepper = embshard_steps(sharded, cfg.train.pipeline)
        run = lambda bs: run_embshard(stepper, bs, [], cfg.train.log_every)  # noqa: E731
    build_seconds = time.perf_counter() - started
    built_rss = rss_bytes("VmRSS")
    batches = random_batches(shape.spec(), shape.batch_size, seed=rank)
    run([batches[i % len(batches)] for i in range(warmup)])
    rates = []
    for _ in range(passes):
        dist.barrier()
        rates.append(run([batches[i % len(batches)] for i in range(steps)]))
    rate = statistics.median(rates)
    out: dict[str, Any] = {
        "samples_per_s": rate,
        "build_seconds": build_seconds,
        "start_rss": start_rss,
        "built_rss": built_rss,
        "peak_rss": rss_bytes("VmHWM"),
    }
    if variant == "embshard":
        out["held_train_bytes"] = held_bytes(sharded)["train_bytes"]
        out["planned_train_bytes"] = bundle.memory.per_rank[rank]["train_bytes"]
        if collapse:
            out.update(_collapse_and_checkpoint(rank, cfg, sharded, directory))
    return out


def _collapse_and_checkpoint(rank: int, cfg: JobConfig, sharded, plan_dir: Path) -> dict[str, Any]:
    """MLET's collapse alone, then a whole checkpoint (which collapses again): time and peak RSS
    of each, and the shard-metadata check that the collapse stays where W1's shards are."""
    from embshard.sharding.mlet import collapse_mlet_tables
    from embshard.trainer.checkpoint import Progress
    from embshard.trainer.loop import checkpoint_manager

    model = sharded.model
    state = model.state_dict()
    gc.collect()
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    started = time.perf_counter()
    collapsed = collapse_mlet_tables(model, state)
    collapse_seconds = time.perf_counter() - started
    collapse_peak = rss_bytes("VmHWM") - before
    if not collapsed:
        raise AssertionError("the MLET point has no MLET tables to collapse")
    for key, w in collapsed.items():
        held = _placement(state[key])
        got = _placement(w)
        # No rank may gather a table it does not hold: W's rows live only on W1's ranks, and no
        # rank holds more of W than its share of W1 at width d (one spare row per rank for
        # uneven splits).
        assert set(got) <= set(held), (key, held, got)
        w1 = state[key]
        k, d = w1.size(1), w.size(1)
        mine_w1 = sum(s.tensor.numel() for s in w1.local_shards())
        mine_w = sum(s.tensor.numel() for s in w.local_shards())
        assert mine_w <= mine_w1 * d // k + d * dist.get_world_size(), (key, rank, mine_w, mine_w1)
    del collapsed, state
    gc.collect()
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    manager = checkpoint_manager(cfg, sharded, None)
    started = time.perf_counter()
    final = manager.save(Progress(step=1, world_size=dist.get_world_size(), batch_size=cfg.data.batch_size),
                         model, sharded.optimizer, {}, plan_dir)
    checkpoint_seconds = time.perf_counter() - started
    checkpoint_peak = rss_bytes("VmHWM") - before
    dist.barrier()
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) if rank == 0 else None
    return {
        "collapse_seconds": collapse_seconds,
        "collapse_peak_rss_above_start": collapse_peak,
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoint_peak_rss_above_start": checkpoint_peak,
        "checkpoint_bytes": size,
        "no_foreign_gather": True,  # the asserts above passed on this rank
    }


def _placement(tensor) -> dict[int, int]:
    """rank -> elements of the sharded tensor placed there (from its global shard metadata)."""
    where: dict[int, int] = {}
    for md in tensor.metadata().shards_metadata:
        rank = md.placement.rank()
        where[rank] = where.get(rank, 0) + math.prod(md.shard_sizes)
    return where


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


@dataclass(frozen=True)
class Planned:
    """One side of a point, planned: the shape it runs and where its plan is saved."""

    variant: str  # torchrec | embshard
    shape: Shape
    bundle: PlanBundle

    @property
    def directory(self) -> Path:
        return self.bundle.directory


def plan_point(point: Point, work: Path) -> list[Planned]:
    """Plain TorchRec runs the uniform plan at the point's dim; embshard the point's own."""
    sides = (("torchrec", replace(point.shape, policy="uniform")), ("embshard", point.shape))
    return [Planned(v, s, plan(s, work / f"{point.curve}-{point.x}-{v}")) for v, s in sides]


def memory_budget(args: argparse.Namespace) -> tuple[int, str]:
    share = int(mem_available() * AVAILABLE_SHARE)
    if args.max_memory and args.max_memory < share:
        return args.max_memory, "--max-memory"
    return share, f"{AVAILABLE_SHARE:.0%} of MemAvailable"


def check_memory(point: Point, sides: list[Planned], budget: tuple[int, str]) -> None:
    """Refuse a point whose foreseen memory is over the budget, before anything runs. Each rank
    starts as big as this process (torch and TorchRec imported), then holds its tables and one
    step's interaction; the two sides never run at once, so the larger one counts."""
    limit, source = budget
    process = rss_bytes("VmRSS")
    for side in sides:
        tables = sum(r["train_bytes"] for r in side.bundle.memory.per_rank.values())
        step = step_bytes(side.shape)
        need = tables + side.shape.world * (process + step)
        if need > limit:
            raise SystemExit(
                f"scaling.py: error: {point.curve} x={point.x} ({side.variant}): foreseen "
                f"{need / GIB:.1f} GiB (tables {tables / GIB:.2f} + {side.shape.world} ranks x "
                f"({process / GIB:.2f} at start + {step / GIB:.2f} for one step's dot interaction "
                f"of {len(side.shape.spec().sparse) + 1} features at batch {side.shape.batch_size})) "
                f"is over the {limit / GIB:.1f} GiB budget ({source}); lower the batch "
                f"(--batch-size, --tables-batch-size) or the point, or raise --max-memory")


def measure_point(point: Point, sides: list[Planned], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`args.pairs` interleaved pairs (TorchRec, embshard, TorchRec, ...), each pass in its own
    fresh ranks; -> the point's JSON record. The ratio is the median of the per-pair ratios:
    each pair's two passes ran minutes apart at most, so load that drifts over a point cancels."""
    record: dict[str, Any] = {"bench": "scaling", "curve": point.curve, "x": point.x, **asdict(point.shape)}
    passes: dict[str, list[dict[str, Any]]] = {side.variant: [] for side in sides}
    load = [os.getloadavg()[0]]
    for pair in range(args.pairs):
        for side in sides:
            # MLET's collapse and checkpoint are measured once: GiBs written at the largest point.
            collapse = pair == 0 and side.variant == "embshard" and side.shape.policy == "mlet"
            ranks = run_ranks(measure, side.shape.world, side.variant, str(side.directory), side.shape,
                              args.steps, args.warmup, args.passes, collapse)
            shutil.rmtree(work / "run", ignore_errors=True)  # the checkpoint
            passes[side.variant].append(_summarise(ranks, side.shape.batch_size))
            load.append(os.getloadavg()[0])
    for side in sides:
        record[side.variant] = _combine(passes[side.variant], side)
    ratios = [e["samples_per_s"] / t["samples_per_s"]
              for t, e in zip(passes["torchrec"], passes["embshard"], strict=True)]
    record.update(
        ratio=round(statistics.median(ratios), 3),
        ratio_min=round(min(ratios), 3),
        ratio_max=round(max(ratios), 3),
        pair_ratios=[round(r, 3) for r in ratios],
        load_avg_1m=[round(min(load), 2), round(max(load), 2)],
        foreseen_step_bytes_per_rank=step_bytes(point.shape),
    )
    return record


def _combine(passes: list[dict[str, Any]], side: Planned) -> dict[str, Any]:
    """A side's passes -> its figures: median speed, the highest memory any pass reached; what
    does not vary between passes (planned and held bytes, the collapse) from the pass that has it."""
    def per_rank_max(key: str) -> list[int]:
        return [max(ranks) for ranks in zip(*(p[key] for p in passes), strict=True)]

    above_built = [[peak - built for peak, built in zip(p["peak_rss_per_rank"], p["built_rss_per_rank"], strict=True)]
                   for p in passes]

    out = {**passes[0]}
    out.update(
        samples_per_s=round(statistics.median(p["samples_per_s"] for p in passes)),
        samples_per_s_per_pass=[p["samples_per_s"] for p in passes],
        step_seconds=round(statistics.median(p["step_seconds"] for p in passes), 5),
        build_seconds=round(statistics.median(p["build_seconds"] for p in passes), 2),
        peak_rss_per_rank=per_rank_max("peak_rss_per_rank"),
        start_rss_per_rank=per_rank_max("start_rss_per_rank"),
        built_rss_per_rank=per_rank_max("built_rss_per_rank"),
        # What the steps added above the built model: `step_bytes` foresees this.
        step_peak_above_built_per_rank=[max(ranks) for ranks in zip(*above_built, strict=True)],
        sharding=sorted({f"{n}:{ps.sharding_type}" for n, ps in side.bundle.shard_plan.sharding.items()
                         if n.startswith("t_big")}),
    )
    return out


def _summarise(ranks: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        # Every rank trains its own batch each step, so the job's rate is the sum of theirs.
        "samples_per_s": round(sum(r["samples_per_s"] for r in ranks)),
        "step_seconds": round(max(batch_size / r["samples_per_s"] for r in ranks), 5),
        "build_seconds": round(max(r["build_seconds"] for r in ranks), 2),
        "peak_rss_per_rank": [r["peak_rss"] for r in ranks],
        "start_rss_per_rank": [r["start_rss"] for r in ranks],
        "built_rss_per_rank": [r["built_rss"] for r in ranks],
    }
    if "held_train_bytes" in ranks[0]:
        held = [r["held_train_bytes"] for r in ranks]
        planned = [r["planned_train_bytes"] for r in ranks]
        worst = max(abs(p - h) / h for p, h in zip(planned, held, strict=True) if h)
        out.update(held_train_bytes_per_rank=held, planned_train_bytes_per_rank=planned,
                   planned_vs_held_max_rel=round(worst, 4), planned_within_5pct=worst <= DMP_TOLERANCE)
    if "collapse_seconds" in ranks[0]:
        out["collapse"] = {
            "collapse_seconds": round(max(r["collapse_seconds"] for r in ranks), 3),
            "collapse_peak_rss_above_start_per_rank": [r["collapse_peak_rss_above_start"] for r in ranks],
            "checkpoint_seconds": round(max(r["checkpoint_seconds"] for r in ranks), 3),
            "checkpoint_peak_rss_above_start_per_rank": [r["checkpoint_peak_rss_above_start"] for r in ranks],
            "checkpoint_bytes": ranks[0]["checkpoint_bytes"],
            "no_foreign_gather": all(r["no_foreign_gather"] for r in ranks),
        }
    return out


def points(args: argparse.Namespace) -> list[Point]:
    rows = [r for r in args.rows_points if r <= args.max_rows]
    if not rows:
        raise SystemExit(f"--max-rows {args.max_rows}: below every rows point {args.rows_points}")
    base = Shape(rows[0], args.small_tables, args.small_rows, args.batch_size, 2, args.dim)
    big = replace(base, big_rows=rows[-1])
    curves = {
        "rows": [Point("rows", r, replace(base, big_rows=r)) for r in rows],
        "tables": [Point("tables", n, replace(base, big_rows=0, small_tables=n, batch_size=args.tables_batch_size))
                   for n in args.tables_points],
        "batch": [Point("batch", b, replace(base, batch_size=b)) for b in args.batch_points],
        "ranks": [Point("ranks", w, replace(base, world=w)) for w in (1, 2)],
        "mlet": [Point("mlet", rows[-1], replace(big, policy="mlet"))],
        "mde": [Point("mde", rows[-1], replace(big, policy="mde"))],
    }
    return [p for c in (args.curve or CURVES) for p in curves[c]]


def growth_exponents(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """curve -> '<variant>_<figure>' -> slope of log(figure) over log(x), for curves of 2+ points."""
    out: dict[str, dict[str, float]] = {}
    for curve in dict.fromkeys(r["curve"] for r in records):
        rs = [r for r in records if r["curve"] == curve]
        if len(rs) < 2:
            continue
        x = np.log([r["x"] for r in rs])
        fits = {}
        for variant in ("torchrec", "embshard"):
            for name, ys in _figures(rs, variant).items():
                fits[f"{variant}_{name}"] = round(float(np.polyfit(x, np.log(ys), 1)[0]), 3)
        out[curve] = fits
    return out


def _figures(rs: list[dict[str, Any]], variant: str) -> dict[str, list[float]]:
    return {
        "samples_per_s": [r[variant]["samples_per_s"] for r in rs],
        "step_seconds": [r[variant]["step_seconds"] for r in rs],
        "peak_rss_per_rank": [max(r[variant]["peak_rss_per_rank"]) for r in rs],
    }


def plot(records: list[dict[str, Any]], exponents: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = list(exponents)
    names = ("samples_per_s", "step_seconds", "peak_rss_per_rank")
    fig, axes = plt.subplots(len(names), len(curves), figsize=(4 * len(curves), 9), squeeze=False)
    for j, curve in enumerate(curves):
        rs = [r for r in records if r["curve"] == curve]
        x = [r["x"] for r in rs]
        for i, name in enumerate(names):
            ax = axes[i][j]
            for variant, style in (("torchrec", "o--"), ("embshard", "s-")):
                ax.loglog(x, _figures(rs, variant)[name], style,
                          label=f"{variant} (slope {exponents[curve][f'{variant}_{name}']:.2f})")
            ax.set_xlabel(curve)
            ax.set_ylabel(name)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def count(text: str) -> int:
    """'100M', '10k', '2500' -> an integer."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except (ValueError, OverflowError):  # `inf`, `1e400`
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 2500, 10k, 100M)") from None


def counts(text: str) -> list[int]:
    return [count(t) for t in text.split(",")]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curve", action="append", choices=CURVES, help="measure only these (repeatable)")
    p.add_argument("--max-rows", type=count, default=count("100M"), help="largest table of the rows curve")
    p.add_argument("--rows-points", type=counts, default=counts("1M,3M,10M,30M,100M"))
    p.add_argument("--tables-points", type=counts, default=counts("26,50,100,200,500"))
    p.add_argument("--batch-points", type=counts, default=counts("512,1024,2048,4096,8192"))
    p.add_argument("--small-tables", type=int, default=25)
    p.add_argument("--small-rows", type=count, default=count("100k"))
    p.add_argument("--batch-size", type=int, default=2048, help="per rank")
    p.add_argument("--tables-batch-size", type=int, help="per rank, of the tables curve (default --batch-size): "
                   "its dot interaction grows with batch x tables^2")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="timed passes per process; the median counts")
    p.add_argument("--pairs", type=int, default=3,
                   help="interleaved (TorchRec, embshard) pairs of fresh processes per point")
    p.add_argument("--max-memory", type=count, help="refuse a point foreseen above this many bytes "
                   "(e.g. 8G; default and cap: 2/3 of MemAvailable)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "scaling",
                   help="writes OUT.jsonl and OUT.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier OUT.jsonl / OUT.png")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny tables, few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.rows_points, args.max_rows = [20_000, 50_000], min(args.max_rows, 50_000)
        args.tables_points, args.batch_points = [3, 6], [64, 128]
        args.small_tables, args.small_rows, args.batch_size = 3, 1000, 64
        args.steps, args.warmup, args.passes, args.pairs = 3, 1, 1, 2
        args.curve = args.curve or ["rows", "mlet"]
    args.tables_batch_size = args.tables_batch_size or args.batch_size
    if args.pairs < 1:
        p.error(f"--pairs {args.pairs}: must be at least 1")
    if args.dim % 8:
        p.error(f"--dim {args.dim}: must be a multiple of 8 (MLET serves dim / 2, and FBGEMM's CPU "
                f"kernels need multiples of 4)")
    args.out_jsonl, args.out_png = out_files(p, args.out, [".jsonl", ".png"], args.overwrite)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    records = []
    by_shape: dict[Shape, dict[str, Any]] = {}  # curves share points (rows' first is batch's 2048)
    with tempfile.TemporaryDirectory(prefix="embshard-scaling-") as tmp:
        work = Path(tmp)
        todo = points(args)
        # Every point is planned and its memory foreseen before the first runs: an infeasible one
        # is refused now, not after an hour of the points before it.
        budget = memory_budget(args)
        planned: dict[Shape, list[Planned]] = {}
        for point in todo:
            if point.shape not in planned:
                planned[point.shape] = plan_point(point, work)
                check_memory(point, planned[point.shape], budget)
        for point in todo:
            print(f"{point.curve} x={point.x}: {point.shape}", file=sys.stderr, flush=True)
            if point.shape in by_shape:
                record = {**by_shape[point.shape], "curve": point.curve, "x": point.x}
            else:
                record = by_shape[point.shape] = measure_point(point, planned[point.shape], args, work)
            print(json.dumps(record), flush=True)
            records.append(record)
    exponents = growth_exponents(records)
    summary = {
        "bench": "scaling_summary",
        "growth_exponents": exponents,
        "ratios": {f"{r['curve']}@{r['x']}": r["ratio"] for r in records},
        "ratio_ranges": {f"{r['curve']}@{r['x']}": [r["ratio_min"], r["ratio_max"]] for r in records},
        "load_avg_1m": [min(r["load_avg_1m"][0] for r in records), max(r["load_avg_1m"][1] for r in records)],
    }
    write_atomic(args.out_jsonl,
                 lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in [*records, summary])))
    if exponents:
        write_atomic(args.out_png, lambda p: plot(records, exponents, p))
    print(json.dumps(summary))


if __name__ == "__main__":
    bench_main(main)
