"""Shared set-up for the benchmarks: a single-process gloo group, cached datasets, in-memory
batches. Benchmarks compare variants measured in the same run, interleaved, and report ratios:
absolute numbers drift between machines."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from embshard.config import DataConfig, EmbeddingsConfig, JobConfig, ModelConfig
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import SPEC_FILE, DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.errors import EXIT_USER_ERROR, EmbshardError, one_line
from embshard.planner.pipeline import PlanBundle, make_plan
from embshard.planner.topology import TopologySpec
from embshard.planner.types import DimensionPlan

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache"


def bench_main(main: Callable[[], int | None]) -> None:
    """A bench script's entry point: embshard's errors (a dataset not found, a bad --set) are one
    line and exit 2, as `embshard` says them, not a traceback."""
    try:
        code = main()
    except EmbshardError as e:
        print(f"{Path(sys.argv[0]).name}: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)


def results_folder(p: argparse.ArgumentParser, folder: str, names: list[str], overwrite: bool) -> Path:
    """bench/results/FOLDER (named by --label), where a script writes `names`; refused before any
    work where one of them exists and `overwrite` is not given, or where FOLDER is not one folder's
    name (an absolute --label or one with '..' wrote anywhere)."""
    if folder in ("", ".", "..") or Path(folder).name != folder:
        p.error(f"--label: {folder!r} is not the name of one folder under bench/results/ (no '/')")
    out = RESULTS / folder
    refuse_existing(p, [out / name for name in names], overwrite)
    return out


def out_files(p: argparse.ArgumentParser, out: Path, suffixes: list[str], overwrite: bool) -> list[Path]:
    """The files OUT.<suffix> of an --out OUT, each refused where it exists without --overwrite.
    OUT may end in one of the suffixes; any other dot in it is part of the name (`res.v2`)."""
    if out.name in ("", ".", ".."):
        p.error(f"--out {out}: names the files OUT{', OUT'.join(suffixes)}: give it a name, not a folder")
    stem = out.with_suffix("") if out.suffix in suffixes else out
    files = [stem.with_name(stem.name + suffix) for suffix in suffixes]
    refuse_existing(p, files, overwrite)
    return files


def refuse_existing(p: argparse.ArgumentParser, paths: list[Path], overwrite: bool) -> None:
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        p.error(f"{existing[0]} exists; pass --overwrite to replace it")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renamed over it: a failed run leaves
    the old one, and no file of the user's is taken for the temporary one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def init_single_process_group() -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def train_here(cfg: JobConfig, method: str) -> tuple[DimensionPlan, dict]:
    """One run in this process (a one-rank group), through the driver's planning step and the
    workers' loop: -> its plan and run_worker's summary."""
    # Imported here: the speed benchmarks share this module and need neither Ray nor the loop.
    from embshard.cluster.launch import plan_for_training
    from embshard.trainer.loop import run_worker

    bundle = plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), method)
    return bundle.dimension_plan, run_worker(cfg, method=method)


def synth_dataset(rows: int, max_cardinality: int, seed: int = 0) -> Path:
    path = CACHE / f"synth-{rows}-{max_cardinality}-{seed}"
    if not (path / SPEC_FILE).is_file():
        synthesize(path, rows=rows, seed=seed, max_cardinality=max_cardinality)
    return path


def load_batches(path: Path, batch_size: int, n: int, id_maps=None) -> list[Batch]:
    reader = ParquetBatchReader(path, "train", batch_size, shuffle=False, id_maps=id_maps)
    batches = list(islice(iter(reader), n))
    if len(batches) < n:
        raise SystemExit(f"{path}: only {len(batches)} batches of {batch_size}; need {n} (raise --rows)")
    return batches


def interleaved_rates(
    variants: dict[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Run every variant `repeats` times, round-robin, so slow drift of the machine hits all alike.
    Each callable returns samples/s of one timed pass."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            rates[name].append(run())
    return rates


def median_rates(rates: dict[str, list[float]]) -> dict[str, float]:
    """Print every pass of every variant (stderr); -> each variant's median samples/s."""
    width = max(map(len, rates))
    for name, xs in rates.items():
        print(f"{name:>{width}}: " + ", ".join(f"{x:,.0f}" for x in xs) + " samples/s", file=sys.stderr)
    return {name: statistics.median(xs) for name, xs in rates.items()}


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_arguments(doc: str | None, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every throughput comparison shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--max-cardinality", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed steps per pass")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=repeats)
    return p


@dataclass
class BenchData:
    path: Path
    warm: list[Batch]
    timed: list[Batch]

    @property
    def num_dense(self) -> int:
        return self.timed[0].dense.shape[1]

    @property
    def spec(self) -> DatasetSpec:
        return DatasetSpec.load(self.path)


def prepare(args: argparse.Namespace) -> BenchData:
    """One gloo rank, the cached synthetic dataset and its first batches held in memory."""
    warnings.filterwarnings("ignore")
    init_single_process_group()
    path = synth_dataset(args.rows, args.max_cardinality)
    batches = load_batches(path, args.batch_size, args.steps + args.warmup)
    return BenchData(path, batches[: args.warmup], batches[args.warmup :])


def bench_job(
    name: str, data: BenchData, batch_size: int, embeddings: EmbeddingsConfig
) -> tuple[JobConfig, PlanBundle]:
    """The benchmarks' DLRM on `data`, planned for one CPU rank."""
    cfg = JobConfig(
        output_dir=str(CACHE / name),
        data=DataConfig(path=str(data.path), batch_size=batch_size),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=embeddings,
    )
    bundle = make_plan(cfg.embeddings, data.path, TopologySpec(1, "cpu"), cfg.plan_dir,
                       batch_size=batch_size, optimizer=cfg.train.sparse_optimizer)
    return cfg, bundle
