"""An AutoDim search run: one worker's life, like `trainer.loop.run_worker`, ending in a decisions file.

    plan (driver, `plan_search`) -> build the DLRM over the search embedding -> pre-train with alpha
    held equal -> alternate model steps on training batches and, every f steps, an architecture
    step on a validation batch (first-order DARTS) -> evaluate -> decisions.json (argmax alpha)

Gradients stay apart as the bi-level problem needs: during model steps alpha does not require
grad, so the training loss cannot reach it; the architecture step looks the tables up without
autograd (TorchRec's fused optimizer steps inside the tables' backward, so a backward that reached
them would train them on validation data) and takes the gradient of alpha alone, through the
unwrapped model so DDP's reducer never sees that pass. alpha is kept out of DDP and its gradient
averaged across ranks here. AutoDim-s (`single_level`) updates alpha and the model weights from
the same training backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from embshard.datasets.profile import load_profile
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.planner.decisions import Decisions, TableDecision
from embshard.planner.memory import memory_report
from embshard.planner.pipeline import PlanBundle
from embshard.planner.policies.uniform import uniform_plan
from embshard.planner.shard_plan import plan_sharding
from embshard.planner.types import DimensionPlan
from embshard.sharding.autodim import AutodimEmbeddingBags, search_plan
from embshard.config import AutodimConfig
from embshard.trainer.build import DENSE_OPTIMIZERS, ShardedModel, shard_model
from embshard.trainer.callbacks import Callback, ProgressBar, ReportCallback, StepInfo
from embshard.config import JobConfig
from embshard.trainer.evaluate import EvalResult, evaluate
from embshard.trainer.loop import (
    quiet_libraries,
    make_reader,
    train_step,
    worker_device,
    write_summary,
)
from embshard.trainer.model import DLRM
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embshard.errors import ConfigError

DECISIONS_FILE = "decisions.json"
# Fully qualified name of alpha inside the DLRM: DDP must leave it alone (see the module doc).
ALPHA_PARAM = "embeddings.arch.logits"
ALPHA_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def autodim_section(cfg: JobConfig) -> AutodimConfig:
    search = cfg.autodim
    if search is None:
        raise ConfigError("autodim: an AutoDim search needs an `autodim:` section in the job config")
    if cfg.embeddings.dim != search.max_dim:
        raise ConfigError(
            f"autodim.candidates: the largest candidate {search.max_dim} must equal embeddings.dim "
            f"{cfg.embeddings.dim} (the base dim every candidate is unified to and the retrain uses)"
        )
    return search


def decisions_path(cfg: JobConfig) -> Path:
    search = autodim_section(cfg)
    return Path(search.decisions or Path(cfg.output_dir) / DECISIONS_FILE)


def base_plan(cfg: JobConfig, spec: DatasetSpec) -> DimensionPlan:
    """The uniform plan at d_N the search embedding is built over."""
    return uniform_plan(replace(cfg.embeddings, policy="uniform", decisions=None, mlet=None), spec)


def plan_search(cfg: JobConfig, world_size: int) -> PlanBundle:
    """Driver side: shard the search tables for `world_size` ranks and save the bundle in
    cfg.plan_dir, where `search_worker` loads it (as `run_worker` loads a training plan)."""
    search = autodim_section(cfg)
    spec = DatasetSpec.load(cfg.data.path)
    profile = load_profile(cfg.data.path)
    plan = search_plan(base_plan(cfg, spec), search.candidates, search.lookup)
    # Each search table is looked up once per example of its field.
    pooling = {t.name: profile.pooling_factor(_field_of(t.blocks[0].source, t.features[0])) for t in plan.tables}
    shard = plan_sharding(
        plan,
        cfg.sharding.topology(world_size),
        batch_size=cfg.data.batch_size,
        optimizer=cfg.train.sparse_optimizer,
        pooling_factors=pooling,
        sharding_types=cfg.sharding.sharding_types,
    )
    bundle = PlanBundle(plan, shard, memory_report(plan, shard, cfg.train.sparse_optimizer), cfg.plan_dir)
    bundle.save()
    return bundle


def _field_of(source: dict[str, Any], feature: str) -> str:
    return source.get("feature", feature)  # separate candidates name their field in the source


@dataclass
class SearchModel:
    sharded: ShardedModel  # the DMP DLRM and the model weights' optimizers (sparse fused + dense)
    embedding: AutodimEmbeddingBags  # inside `sharded.model`, tables sharded
    alpha_optimizer: torch.optim.Optimizer

    @property
    def alpha(self) -> torch.nn.Parameter:
        return self.embedding.arch.logits


def build_search_model(
    cfg: JobConfig, bundle: PlanBundle, base: DimensionPlan, num_dense: int, device: torch.device
) -> SearchModel:
    """`trainer.build.build_sharded` with the search embedding in place of PlannedEmbeddingBags
    and alpha kept out of DDP and out of the dense optimizer."""
    search = autodim_section(cfg)
    torch.manual_seed(cfg.seed)
    meta = torch.device("meta")
    model = DLRM(base, num_dense, cfg.model, embedding_device=meta, dense_device=device)
    model.embeddings = AutodimEmbeddingBags(
        base, search.candidates, search.lookup, search.unify, search.batchnorm, device=meta
    )
    bundle.shard_plan.check_matches(model.embeddings.plan, dist.get_world_size())
    dmp = shard_model(cfg, bundle, model, device, params_to_ignore=[ALPHA_PARAM])
    embedding = dmp.module.embeddings
    alpha = embedding.arch.logits
    weights = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if p is not alpha}
    dense = KeyedOptimizerWrapper(
        weights, lambda params: DENSE_OPTIMIZERS[cfg.train.dense_optimizer](params, lr=cfg.train.dense_lr)
    )
    alpha_opt = ALPHA_OPTIMIZERS[search.alpha_optimizer](
        [alpha], lr=search.alpha_lr, weight_decay=search.alpha_weight_decay
    )
    alpha.requires_grad_(False)  # only the steps that train alpha switch it on
    embedding.seed_noise(cfg.seed * 1_000_003 + dist.get_rank())
    return SearchModel(ShardedModel(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), bundle), embedding, alpha_opt)


def model_step(model: SearchModel, batch: Batch, train_alpha: bool) -> torch.Tensor:
    """One step of the model weights on a training batch; AutoDim-s also steps alpha from it."""
    model.alpha.requires_grad_(train_alpha)
    try:
        loss = train_step(model.sharded, batch)
    finally:
        model.alpha.requires_grad_(False)
    if train_alpha:
        _step_alpha(model, model.alpha.grad)
    return loss


def alpha_step(model: SearchModel, batch: Batch) -> torch.Tensor:
    """One architecture step on a validation batch: d(valid loss)/d(alpha) only; the tables,
    transforms and arches are read, not trained."""
    net = model.sharded.model.module  # unwrapped: DDP's reducer expects no backward from this pass
    model.alpha.requires_grad_(True)
    try:
        with model.embedding.tables_frozen():
            logits = net(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        (grad,) = torch.autograd.grad(loss, [model.alpha])
    finally:
        model.alpha.requires_grad_(False)
    _step_alpha(model, grad)
    return loss.detach()


def _step_alpha(model: SearchModel, grad: torch.Tensor) -> None:
    grad = grad.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    model.alpha.grad = grad
    model.alpha_optimizer.step()
    model.alpha.grad = None


def make_decisions(cfg: JobConfig, embedding: AutodimEmbeddingBags, result: EvalResult,
                   stats: dict[str, Any]) -> Decisions:
    search = autodim_section(cfg)
    choices = embedding.choices()
    return Decisions(
        method="autodim",
        base_dim=embedding.base_dim,
        tables={feature: TableDecision(dim=dim) for feature, (dim, _) in choices.items()},
        meta={
            "candidates": search.candidates,
            "lookup": search.lookup,
            "unify": search.unify,
            "single_level": search.single_level,
            "alpha": {feature: probs for feature, (_, probs) in choices.items()},
            "valid_auc": result.auc,
            "valid_logloss": result.logloss,
            **stats,
        },
    )


def search_worker(
    cfg: JobConfig,
    report: Callable[[dict[str, Any]], None] | None = None,
    local_rank: int = 0,
) -> dict[str, Any]:
    quiet_libraries()
    search = autodim_section(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = worker_device(cfg, local_rank)
    bundle = PlanBundle.load(cfg.sharding.plan_file or cfg.plan_dir, cfg.train.sparse_optimizer)
    train_reader = make_reader(cfg, bundle, "train", rank, world)
    valid_reader = make_reader(cfg, bundle, "valid", rank, world)
    # Architecture steps take validation batches of the training batch size.
    alpha_cfg = replace(cfg, data=replace(cfg.data, eval_batch_size=cfg.data.batch_size))
    alpha_batches = _endless(make_reader(alpha_cfg, bundle, "valid", rank, world))
    model = build_search_model(
        cfg, bundle, base_plan(cfg, train_reader.spec), len(train_reader.spec.dense), device
    )
    callbacks: list[Callback] = []
    if rank == 0 and cfg.train.progress:
        callbacks.append(ProgressBar(world))
    if report is not None:
        callbacks.append(ReportCallback(report))

    total = len(train_reader) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    for cb in callbacks:
        cb.on_train_start(total)
    step = alpha_steps = samples = 0
    first_loss = last_loss = None
    started = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        train_reader.set_epoch(epoch)
        tick = time.perf_counter()
        for batch in train_reader:
            batch = batch.to(device, non_blocking=True)
            model.embedding.tau = search.temperature(step)
            searching = step >= search.pretrain_steps
            if searching and not search.single_level and (step - search.pretrain_steps) % search.alpha_every == 0:
                alpha_step(model, next(alpha_batches).to(device, non_blocking=True))
                alpha_steps += 1
            loss = model_step(model, batch, train_alpha=searching and search.single_level)
            alpha_steps += int(searching and search.single_level)
            step += 1
            samples += batch.labels.numel() * world
            log = step % cfg.train.log_every == 0 or step == total or first_loss is None
            value = loss.item() if log else None
            if value is not None:
                first_loss = value if first_loss is None else first_loss
                last_loss = value
            now = time.perf_counter()
            for cb in callbacks:
                cb.on_step(StepInfo(step, epoch, batch.labels.numel(), now - tick, 0.0, value))
            tick = now
            if step >= total:
                break
        if step >= total:
            break
    seconds = time.perf_counter() - started
    result = evaluate(model.sharded.model, valid_reader, device, cfg.train.eval_max_batches)
    for cb in callbacks:
        cb.on_eval(step, result)

    stats = {"steps": step, "alpha_steps": alpha_steps, "pretrain_steps": min(step, search.pretrain_steps),
             "tau_final": model.embedding.tau, "world_size": world}
    decisions = make_decisions(cfg, model.embedding, result, stats)
    path = decisions_path(cfg)
    if rank == 0:
        decisions.save(path)
    summary = {
        **stats,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "valid_auc": result.auc,
        "valid_logloss": result.logloss,
        "dims": {feature: t.dim for feature, t in decisions.tables.items()},
        "alpha": decisions.meta["alpha"],
        "decisions": str(path),
    }
    for cb in callbacks:
        cb.on_train_end(summary)
    if rank == 0:
        write_summary(Path(cfg.output_dir), summary)
    return summary


def _endless(reader: ParquetBatchReader) -> Iterator[Batch]:
    """The split's batches over and over: every rank gets one whenever it asks, so ranks stay in
    step through the sharded lookup's collectives."""
    return chain.from_iterable(repeat(reader))
