"""Steady-state training throughput of embshard's loop against plain TorchRec, same run.

Baseline: TorchRec's own `torchrec.models.dlrm.DLRM` (with `--arch dlrm_dcn`: `DLRM_DCN`, DLRMv2,
at the same cross-net options as embshard's `dlrm_dcn`) over an `EmbeddingBagCollection`, wrapped in
`DistributedModelParallel` with the same shard plan and optimizers, driven by the textbook loop
(forward, BCE loss, zero_grad, backward, step). embshard: the model from `trainer.build`, stepped
by `trainer.loop.train_step` with the loop's per-step callbacks (metrics off, and on). Both see the
same in-memory batches, so data loading is out of the picture.

    .venv/bin/python bench/throughput.py [--steps 60] [--repeats 3] [--dim 16] [--arch dlrm_dcn]
    .venv/bin/python bench/throughput.py --mlet-ratio 4 [...]   # MLET vs uniform k and d (throughput_mlet.py)
    .venv/bin/python bench/throughput.py --pep [...]            # PEP per granularity (throughput_pep.py)

Ends with one JSON line: samples/s of each variant and `ratio` = embshard / TorchRec (goal >= 0.95),
plus `metrics_ratio` = metrics on / metrics off (goal >= 0.98).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRM_DCN as TorchRecDLRMDCN
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_arguments, bench_job, interleaved_rates, median_rates, prepare  # noqa: E402

from embshard.config import (
    EmbeddingsConfig,  # noqa: E402
    JobConfig,  # noqa: E402
)
from embshard.planner.optimizers import torch_optimizer_class  # noqa: E402
from embshard.planner.shard_plan import block_table_configs  # noqa: E402
from embshard.trainer.build import DENSE_OPTIMIZERS, ShardedModel, build_sharded  # noqa: E402
from embshard.trainer.callbacks import PrometheusCallback, StepInfo  # noqa: E402
from embshard.trainer.loop import train_step  # noqa: E402
from embshard.trainer.metrics import WorkerMetrics  # noqa: E402
from embshard.trainer.models.dcn import dcn_options  # noqa: E402


def torchrec_baseline(cfg: JobConfig, bundle, num_dense: int) -> tuple[torch.nn.Module, CombinedOptimizer]:
    torch.manual_seed(cfg.seed)
    ebc = EmbeddingBagCollection(tables=block_table_configs(bundle.dimension_plan), device=torch.device("meta"))
    arches = {
        "embedding_bag_collection": ebc,
        "dense_in_features": num_dense,
        "dense_arch_layer_sizes": [*cfg.model.dense_arch, cfg.embeddings.dim],
        "over_arch_layer_sizes": [*cfg.model.over_arch, 1],
    }
    if cfg.model.arch == "dlrm_dcn":
        model: torch.nn.Module = TorchRecDLRMDCN(**arches, **dcn_options(cfg.model))
    else:
        model = TorchRecDLRM(**arches)
    apply_optimizer_in_backward(
        torch_optimizer_class(cfg.train.sparse_optimizer), ebc.parameters(), {"lr": cfg.train.sparse_lr}
    )
    dmp = DistributedModelParallel(
        model,
        device=torch.device("cpu"),
        plan=bundle.shard_plan.to_torchrec("sparse_arch.embedding_bag_collection"),
        sharders=[EmbeddingBagCollectionSharder()],
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: DENSE_OPTIMIZERS[cfg.train.dense_optimizer](params, lr=cfg.train.dense_lr),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def run_baseline(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        logits = model(b.dense, b.sparse).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


def run_embshard(sharded: ShardedModel, batches, callbacks, log_every: int) -> float:
    """The per-step work of `trainer.loop.run_worker`: train_step, the loss read on logging steps,
    StepInfo and every callback."""
    start = time.perf_counter()
    tick = start
    for step, b in enumerate(batches, 1):
        loss = train_step(sharded, b)
        value = loss.item() if step % log_every == 0 else None
        now = time.perf_counter()
        info = StepInfo(step, 0, b.labels.numel(), now - tick, 0.0, value)
        for cb in callbacks:
            cb.on_step(info)
        tick = now
    return sum(b.labels.numel() for b in batches) / (time.perf_counter() - start)


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

    base_model, base_opt = torchrec_baseline(cfg, bundle, num_dense)
    ours = build_sharded(cfg, bundle, data.spec, torch.device("cpu"))
    metrics = WorkerMetrics(job="bench", rank=0)
    with_metrics = [PrometheusCallback(metrics)]
    run_baseline(base_model, base_opt, warm)
    run_embshard(ours, warm, [], cfg.train.log_every)

    print(f"{len(timed_batches)} steps x {args.batch_size} per pass, {args.repeats} passes each, "
          f"dim {args.dim}, {len(bundle.dimension_plan.tables)} tables, arch {args.arch}", file=sys.stderr)
    rates = interleaved_rates(
        {
            "torchrec": lambda: run_baseline(base_model, base_opt, timed_batches),
            "embshard": lambda: run_embshard(ours, timed_batches, [], cfg.train.log_every),
            "embshard_metrics": lambda: run_embshard(ours, timed_batches, with_metrics, cfg.train.log_every),
        },
        args.repeats,
    )
    m = median_rates(rates)
    print(json.dumps({
        "bench": "throughput",
        "arch": args.arch,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "torchrec_samples_per_s": round(m["torchrec"]),
        "embshard_samples_per_s": round(m["embshard"]),
        "embshard_metrics_samples_per_s": round(m["embshard_metrics"]),
        "ratio": round(m["embshard"] / m["torchrec"], 3),
        "ratio_goal": 0.95,
        "metrics_ratio": round(m["embshard_metrics"] / m["embshard"], 3),
        "metrics_ratio_goal": 0.98,
    }))


if __name__ == "__main__":
    main()
