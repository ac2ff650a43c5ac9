"""One worker's life: build from config -> train -> evaluate -> report.

Runs under an initialised `torch.distributed` process group (Ray Train's, or the tests'). Knows
nothing of Ray: outside reporting comes in as a callback.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embshard.datasets.reader import ParquetBatchReader
from embshard.planner.pipeline import PlanBundle
from embshard.trainer.build import ShardedModel, build_sharded
from embshard.trainer.callbacks import Callback, ProgressBar, PrometheusCallback, ReportCallback, StepInfo
from embshard.trainer.config import JobConfig
from embshard.trainer.evaluate import EvalResult, evaluate
from embshard.trainer.metrics import WorkerMetrics, write_file_sd


def worker_device(cfg: JobConfig, local_rank: int) -> torch.device:
    if cfg.sharding.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def make_reader(cfg: JobConfig, bundle: PlanBundle, split: str, rank: int, world: int) -> ParquetBatchReader:
    train = split == "train"
    return ParquetBatchReader(
        cfg.data.path,
        split,
        cfg.data.batch_size if train else cfg.data.eval_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle and train,
        drop_last=train,
        id_maps=bundle.id_maps(),
        prefetch=cfg.data.prefetch,
        validate=cfg.data.validate,
    )


def train_step(sharded: ShardedModel, batch: Any) -> torch.Tensor:
    logits = sharded.model(batch.dense, batch.sparse)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    sharded.optimizer.zero_grad()
    loss.backward()
    sharded.optimizer.step()
    return loss.detach()


def run_worker(
    cfg: JobConfig,
    report: Callable[[dict[str, Any]], None] | None = None,
    local_rank: int = 0,
) -> dict[str, Any]:
    _quiet_libraries()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = worker_device(cfg, local_rank)
    bundle = PlanBundle.load(cfg.sharding.plan_file or cfg.plan_dir, cfg.train.sparse_optimizer)
    bundle.shard_plan.check_matches(bundle.dimension_plan, world)
    train_reader = make_reader(cfg, bundle, "train", rank, world)
    valid_reader = make_reader(cfg, bundle, "valid", rank, world)
    sharded = build_sharded(cfg, bundle, len(train_reader.spec.dense), device)

    callbacks: list[Callback] = []
    if rank == 0 and cfg.train.progress:
        callbacks.append(ProgressBar(world))
    metrics = _start_metrics(cfg, bundle, rank, local_rank)
    if metrics is not None:
        callbacks.append(PrometheusCallback(metrics))
    if report is not None:
        callbacks.append(ReportCallback(report))

    steps_per_epoch = len(train_reader)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    for cb in callbacks:
        cb.on_train_start(total)

    step, samples, first_loss, last_loss = 0, 0, None, None
    result: EvalResult | None = None
    started = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        train_reader.set_epoch(epoch)
        waited = train_reader.wait_seconds
        tick = time.perf_counter()
        for batch in train_reader:
            if step >= total:
                break
            wait = train_reader.wait_seconds - waited
            batch = batch.to(device, non_blocking=True)
            loss = train_step(sharded, batch)
            step += 1
            samples += batch.labels.numel()
            log = step % cfg.train.log_every == 0 or step == total
            loss_value = loss.item() if log or first_loss is None else None
            if loss_value is not None:
                first_loss = loss_value if first_loss is None else first_loss
                last_loss = loss_value
            now = time.perf_counter()
            info = StepInfo(step, epoch, batch.labels.numel(), now - tick - wait, wait, loss_value)
            for cb in callbacks:
                cb.on_step(info)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                result = _evaluate(cfg, sharded, valid_reader, device, step, callbacks)
            waited, tick = train_reader.wait_seconds, time.perf_counter()
        if cfg.train.eval_every is None or result is None:
            result = _evaluate(cfg, sharded, valid_reader, device, step, callbacks)
        if step >= total:
            break
    elapsed = time.perf_counter() - started

    summary = {
        "steps": step,
        "samples": samples * world,
        "seconds": elapsed,
        "samples_per_s": samples * world / elapsed if elapsed > 0 else 0.0,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "valid_auc": result.auc if result else None,
        "valid_logloss": result.logloss if result else None,
        "data_wait_seconds": train_reader.wait_seconds,
    }
    for cb in callbacks:
        cb.on_train_end(summary)
    if rank == 0:
        write_summary(Path(cfg.output_dir), summary)
    if metrics is not None:
        metrics.stop_server()
    return summary


SUMMARY_FILE = "summary.json"


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    return path


def _quiet_libraries() -> None:
    # FBGEMM logs every table-batched kernel's arguments at INFO on the root logger, and TorchRec
    # warns about choices the planner made on purpose; keep workers' output to what users act on.
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchrec", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.parallel")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")


def _evaluate(cfg, sharded, reader, device, step, callbacks) -> EvalResult:
    result = evaluate(sharded.model, reader, device, cfg.train.eval_max_batches)
    for cb in callbacks:
        cb.on_eval(step, result)
    return result


def _start_metrics(cfg: JobConfig, bundle: PlanBundle, rank: int, local_rank: int) -> WorkerMetrics | None:
    if not cfg.metrics.enabled:
        return None
    metrics = WorkerMetrics(job=cfg.name, rank=rank)
    for table, (train_bytes, serve_bytes) in bundle.memory.table_bytes(rank).items():
        metrics.set_embedding_bytes(table, "train", train_bytes)
        metrics.set_embedding_bytes(table, "serve", serve_bytes)
    metrics.start_server(cfg.metrics.port_base, local_rank, cfg.metrics.bind)
    targets: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(targets, metrics.target())
    if rank == 0 and cfg.metrics.file_sd:
        write_file_sd(cfg.metrics.file_sd, [t for t in targets if t], {"job": cfg.name})
    return metrics
