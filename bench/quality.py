"""Test AUC against serving bytes on the real datasets: `embshard sweep` on a cached conversion.

    .venv/bin/python bench/quality.py --dataset movielens-1m                       # uniform, mde, mlet
    .venv/bin/python bench/quality.py --dataset criteo-sample --methods uniform,pep --seeds 3
    .venv/bin/python bench/quality.py --dataset movielens-1m --resume              # after an interruption

Converts the dataset once into bench/results/cache/<dataset>-<hash of the source files>/ (other
data, or the same file rewritten, is converted again), writes the benchmark's job config beside it
(the DLRM of the earlier measurements: dense arch [64], over arch [128, 64], row-wise Adagrad 0.05;
the batch size and MDE mode the papers used for that kind of data), and runs `embshard sweep` on
it into bench/results/sweep-<dataset>/: the JSON, Markdown table and frontier PNG described in
README "Sweep", the claim made only where width matters. Every other `embshard sweep` option
(--budgets, --parallel, --set) passes through.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, bench_main

from embshard.cluster.cli import main as embshard
from embshard.config import DataConfig, EmbeddingsConfig, JobConfig, MdeConfig, ModelConfig, TrainConfig
from embshard.datasets.convert import convert
from embshard.datasets.schema import SPEC_FILE
from embshard.typed_config import to_dict

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Source:
    kind: str  # converter name
    parts: tuple[str, ...]  # path under --data-root
    mode: Literal["within", "across"]  # MDE mode the paper used for this kind of data
    batch_size: int


DATASETS = {
    # MovieLens: the paper blocks rows by popularity inside the user and item tables.
    "movielens-1m": Source("movielens", ("ml-1m",), "within", 1024),
    # Criteo: the paper's CTR setting, one block per table sized by the table's popularity.
    "criteo-sample": Source("criteo", ("criteo-kaggle-sample", "train_sample.txt"), "across", 256),
}


def prepare_dataset(name: str, data_root: Path, split: str = "time", cache: str | None = None) -> Path:
    """Convert the real dataset once per source and split: the cache folder is named by the split
    and a hash of the source's files (names and contents), so other data, the same file rewritten
    or another split is converted again instead of reusing whatever dataset.json is there."""
    source = DATASETS[name]
    src = data_root.joinpath(*source.parts)
    if not src.exists():
        raise SystemExit(f"{src}: not found (--data-root)")
    out = CACHE / f"{cache or name}-{split}-{source_digest(source.kind, src)}"
    if not (out / SPEC_FILE).is_file():  # convert() renames a complete dataset into place, or nothing
        convert(source.kind, src, out, split=split)
    return out


def source_digest(kind: str, src: Path) -> str:
    """A short hash of the converter and every file of `src` (a file, or a folder's files)."""
    digest = hashlib.sha256(kind.encode())
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    for path in files:
        digest.update(str(path.relative_to(src) if src.is_dir() else path.name).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def job_config(name: str, data: Path, args: argparse.Namespace) -> JobConfig:
    source = DATASETS[name]
    return JobConfig(
        name=f"quality-{name}",
        output_dir=str(RESULTS / f"sweep-{name}"),
        data=DataConfig(path=str(data), batch_size=source.batch_size),
        model=ModelConfig(dense_arch=[64], over_arch=[128, 64]),
        embeddings=EmbeddingsConfig(dim=args.dim, mde=MdeConfig(mode=source.mode, alpha=args.alpha)),
        train=TrainConfig(epochs=args.epochs, sparse_lr=0.05),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--methods", default="uniform,mde,mlet")
    p.add_argument("--seeds", default="3")
    p.add_argument("--dim", type=int, default=64, help="the base model's width: budget 1 (default 64)")
    p.add_argument("--alpha", type=float, default=0.3, help="MDE's alpha (default 0.3)")
    p.add_argument("--epochs", type=int, default=2)
    # A time split leaves most MovieLens test users unseen in training (the converter says how
    # many): width cannot matter for them. A random split is where it can.
    p.add_argument("--split", choices=("time", "random", "leave-last"), default="time",
                   help="how the converter splits the rows (default time)")
    args, sweep_args = p.parse_known_args(argv)
    data = prepare_dataset(args.dataset, args.data_root, args.split)
    config = data.parent / f"quality-{data.name}-{args.dim}d-{args.epochs}ep.yaml"
    config.write_text(yaml.safe_dump(to_dict(job_config(args.dataset, data, args)), sort_keys=False))
    return embshard(["sweep", str(config), "--workers", "1", "--methods", args.methods, "--seeds", args.seeds,
                     "--out", str(RESULTS / f"sweep-{args.dataset}"), *sweep_args])


if __name__ == "__main__":
    bench_main(main)
