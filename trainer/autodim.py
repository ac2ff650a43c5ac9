"""AutoDim's search as a method: `embshard search autodim` is `run_worker` over the search embedding.

    plan (`dimension_plan`: the search plan over uniform d_N tables, planner/policies/autodim.py)
    -> DLRM over `AutodimEmbeddingBags` (one builder) -> the one loop, where `AlphaStep` sets tau
    and, after the pre-train phase, takes an architecture step on a validation batch every f
    model steps (first-order DARTS) -> evaluate -> decisions.json (argmax alpha) at the end

So a search checkpoints (`checkpoint.every_steps`, SIGTERM), evaluates (`train.eval_every`) and
serves metrics exactly like `embshard train`. alpha is a model parameter (it is in every
checkpoint) with its own optimizer in the run's CombinedOptimizer (so is its state). Gradients
stay apart as the bi-level problem needs: during model steps alpha does not require grad, so the
training loss cannot reach it; the architecture step looks the tables up without autograd
(TorchRec's fused optimizer steps inside the tables' backward, so a backward that reached them
would train them on validation data) and takes the gradient of alpha alone, through the unwrapped
model so DDP's reducer never sees that pass. alpha is kept out of DDP; its optimizer averages its
gradient across ranks before every step. AutoDim-s (`single_level`) lets the training backward
reach alpha, and the one optimizer step updates alpha and the model weights together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper

from embshard.config import AutodimConfig, JobConfig
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.planner.decisions import Decisions, TableDecision
from embshard.planner.policies.autodim import search_plan
from embshard.planner.policies.uniform import uniform_plan
from embshard.planner.types import DimensionPlan
from embshard.sharding.autodim import AutodimEmbeddingBags
from embshard.sharding.embedding_module import EmbeddingModule
from embshard.trainer.build import ShardedModel
from embshard.trainer.callbacks import Callback, StepInfo
from embshard.trainer.evaluate import EvalResult
from embshard.trainer.history import StepHistory
from embshard.trainer.loop import eval_summary, make_reader, train_step
from embshard.trainer.method import EmbeddingMethod, Worker, refuse_mlet, uniform_embeddings

DECISIONS_FILE = "decisions.json"
ALPHA_HISTORY_FILE = "alpha_history.jsonl"
SEARCH_RUN_KEY = "search_output_dir"  # in a decisions file's meta: the search that wrote it (its run folder)
# Name of alpha inside the search embeddings (the builder prefixes their path in the model): DDP
# must leave it alone (see the module doc).
ALPHA_PARAM = "arch.logits"
# Called as (params, lr=..., weight_decay=...): each takes its own further arguments, so not `type[Optimizer]`.
ALPHA_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


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


def alpha_history_path(cfg: JobConfig) -> Path:
    return Path(cfg.output_dir) / ALPHA_HISTORY_FILE


def base_plan(cfg: JobConfig, spec: DatasetSpec) -> DimensionPlan:
    """The uniform plan at d_N the search embedding is built over."""
    return uniform_plan(uniform_embeddings(cfg).embeddings, spec)


class AutodimSearch(EmbeddingMethod):
    """The search's parts: its plan, the search embedding, alpha's optimizer and step."""

    mixed_widths = False
    unifies_widths = True  # the candidates' tables, each at its own width (`search_plan`)
    serves = False
    # Its architecture steps are counted from them: resumed with another pre-train end, alpha was
    # held still until it, and 300 steps were recorded of the 423 taken.
    resume_keys = ("autodim.pretrain_steps", "autodim.alpha_every")

    def check_config(self, cfg: JobConfig) -> None:
        autodim_section(cfg)
        refuse_mlet(cfg, "the AutoDim search trains candidate widths over base-dim tables of its own")

    def dimension_plan(self, cfg: JobConfig, spec: DatasetSpec, counts: Mapping[str, np.ndarray],
                       out_dir: Path) -> DimensionPlan:
        search = autodim_section(cfg)
        return search_plan(base_plan(cfg, spec), search.candidates, search.lookup)

    def embeddings(self, cfg: JobConfig, plan: DimensionPlan, spec: DatasetSpec,
                   device: torch.device) -> EmbeddingModule:
        search = autodim_section(cfg)
        base = base_plan(cfg, spec)
        return AutodimEmbeddingBags(base, search.candidates, search.lookup, search.unify, search.batchnorm,
                                    device=device)

    def ddp_ignored(self) -> list[str]:
        return [ALPHA_PARAM]

    def param_groups(self, cfg: JobConfig, dense: dict[str, nn.Parameter]) -> list[KeyedOptimizer]:
        search = autodim_section(cfg)
        name = next(n for n in dense if n.endswith(ALPHA_PARAM))
        alpha = {name: dense.pop(name)}
        optimizer = ALPHA_OPTIMIZERS[search.alpha_optimizer](
            list(alpha.values()), lr=search.alpha_lr, weight_decay=search.alpha_weight_decay)
        optimizer.register_step_pre_hook(_average_alpha_grad)
        if search.width_cost:
            optimizer.register_step_pre_hook(WidthCost(search.candidates, search.width_cost))
        return [KeyedOptimizerWrapper(alpha, lambda _: optimizer)]

    def initialise(self, cfg: JobConfig, sharded: ShardedModel) -> None:
        search_embedding(sharded).seed_noise(noise_seed(cfg.seed, dist.get_rank(), 0))

    def callbacks(self, worker: Worker, sharded: ShardedModel) -> list[Callback]:
        return [AlphaStep(worker, sharded)]

    def unpipelined_because(self, cfg: JobConfig) -> str | None:
        if autodim_section(cfg).single_level:
            return None
        return ("AutoDim's architecture steps run the model on validation batches between "
                "training steps, which the pipeline's prefetched input dist cannot serve")


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed of `rank`'s Gumbel noise in model step `step`: one stream per rank and step, so a
    resumed search draws what the uninterrupted one drew (one stream per start drifted)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def search_embedding(sharded: ShardedModel) -> AutodimEmbeddingBags:
    embedding = sharded.embeddings
    assert isinstance(embedding, AutodimEmbeddingBags)
    return embedding


def alpha_optimizer(sharded: ShardedModel) -> KeyedOptimizer:
    return next(o for _, o in sharded.optimizer.optimizers if any(n.endswith(ALPHA_PARAM) for n in o.params))


def _average_alpha_grad(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # alpha is replicated and kept out of DDP: its ranks must step on the same gradient.
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


class WidthCost:
    """`autodim.width_cost` as a step pre-hook of alpha's optimizer: it adds the gradient of
    cost x sum over fields of E_softmax(alpha)[d_n / d_N] to alpha's, so both AutoDim (the
    validation loss's gradient) and AutoDim-s (the training loss's) step on loss plus cost. The
    term is the same on every rank, so it is added after their gradients are averaged."""

    def __init__(self, candidates: list[int], cost: float) -> None:
        self.shares = torch.tensor(candidates, dtype=torch.float32) / candidates[-1]
        self.cost = cost

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                # None: no step of alpha in this model step. All zeros: the step a checkpoint's
                # load takes to create the optimizer's state, which must move nothing.
                if p.grad is not None and p.grad.any():
                    p.grad += self.cost * self.gradient(p.detach())

    def gradient(self, logits: torch.Tensor) -> torch.Tensor:
        """d/d logits of sum_f E_softmax(logits_f)[share]: p_n (share_n - E[share]) per field."""
        probs = torch.softmax(logits, dim=-1)
        shares = self.shares.to(logits.device)
        return probs * (shares - (probs * shares).sum(dim=-1, keepdim=True))


def model_step(sharded: ShardedModel, batch: Batch, train_alpha: bool) -> torch.Tensor:
    """One step of the model weights on a training batch; AutoDim-s also steps alpha from it."""
    alpha = search_embedding(sharded).arch.logits
    alpha.requires_grad_(train_alpha)
    try:
        return train_step(sharded, batch)
    finally:
        alpha.requires_grad_(False)
        alpha.grad = None


def alpha_step(sharded: ShardedModel, batch: Batch) -> torch.Tensor:
    """One architecture step on a validation batch: d(valid loss)/d(alpha) only; the tables,
    transforms and arches are read, not trained."""
    embedding = search_embedding(sharded)
    alpha = embedding.arch.logits
    net = sharded.model.module  # unwrapped: DDP's reducer expects no backward from this pass
    alpha.requires_grad_(True)
    try:
        with embedding.tables_frozen():
            loss, _ = net(batch)
        (grad,) = torch.autograd.grad(loss, [alpha])
    finally:
        alpha.requires_grad_(False)
    alpha.grad = grad.detach().clone()
    alpha_optimizer(sharded).step()
    alpha.grad = None
    return loss.detach()


class AlphaStep(Callback):
    """Sets tau and takes the architecture steps; writes the decisions file at the end."""

    def __init__(self, worker: Worker, sharded: ShardedModel) -> None:
        self.cfg = worker.cfg
        self.search = autodim_section(worker.cfg)
        self.sharded = sharded
        self.embedding = search_embedding(sharded)
        self.world = worker.world
        self.device = worker.device
        self.dataset_id = worker.bundle.dimension_plan.made_with.get("dataset_id")
        # Architecture steps take validation batches of the training batch size.
        cfg = worker.cfg
        alpha_cfg = replace(cfg, data=replace(cfg.data, eval_batch_size=cfg.data.batch_size))
        # Whole batches only: they train (BatchNorm in training mode), and an evaluation's last
        # batches can be of one row, whose variance is zero.
        reader = make_reader(alpha_cfg, worker.bundle, "valid", worker.rank, worker.world, drop_last=True)
        # A resumed search goes on where the architecture steps before it left the batches; from
        # the first, it drifted from the uninterrupted search.
        if len(reader):
            reader.load_state_dict({"epoch": 0, "batches": self.alpha_steps(worker.resumed_at) % len(reader)})
        self.batches = _endless(reader)
        self.rank = worker.rank
        self.result: EvalResult | None = None
        # alpha is replicated: rank 0's is every rank's.
        record = self.search.history_every > 0 and dist.get_rank() == 0
        self.history = StepHistory(alpha_history_path(cfg)) if record else None
        self.last_recorded: int | None = None

    def on_step_start(self, step: int) -> None:
        search = self.search
        alpha = self.embedding.arch.logits
        self.embedding.tau = search.temperature(step)
        searching = step >= search.pretrain_steps
        # Only AutoDim-s lets the training loss reach alpha. The combined optimizer zeroes grads
        # rather than dropping them, and Adam would step on a zero gradient: alpha gets none.
        alpha.grad = None
        alpha.requires_grad_(searching and search.single_level)
        self.embedding.seed_noise(noise_seed(self.cfg.seed, self.rank, step))
        if search.history_every and step % search.history_every == 0:
            self.record(step)
        if searching and not search.single_level and (step - search.pretrain_steps) % search.alpha_every == 0:
            alpha_step(self.sharded, next(self.batches).to(self.device, non_blocking=True))

    def on_step(self, info: StepInfo) -> None:
        self.embedding.arch.logits.requires_grad_(False)
        self.embedding.arch.logits.grad = None

    def on_eval(self, step: int, result: EvalResult) -> None:
        self.result = result

    def record(self, step: int) -> None:
        """softmax(alpha) per field as it stands after `step` model steps (and the architecture
        steps among them)."""
        if self.history is None or step == self.last_recorded:
            return
        probs = {feature: [round(p, 6) for p in ps] for feature, (_, ps) in self.embedding.choices().items()}
        self.history.write({"step": step, "alpha_steps": self.alpha_steps(step), "tau": self.search.temperature(step),
                            "candidates": self.search.candidates, "alpha": probs})
        self.last_recorded = step

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.record(summary["steps"])
        stats = {"steps": summary["steps"], "alpha_steps": self.alpha_steps(summary["steps"]),
                 "pretrain_steps": min(summary["steps"], self.search.pretrain_steps),
                 # The last step's, from the schedule: a start that trained no step (a finished
                 # search run again) never set the module's.
                 "tau_final": self.search.temperature(max(summary["steps"] - 1, 0)), "world_size": self.world}
        summary.update(stats)
        if self.search.history_every:
            summary["alpha_history"] = str(alpha_history_path(self.cfg))
        if summary["preempted"] or not stats["alpha_steps"]:
            # Stopped on the way (Ctrl-C, SIGTERM), or ended within pretrain_steps, it chose nothing
            # yet: its widths (ties, broken to the narrowest), written, read as a finished search's,
            # replaced one with --overwrite and refused the resume's own --out.
            summary["decisions"] = None
            if not stats["alpha_steps"]:  # why, as the command and a sweep's point say it
                summary["no_decisions"] = (f"the search ended within autodim.pretrain_steps "
                                           f"({self.search.pretrain_steps}): no architecture step, no decisions")
            return
        decisions = make_decisions(self.cfg, self.embedding, self.result, stats, self.dataset_id)
        path = decisions_path(self.cfg)
        if dist.get_rank() == 0:
            decisions.save(path)
        summary["dims"] = {feature: t.dim for feature, t in decisions.tables.items()}
        summary["alpha"] = decisions.meta["alpha"]
        summary["decisions"] = str(path)

    def alpha_steps(self, steps: int) -> int:
        """Architecture steps taken in `steps` model steps (so also across a resume)."""
        searching = max(0, steps - self.search.pretrain_steps)
        return searching if self.search.single_level else -(-searching // self.search.alpha_every)


def _run_folder(output_dir: str) -> str:
    return str(Path(output_dir).resolve())


def written_by_search(record: object, output_dir: str) -> bool:
    """Whether a decisions file's JSON says the search whose run folder is `output_dir` wrote it."""
    meta = record.get("meta") if isinstance(record, dict) else None
    return isinstance(meta, dict) and meta.get(SEARCH_RUN_KEY) == _run_folder(output_dir)


def make_decisions(cfg: JobConfig, embedding: AutodimEmbeddingBags, result: EvalResult | None,
                   stats: dict[str, Any], dataset_id: str | None = None) -> Decisions:
    """The search's widths, with its last validation in the arch's own metrics (an MSE model's
    was recorded as a CTR model's AUC and logloss, both None)."""
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
            "width_cost": search.width_cost,
            "dataset_id": dataset_id,  # the plan's: from_decisions checks it against the data trained
            SEARCH_RUN_KEY: _run_folder(cfg.output_dir),
            "alpha": {feature: probs for feature, (_, probs) in choices.items()},
            **eval_summary(result),
            **stats,
        },
    )


def _endless(reader: ParquetBatchReader) -> Iterator[Batch]:
    """The split's batches over and over: every rank gets one whenever it asks, so ranks stay in
    step through the sharded lookup's collectives."""
    return chain.from_iterable(repeat(reader))
