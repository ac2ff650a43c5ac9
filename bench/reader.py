"""Rows/s of the reader alone (Parquet -> KeyedJaggedTensor batches) against what the trainer
consumes from the same data on the same cores.

The reader is `datasets/reader.py`'s ParquetBatchReader over the train split, exactly as the
trainer opens it (shuffled, validated), with the default prefetch queue and with a queue of one
batch (the reader always assembles on its background thread; one slot is the least prefetch it
has). The trainer's rate is `samples_per_s` of a short single-rank `trainer.loop.run_worker` run
on the same data (evaluation capped at one batch so the figure is training), and its summary's
`data_wait_share` says how much of that run waited for input. Goal: reader >= 5x the trainer.

    .venv/bin/python bench/reader.py [DATASET] [--batch-size 2048] [--repeats 3] [--quick] [--s3]

DATASET is whatever `data.path` accepts (a folder written by `embshard data`, or a URI where the
reader supports one); without it a cached synthetic Criteo-shaped dataset is used. `--s3` also
uploads the (local) dataset to a bucket on moto's S3 server, started on 127.0.0.1 as the tests
start it (tests/s3_server.py; moto and boto3 come from requirements/test.txt), and measures the
reader from the bucket beside the local passes: what reading over the S3 protocol costs, without
a real network's latency. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bench_main,
    init_single_process_group,
    interleaved_rates,
    median_rates,
    synth_dataset,
)

from embshard.cluster.launch import plan_for_training  # noqa: E402
from embshard.config import CheckpointConfig, ClusterConfig, DataConfig, JobConfig, TrainConfig  # noqa: E402
from embshard.datasets.reader import ParquetBatchReader  # noqa: E402
from embshard.datasets.storage import copytree, is_uri, location  # noqa: E402
from embshard.trainer.loop import quiet_libraries, run_worker  # noqa: E402

GOAL = 5.0


def reader_rate(path: str, batch_size: int, prefetch: int, max_batches: int | None) -> float:
    """Rows/s of one pass over the train split, consuming batches and doing nothing else."""
    reader = ParquetBatchReader(path, "train", batch_size, shuffle=True, prefetch=prefetch)
    rows = 0
    start = time.perf_counter()
    for i, batch in enumerate(reader):
        rows += batch.labels.numel()
        if max_batches is not None and i + 1 >= max_batches:
            break
    return rows / (time.perf_counter() - start)


def trainer_summary(path: str, batch_size: int, max_steps: int | None, out_dir: Path) -> dict:
    """A short single-rank training run on `path` (no checkpoints, metrics or progress bar)."""
    cfg = JobConfig(
        output_dir=str(out_dir),
        data=DataConfig(path=path, batch_size=batch_size),
        train=TrainConfig(max_steps=max_steps, eval_max_batches=1, progress=False),
        checkpoint=CheckpointConfig(enabled=False),
        cluster=ClusterConfig(workers=1),
    )
    plan_for_training(cfg)
    return run_worker(cfg)


@contextmanager
def s3_copy(dataset: Path, tmp: Path) -> Iterator[str]:
    """`dataset` uploaded to a bucket on a moto S3 server of this process's own; -> its URI. The
    server's endpoint and credentials go into os.environ, where the reader's pyarrow S3 file
    system reads them (as it reads a user's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import s3_server  # the tests' starter: one way to run the server

    with s3_server(tmp / "moto.log") as server:
        os.environ.update(server.env)
        server.client().create_bucket(Bucket="bench")
        uri = "s3://bench/reader"
        copytree(dataset, location(uri))
        yield uri


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", help="dataset folder or URI (default: a cached synthetic one)")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the synthetic dataset")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--prefetch", type=int, default=DataConfig.prefetch, help="the 'on' queue size")
    p.add_argument("--train-steps", type=int, default=None, help="cap the training run (default: one epoch)")
    p.add_argument("--max-batches", type=int, default=None, help="cap each reader pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a few seconds' smoke run on a small dataset")
    p.add_argument("--s3", action="store_true", help="also read the dataset from a local moto S3 server")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.batch_size, args.repeats, args.train_steps = 20_000, 512, 1, 10
    path = args.dataset or str(synth_dataset(args.rows, 100_000))
    if args.s3 and is_uri(path):
        p.error("--s3 uploads a local dataset to its own server; DATASET is a URI already")

    quiet_libraries()
    init_single_process_group()
    with tempfile.TemporaryDirectory(prefix="embshard-reader-bench-") as tmp:
        summary = trainer_summary(path, args.batch_size, args.train_steps, Path(tmp) / "run")
        passes = {f"reader_prefetch_{q}": partial(reader_rate, path, args.batch_size, q, args.max_batches)
                  for q in (args.prefetch, 1)}
        with (s3_copy(Path(path), Path(tmp)) if args.s3 else nullcontext()) as uri:
            if uri is not None:
                passes["s3_reader"] = partial(reader_rate, uri, args.batch_size, args.prefetch, args.max_batches)
            rates = median_rates(interleaved_rates(passes, args.repeats))
    on, off = rates[f"reader_prefetch_{args.prefetch}"], rates["reader_prefetch_1"]
    trainer = summary["samples_per_s"]
    print(f"trainer {trainer:,.0f} samples/s over {summary['steps']} steps, data wait "
          f"{100 * summary['data_wait_share']:.1f}% of the run; reader {on:,.0f} rows/s "
          f"(prefetch {args.prefetch}), {off:,.0f} (prefetch 1): {on / trainer:.1f}x the trainer "
          f"(goal >= {GOAL:g}x)", file=sys.stderr)
    s3: dict[str, float] = {}
    if args.s3:
        s3 = {"s3_reader_rows_per_s": round(rates["s3_reader"]), "s3_ratio": round(rates["s3_reader"] / trainer, 2)}
        print(f"reader from the S3 server {rates['s3_reader']:,.0f} rows/s (prefetch {args.prefetch}): "
              f"{rates['s3_reader'] / on:.2f}x local, {s3['s3_ratio']:.1f}x the trainer", file=sys.stderr)
    print(json.dumps({
        "bench": "reader",
        "dataset": path,
        "batch_size": args.batch_size,
        "prefetch": args.prefetch,
        "reader_rows_per_s": round(on),
        "reader_prefetch_1_rows_per_s": round(off),
        "trainer_samples_per_s": round(trainer),
        "trainer_steps": summary["steps"],
        "trainer_data_wait_share": round(summary["data_wait_share"], 4),
        "ratio": round(on / trainer, 2),
        "ratio_prefetch_1": round(off / trainer, 2),
        "ratio_goal": GOAL,
        **s3,
    }))


if __name__ == "__main__":
    bench_main(main)
