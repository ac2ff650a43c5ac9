"""Steady-state training throughput of embshard's loop against plain TorchRec, same run.

Baseline: TorchRec's own `torchrec.models.dlrm.DLRM` (with `--arch dlrm_dcn`: `DLRM_DCN`, DLRMv2,
at the same cross-net options as embshard's `dlrm_dcn`) over an `EmbeddingBagCollection` with a BCE
loss, wrapped in `DistributedModelParallel` with the same shard plan and optimizers, driven by
TorchRec's `TrainPipelineSparseDist` (the loop TorchRec's examples run) and, beside it, by the
textbook unpipelined loop (forward, zero_grad, backward, step). embshard: the model from
`trainer.build`, stepped by `trainer.pipeline.TrainSteps` with the loop's per-step work
(callbacks; metrics off, and on), through the same TrainPipelineSparseDist (`train.pipeline:
sparse_dist`) and unpipelined (`none`). All see the same in-memory batches, so data loading is
out of the picture.

    .venv/bin/python bench/throughput.py [--steps 60] [--repeats 3] [--dim 16] [--arch dlrm_dcn]
    .venv/bin/python bench/throughput.py --mlet-ratio 4 [...]   # MLET vs uniform k and d (throughput_mlet.py)
    .venv/bin/python bench/throughput.py --pep [...]            # PEP per granularity (throughput_pep.py)

Ends with one JSON line: samples/s of each variant, `ratio` = embshard pipelined / TorchRec
pipelined (goal >= 0.97), `unpipelined_ratio` = the same two loops unpipelined, `pipeline_gain`
= TorchRec pipelined / unpipelined (what decides `train.pipeline`'s default, named in
`default_pipeline`), and `metrics_ratio` = metrics on / metrics off (goal >= 0.98).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRM_DCN as TorchRecDLRMDCN
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_arguments, bench_job, bench_main, interleaved_rates, median_rates, prepare  # noqa: E402

from embshard.config import (
    EmbeddingsConfig,  # noqa: E402
    JobConfig,  # noqa: E402
    TrainConfig,  # noqa: E402
)
from embshard.datasets.reader import Batch  # noqa: E402
from embshard.planner.optimizers import torch_optimizer_class  # noqa: E402
from embshard.planner.shard_plan import block_table_configs  # noqa: E402
from embshard.trainer.build import ShardedModel, build_sharded, dense_optimizer  # noqa: E402
from embshard.trainer.callbacks import PrometheusCallback, StepInfo  # noqa: E402
from embshard.trainer.metrics import WorkerMetrics  # noqa: E402
from embshard.trainer.models.dcn import dcn_options  # noqa: E402
from embshard.trainer.pipeline import PipelineKind, TrainSteps  # noqa: E402


class TorchRecTrainModel(nn.Module):
    """TorchRec's DLRM (or DLRM_DCN) with its loss: `forward(batch) -> (loss, logits)`, what
    TorchRec's train pipelines call."""

    def __init__(self, dlrm: TorchRecDLRM) -> None:
        super().__init__()
        self.dlrm = dlrm

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.dlrm(batch.dense, batch.sparse).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, batch.labels), logits


def torchrec_baseline(cfg: JobConfig, bundle, num_dense: int) -> tuple[torch.nn.Module, CombinedOptimizer]:
    torch.manual_seed(cfg.seed)
    ebc = EmbeddingBagCollection(tables=block_table_configs(bundle.dimension_plan), device=torch.device("meta"))
    arches = {
        "embedding_bag_collection": ebc,
        "dense_in_features": num_dense,
        "dense_arch_layer_sizes": [*cfg.model.dense_arch, cfg.embeddings.dim],
        "over_arch_layer_sizes": [*cfg.model.over_arch, 1],
    }
    dlrm = TorchRecDLRMDCN(**arches, **dcn_options(cfg.model)) if cfg.model.arch == "dlrm_dcn" \
        else TorchRecDLRM(**arches)
    model = TorchRecTrainModel(dlrm)
    apply_optimizer_in_backward(
        torch_optimizer_class(cfg.train.sparse_optimizer), ebc.parameters(), {"lr": cfg.train.sparse_lr}
    )
    dmp = DistributedModelParallel(
        model,
        device=torch.device("cpu"),
        plan=bundle.shard_plan.to_torchrec("dlrm.sparse_arch.embedding_bag_collection"),
        sharders=[EmbeddingBagCollectionSharder()],
    )
    dense = dense_optimizer(cfg, dict(in_backward_optimizer_filter(dmp.named_parameters())))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def run_baseline(model, optimizer, batches: list[Batch]) -> float:
    """The textbook loop."""
    start = time.perf_counter()
    for b in batches:
        loss, _ = model(b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def run_baseline_pipelined(pipeline: TrainPipelineSparseDist, batches: list[Batch]) -> float:
    """TorchRec's pipelined loop: progress() until the batches run out (it drains what it holds)."""
    start = time.perf_counter()
    source: Iterator[Batch] = iter(batches)
    while True:
        try:
            pipeline.progress(source)
        except StopIteration:
            break
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def run_embshard(steps: TrainSteps, batches: list[Batch], callbacks, log_every: int) -> float:
    """The per-step work of `trainer.loop.run_worker`: a step, the loss read on logging steps,
    StepInfo and every callback."""
    start = time.perf_counter()
    tick = start
    for i, step in enumerate(steps.run(iter(batches)), 1):
        value = step.loss.item() if i % log_every == 0 else None
        now = time.perf_counter()
        info = StepInfo(i, 0, step.rows, now - tick, 0.0, value)
        for cb in callbacks:
            cb.on_step(info)
        tick = now
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def embshard_steps(sharded: ShardedModel, kind: PipelineKind) -> TrainSteps:
    return TrainSteps(kind, sharded.model, sharded.optimizer, torch.device("cpu"))


def main() -> None:
    # The MLET and PEP comparisons live in their own scripts; these flags reach them from here.
    if "--mlet-ratio" in sys.argv:
        from throughput_mlet import main as mlet_main

        return mlet_main(["--ratio" if a == "--mlet-ratio" else a for a in sys.argv[1:]])
    if "--pep" in sys.argv:
        from throughput_pep import main as pep_main

        return pep_main([a for a in sys.argv[1:] if a != "--pep"])
    parser = bench_arguments(__doc__)
    parser.add_argument("--arch", choices=["dlrm", "dlrm_dcn"], default="dlrm")
    args = parser.parse_args()
    data = prepare(args)
    cfg, bundle = bench_job("throughput-run", data, args.batch_size, EmbeddingsConfig(dim=args.dim))
    cfg = replace(cfg, model=replace(cfg.model, arch=args.arch))
    warm, timed_batches, num_dense = data.warm, data.timed, data.num_dense

    # Separate models for the pipelined and unpipelined loops: a pipeline keeps its model's
    # collections rewritten to serve the batches it fetched.
    base_model, base_opt = torchrec_baseline(cfg, bundle, num_dense)
    base_pipeline = TrainPipelineSparseDist(base_model, base_opt, torch.device("cpu"))
    plain_model, plain_opt = torchrec_baseline(cfg, bundle, num_dense)
    ours = embshard_steps(build_sharded(cfg, bundle, data.spec, torch.device("cpu")), "sparse_dist")
    ours_plain = embshard_steps(build_sharded(cfg, bundle, data.spec, torch.device("cpu")), "none")
    metrics = WorkerMetrics(job="bench", rank=0, world_size=1)
    with_metrics = [PrometheusCallback(metrics)]
    # Warm-up; the pipelines also trace and rewrite their models on their first batches.
    run_baseline_pipelined(base_pipeline, warm)
    run_baseline(plain_model, plain_opt, warm)
    run_embshard(ours, warm, [], cfg.train.log_every)
    run_embshard(ours_plain, warm, [], cfg.train.log_every)

    print(f"{len(timed_batches)} steps x {args.batch_size} per pass, {args.repeats} passes each, "
          f"dim {args.dim}, {len(bundle.dimension_plan.tables)} tables, arch {args.arch}", file=sys.stderr)
    rates = interleaved_rates(
        {
            "torchrec": lambda: run_baseline_pipelined(base_pipeline, timed_batches),
            "embshard": lambda: run_embshard(ours, timed_batches, [], cfg.train.log_every),
            "embshard_metrics": lambda: run_embshard(ours, timed_batches, with_metrics, cfg.train.log_every),
            "torchrec_unpipelined": lambda: run_baseline(plain_model, plain_opt, timed_batches),
            "embshard_unpipelined": lambda: run_embshard(ours_plain, timed_batches, [], cfg.train.log_every),
        },
        args.repeats,
    )
    m = median_rates(rates)
    print(json.dumps({
        "bench": "throughput",
        "arch": args.arch,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "default_pipeline": TrainConfig().pipeline,
        "torchrec_samples_per_s": round(m["torchrec"]),
        "embshard_samples_per_s": round(m["embshard"]),
        "embshard_metrics_samples_per_s": round(m["embshard_metrics"]),
        "torchrec_unpipelined_samples_per_s": round(m["torchrec_unpipelined"]),
        "embshard_unpipelined_samples_per_s": round(m["embshard_unpipelined"]),
        "ratio": round(m["embshard"] / m["torchrec"], 3),
        "ratio_goal": 0.97,
        "unpipelined_ratio": round(m["embshard_unpipelined"] / m["torchrec_unpipelined"], 3),
        "pipeline_gain": round(m["torchrec"] / m["torchrec_unpipelined"], 3),
        "metrics_ratio": round(m["embshard_metrics"] / m["embshard"], 3),
        "metrics_ratio_goal": 0.98,
    }))


if __name__ == "__main__":
    bench_main(main)
