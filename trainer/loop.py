"""One worker's life: build from config -> train -> evaluate -> report.

Runs under an initialised `torch.distributed` process group (Ray Train's, or the tests'). Knows
nothing of Ray: outside reporting comes in as a callback.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from embshard.config import JobConfig
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.storage import StoragePath, write_whole
from embshard.errors import ConfigError, DataError
from embshard.planner.pipeline import PLAN_FILE, PlanBundle, load_dimension_plan
from embshard.trainer.build import ShardedModel, build_sharded
from embshard.trainer.callbacks import (
    Callback,
    CheckpointCallback,
    ProgressBar,
    PrometheusCallback,
    ReportCallback,
    StepInfo,
)
from embshard.trainer.checkpoint import (
    DAMAGED_SUFFIX,
    PLAN_DIR,
    CheckpointError,
    CheckpointManager,
    Progress,
    complete_checkpoints,
    none_verifies,
    recorded_config,
    rejected_text,
    resolve_source,
)
from embshard.trainer.divergence import LossWatch
from embshard.trainer.embedding_gradient import EmbeddingGradientCheck
from embshard.trainer.evaluate import EvalResult, UnscoredOutput, reportable
from embshard.trainer.faults import crash_from_env
from embshard.trainer.method import EmbeddingMethod, Worker, get_method, method_name
from embshard.trainer.metrics import WorkerMetrics, doing, read_file_sd_targets, write_file_sd
from embshard.trainer.pipeline import TrainSteps
from embshard.trainer.pipeline import train_step as model_step
from embshard.trainer.planning import check_same_data
from embshard.trainer.preemption import STOP_REQUEST_FILE, StopGuard
from embshard.trainer.restarts import record_start
from embshard.trainer.resume_config import reconcile
from embshard.typed_config import to_dict


def worker_device(cfg: JobConfig, local_rank: int) -> torch.device:
    if cfg.sharding.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# A run's plan and checkpoints are of the dataset it began on: the same command on the new one
# was refused ("not the dataset ... the plan was made from").
REPLACED_UNDER_A_RUN = ("to train on the dataset there now, start a run of its own (another output_dir, and "
                        "checkpoint.dir where set: this run's plan and checkpoints are of the one it replaced)")


def make_reader(cfg: JobConfig, bundle: PlanBundle, split: str, rank: int, world: int,
                drop_last: bool | None = None) -> ParquetBatchReader:
    """A split's reader as the loop reads it: training batches (shuffled, the last partial one
    dropped) or evaluation batches (every row); `drop_last` for another use of a split."""
    train = split == "train"
    return ParquetBatchReader(
        cfg.data.path,
        split,
        cfg.data.batch_size if train else cfg.data.eval_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle and train,
        drop_last=train if drop_last is None else drop_last,
        id_maps=bundle.id_maps(),
        prefetch=cfg.data.prefetch,
        replaced=REPLACED_UNDER_A_RUN,
        validate=cfg.data.validate,
    )


def train_step(sharded: ShardedModel, batch: Any) -> torch.Tensor:
    """One unpipelined step of `sharded`; -> the detached loss."""
    return model_step(sharded.model, sharded.optimizer, batch)


def run_worker(
    cfg: JobConfig,
    report: Callable[[dict[str, Any]], None] | None = None,
    local_rank: int = 0,
    *,
    method: str | EmbeddingMethod | None = None,
    owner_check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `method` (a registered name or a method; default: the one `cfg` names) on the plan
    in `sharding.plan_file` (else `<output_dir>/plan`); -> the run's summary. `owner_check`
    raises once the run that started this worker no longer holds its folders
    (`run_lock.owner_check`): then no checkpoint is written."""
    name = method if isinstance(method, str) else type(method).__name__ if method is not None else method_name(cfg)
    method = get_method(name) if not isinstance(method, EmbeddingMethod) else method
    quiet_libraries()
    return _WorkerRun(cfg, name, method, report, local_rank, owner_check).train()


class _WorkerRun:
    """One start of a run on this rank: the sharded model, its readers and callbacks, and where
    the run stands (`progress`, resumed from its newest checkpoint). `train` runs the steps left,
    the evaluations and the test, and returns the summary."""

    def __init__(self, cfg: JobConfig, name: str, method: EmbeddingMethod,
                 report: Callable[[dict[str, Any]], None] | None, local_rank: int,
                 owner_check: Callable[[], None] | None) -> None:
        self.cfg = cfg
        self.rank, self.world = rank, world = dist.get_rank(), dist.get_world_size()
        self.device = device = worker_device(cfg, local_rank)
        self.bundle = bundle = PlanBundle.load(cfg.sharding.plan_file or cfg.plan_dir, cfg.train.sparse_optimizer)
        bundle.shard_plan.check_matches(bundle.dimension_plan, cfg.sharding.topology(world))
        self.train_reader = make_reader(cfg, bundle, "train", rank, world)
        check_same_data(bundle.dimension_plan, self.train_reader.spec, cfg.data.path, "the run's plan")
        self.valid_reader = make_reader(cfg, bundle, "valid", rank, world)
        # Made now, read after training: a split its readers cannot share is refused before it.
        self.test_reader = make_reader(cfg, bundle, "test", rank, world) if cfg.train.test else None
        self.sharded = sharded = build_sharded(cfg, bundle, self.train_reader.spec, device, method=method)
        self.restarts = record_start(Path(cfg.output_dir))

        self.progress = Progress(world_size=world, batch_size=cfg.data.batch_size)
        self.resumed_from: StoragePath | None = None
        own = None
        if cfg.checkpoint.enabled:
            self.resumed_from, self.progress, own = _resume(cfg, sharded, self.train_reader, self.progress)
        self.metrics = metrics = _start_metrics(cfg, bundle, rank, local_rank)
        if metrics is not None and self.restarts:
            metrics.inc_restarts(self.restarts)

        # Batches of the current epoch trained so far, resumed ones included: a resume that trained
        # no step saved its step with the reader at the epoch's start, and its continuation
        # trained the epoch again.
        self.epoch_batches = self.train_reader.state_dict()["batches"]
        self.watch = LossWatch(device, self.progress.step)
        extras = method.callbacks(Worker(cfg, bundle, rank, world, device, metrics, self.progress.step), sharded)
        # Else a TypeError ("'NoneType' object is not iterable") naming neither method nor hook.
        stray = [c for c in extras if not isinstance(c, Callback)] if isinstance(extras, (list, tuple)) else None
        if stray is None or stray:
            got = (type(extras).__name__ if stray is None
                   else f"a {type(extras).__name__} holding a {type(stray[0]).__name__}")
            raise ConfigError(f"method {name!r}: callbacks() returned {got}, not a list of Callbacks")
        self.callbacks = _callbacks(cfg, sharded, self.snapshot, metrics, report, rank, world, extras,
                                    (own, self.progress.step) if own is not None else None, owner_check)
        self.steps = _train_steps(cfg, sharded, device, rank)
        self.total = _total_steps(cfg, self.progress, self.train_reader, world)
        self.test_seconds = 0.0  # kept out of the throughput, like the test after the last step
        self.evaluated_at: int | None = None  # the step of this start's last evaluation

    def snapshot(self) -> Progress:
        """Where the run stands, as a checkpoint saves it."""
        self.watch.check(self.progress.step, "a checkpoint")
        # The pipeline fetches ahead: the reader position saved counts only batches trained.
        return replace(self.progress, reader=self.train_reader.state_after(self.epoch_batches))

    def train(self) -> dict[str, Any]:
        cfg, progress = self.cfg, self.progress
        for cb in self.callbacks:
            cb.on_train_start(self.total)
        result: EvalResult | None = None
        stopped = False
        resumed_samples = progress.samples  # throughput counts only what this start trained
        if progress.evaluation_due and cfg.train.report_at == "best_valid":
            # Resumed from a step saved before its evaluation (an eval_every step, an epoch's end,
            # the run's last step): one of the choices.
            result = self.validate()
        progress.evaluation_due = False
        started = time.perf_counter()
        for epoch in range(progress.epoch, cfg.train.epochs):
            if progress.step >= self.total:
                break
            stopped, evaluated = self._train_epoch(epoch)
            if evaluated is not None:
                result = evaluated
            if stopped:
                break
            # Not again: resumed from an epoch's end it evaluated first, it trained no step since.
            if self._evaluates_at_epoch_end() and self.evaluated_at != progress.step:
                result = self.validate()
        if not stopped and self.evaluated_at != progress.step:
            # Resumed with nothing left to train, or the last evaluation (`train.eval_every`) came
            # steps before the end: its figures were reported as the last step's.
            result = self.validate()
        elapsed = time.perf_counter() - started - self.test_seconds
        test = self.test if cfg.train.test and not stopped else None
        selected_step, result, tested = _reported(cfg, progress, self.evaluated_at, result, test)
        summary = self._summary(elapsed, progress.samples - resumed_samples, result, selected_step, tested, stopped)
        for cb in self.callbacks:
            cb.on_train_end(summary)
        if self.rank == 0:
            write_summary(Path(cfg.output_dir), summary)
        if self.metrics is not None:
            _stop_metrics(cfg, self.metrics, self.rank)
        return summary

    def _evaluates_at_epoch_end(self) -> bool:
        """Whether `train` evaluates at the end of the epoch under way: every epoch without
        train.eval_every; with it, only while the run has evaluated nothing yet. Read by
        `_train_epoch` too, at the epoch's last step, for what its checkpoint says is due."""
        return self.cfg.train.eval_every is None or self.progress.last_evaluated is None

    def _train_epoch(self, epoch: int) -> tuple[bool, EvalResult | None]:
        """Epoch `epoch` from where the reader stands to its end or the run's last step; -> whether
        a callback asked to stop, and the epoch's last evaluation (`train.eval_every`), if any."""
        cfg, progress, reader, callbacks = self.cfg, self.progress, self.train_reader, self.callbacks
        progress.epoch = epoch
        reader.set_epoch(epoch)
        self.epoch_batches = reader.state_dict()["batches"]  # a resume skips these
        n_steps = min(len(reader) - self.epoch_batches, self.total - progress.step)
        # The pipeline fetches only batches this run trains: none beyond max_steps.
        batches = iter(reader)
        run = self.steps.run(islice(batches, n_steps))
        result, stopped = None, False
        waited, tick = reader.wait_seconds, time.perf_counter()
        for i in range(n_steps):
            for cb in callbacks:
                cb.on_step_start(progress.step)
            step = next(run)
            wait = reader.wait_seconds - waited
            progress.step += 1
            self.epoch_batches += 1
            progress.samples += step.rows * self.world
            log = progress.step % cfg.train.log_every == 0 or progress.step == self.total
            self.watch.observe(step.loss)
            loss_value = step.loss.item() if log or progress.first_loss is None else None
            if loss_value is not None:
                self.watch.check(progress.step, "the loss was logged")
                progress.first_loss = loss_value if progress.first_loss is None else progress.first_loss
                progress.last_loss = loss_value
            every = cfg.train.eval_every
            eval_step = every is not None and progress.step % every == 0
            # As `train` evaluates: these steps, an epoch's end (`_evaluates_at_epoch_end`), the last step.
            evaluated = eval_step or progress.step == self.total or (
                i == n_steps - 1 and self._evaluates_at_epoch_end())
            info = StepInfo(progress.step, epoch, step.rows, time.perf_counter() - tick - wait, wait, loss_value,
                            evaluated)
            for cb in callbacks:
                cb.on_step(info)
            stopped = any(cb.stop_requested for cb in callbacks)
            if stopped:
                break
            if eval_step:
                result = self.validate()
            waited, tick = reader.wait_seconds, time.perf_counter()
        run.close()
        batches.close()  # stops the reader's thread, whatever the pipeline fetched ahead
        return stopped, result

    def validate(self) -> EvalResult:
        """The validation split's evaluation now; with `train.report_at: best_valid`, kept in the
        progress (and the test split read) when it is the best so far."""
        self.watch.check(self.progress.step, "an evaluation")
        with doing(self.metrics, "eval"):
            result = _evaluate(self.cfg, self.sharded, self.steps, self.valid_reader, self.device, self.progress.step,
                               self.callbacks)
        self.evaluated_at = self.progress.last_evaluated = self.progress.step
        # The best evaluation so far lives in the progress, so a restarted group keeps choosing
        # among every evaluation of the run. The test split is read only at a new best (chosen on
        # validation alone); every rank gathered the same result, so all take the same branch,
        # as test() needs.
        progress = self.progress
        if self.cfg.train.report_at == "best_valid" and (
                progress.best is None or result.better_than(EvalResult(**progress.best["valid"]))):
            tested = self.test() if self.cfg.train.test else None
            progress.best = {"step": progress.step, "valid": asdict(result),
                             "test": asdict(tested) if tested is not None else None}
        return result

    def test(self) -> EvalResult:
        """The test split's evaluation now, its time kept out of the run's throughput."""
        self.watch.check(self.progress.step, "the test")
        tick = time.perf_counter()
        with doing(self.metrics, "eval"):
            assert self.test_reader is not None, "test() without train.test"
            tested = _measure(self.sharded, self.steps, self.test_reader, self.device, None)
        self.test_seconds += time.perf_counter() - tick
        return tested

    def _summary(self, elapsed: float, trained: int, result: EvalResult | None, selected_step: int,
                 tested: EvalResult | None, stopped: bool) -> dict[str, Any]:
        """`summary.json`. Rates are of this start's training (`trained` samples in `elapsed`
        seconds): a start that trained nothing (a restart after the last step) has none, not 0/s."""
        progress, reader = self.progress, self.train_reader
        timed = bool(trained) and elapsed > 0
        return {
            "steps": progress.step,
            "samples": progress.samples,
            "seconds": elapsed,
            "samples_per_s": trained / elapsed if timed else None,
            "first_loss": progress.first_loss,
            "last_loss": progress.last_loss,
            **eval_summary(result),
            "selected_step": selected_step,
            "data_wait_seconds": reader.wait_seconds,
            # The share of this start's wall time the loop sat waiting for batches: near 0 means
            # the reader keeps up and faster input would not speed training up.
            "data_wait_share": reader.wait_seconds / elapsed if timed else None,
            "restarts": self.restarts,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "preempted": stopped and any(cb.preempted for cb in self.callbacks),
            **(eval_summary(tested, "test") if tested else {}),
        }


def _total_steps(cfg: JobConfig, progress: Progress, train_reader: ParquetBatchReader, world: int) -> int:
    """The step number the run ends at."""
    steps_per_epoch = len(train_reader)
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data.path}: the train split holds fewer than data.batch_size={cfg.data.batch_size} "
                        f"rows for a rank of {world}, so not one step would train; lower data.batch_size "
                        f"or use fewer workers")
    # Steps are numbered across restarts, but a restart on another world or batch size trains the
    # rest of the data in batches of its own size: the steps left follow from where the reader
    # stands, and the numbering keeps the difference.
    position = train_reader.state_dict()
    renumbered = progress.step - (position["epoch"] * steps_per_epoch + position["batches"])
    total = steps_per_epoch * cfg.train.epochs + renumbered
    return total if cfg.train.max_steps is None else min(total, cfg.train.max_steps)


def _reported(cfg: JobConfig, progress: Progress, evaluated_at: int | None, last: EvalResult | None,
              test: Callable[[], EvalResult] | None) -> tuple[int, EvalResult | None, EvalResult | None]:
    """The step the run reports, its validation and its test (`test`: reads the test split, None
    when the run has none to read). `last`: the evaluation at step `evaluated_at`, the last step
    but in a run stopped on the way, whose last evaluation may be older."""
    # A checkpoint of a best_valid run keeps its choice; a resume under `last` ignores it.
    if cfg.train.report_at == "best_valid" and progress.best is not None:
        tested = EvalResult(**progress.best["test"]) if progress.best["test"] else None
        return progress.best["step"], EvalResult(**progress.best["valid"]), tested
    # The test split is read once, after training and outside the timed part: what a sweep ranks
    # plans by must be data that no choice (epochs, evaluation) was made on.
    step = evaluated_at if last is not None and evaluated_at is not None else progress.step
    return step, last, test() if test is not None else None


def _stop_metrics(cfg: JobConfig, metrics: WorkerMetrics, rank: int) -> None:
    time.sleep(cfg.metrics.linger_seconds)  # for a last scrape
    metrics.stop_server()
    if rank == 0 and cfg.metrics.file_sd and read_file_sd_targets(cfg.metrics.file_sd) == metrics.listed:
        # A finished run is no target: listed, its closed ports read as down (an alert) for
        # good, and a later listener on a reused port would be scraped as this job. Only its
        # own list: another run's, written there since, stays.
        Path(cfg.metrics.file_sd).unlink(missing_ok=True)


SUMMARY_FILE = "summary.json"


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    return write_whole(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")


def quiet_libraries() -> None:
    # FBGEMM logs every table-batched kernel's arguments at INFO on the root logger, and TorchRec
    # warns about choices the planner made on purpose (and torch, about the ShardedTensor TorchRec's
    # state dicts are made of); keep workers' output to what users act on.
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchrec", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.parallel")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


def _callbacks(cfg: JobConfig, sharded: ShardedModel, snapshot: Callable[[], Progress],
               metrics: WorkerMetrics | None, report: Callable[[dict[str, Any]], None] | None,
               rank: int, world: int, extras: list[Callback],
               saved: tuple[StoragePath, int] | None, owner_check: Callable[[], None] | None) -> list[Callback]:
    """`saved`: this run's checkpoint resumed from and its step (it holds the model until a step trains)."""
    # First: a model whose tables get no gradient is refused before its first step is checkpointed.
    callbacks: list[Callback] = [EmbeddingGradientCheck(sharded.embeddings, sharded.arch.name)]
    if rank == 0 and cfg.train.progress:
        callbacks.append(ProgressBar(world))
    callbacks.extend(extras)  # before checkpoints: a checkpoint sees what they did to the step
    if metrics is not None:
        callbacks.append(PrometheusCallback(metrics))
    if cfg.checkpoint.enabled:
        guard = None
        if cfg.checkpoint.on_sigterm:
            # Every rank keeps the guard, whether or not its signal handler could be installed:
            # the guard's all-reduce runs every step on all ranks, and the stop-request file
            # (Ctrl-C on the driver) needs no handler.
            guard = StopGuard(Path(cfg.output_dir) / STOP_REQUEST_FILE)
            guard.install()
        callbacks.append(CheckpointCallback(
            checkpoint_manager(cfg, sharded, metrics, owner_check),
            sharded.model, sharded.optimizer, snapshot, to_dict(cfg),
            sharded.bundle.directory, cfg.checkpoint.every_steps, guard, metrics, saved))
    if report is not None:  # after the checkpoint: the summary it reports names the run's last one
        callbacks.append(ReportCallback(report))
    crash = crash_from_env(rank, Path(cfg.output_dir))  # last: dies after that step's checkpoint
    if crash is not None:
        callbacks.append(crash)
    return callbacks


def checkpoint_manager(cfg: JobConfig, sharded: ShardedModel, metrics: WorkerMetrics | None,
                       owner_check: Callable[[], None] | None = None) -> CheckpointManager:
    """What a checkpoint holds beyond the model's own state is the method's to say."""
    transforms = sharded.method.checkpoint_transforms(cfg, sharded, metrics)
    return CheckpointManager(
        cfg.checkpoint_dir,
        cfg.checkpoint.keep,
        before_save=transforms.before_save,
        before_load=transforms.before_load,
        after_load=transforms.after_load,
        owner_check=owner_check,
        fits=lambda path: _check_fits(cfg, sharded, path),
    )


def _check_fits(cfg: JobConfig, sharded: ShardedModel, checkpoint: StoragePath) -> None:
    """ConfigError or CheckpointError when a checkpoint is not one the run's model was built for.
    The driver planned from, and compared the config of, the newest checkpoint whose files it
    reads verified; where the workers' check of every file refused that one, they fall back to an
    older one or to checkpoint.resume, another run's, which the driver did not compare: it was
    a size mismatch, or, where only the order of rows differed, a silently wrong model."""
    reconcile(cfg, recorded_config(checkpoint), checkpoint, adopt=False, also=sharded.method.resume_keys)
    plan = sharded.bundle.dimension_plan
    theirs = load_dimension_plan(checkpoint / PLAN_DIR / PLAN_FILE)
    if (theirs.base_dim, theirs.tables, theirs.uniform_width) != (plan.base_dim, plan.tables, plan.uniform_width):
        raise CheckpointError(f"{checkpoint}: holds another embedding plan than the run's, which was planned from a "
                              "newer checkpoint that failed the workers' check; run the command again, and the run "
                              "is planned from the checkpoint that verifies and checked against it")


def _resume(cfg: JobConfig, sharded: ShardedModel, reader: ParquetBatchReader,
            fresh: Progress) -> tuple[StoragePath | None, Progress, StoragePath | None]:
    """Load the newest good checkpoint of this run, else of `checkpoint.resume`, into the model,
    optimizer and reader; returns where it came from (None: a fresh start), the progress, and
    the checkpoint again when it is this run's own (None: fresh, or another run's)."""
    own = complete_checkpoints(cfg.checkpoint_dir)
    resume = cfg.checkpoint.resume
    if own and resume is not None and dist.get_rank() == 0:
        print(f"note: {cfg.checkpoint_dir} holds checkpoints of this run, which it continues from; checkpoint.resume "
              f"{resume} only if none of them verifies (another output_dir starts from {resume})", flush=True)
    # This run's own checkpoints, then `checkpoint.resume`: it was dropped for a fresh start when
    # every one of the run's own failed to verify.
    sources = ([False] if own else []) + ([True] if resume is not None else [])
    loaded = None
    for explicit in sources:
        candidates = resolve_source(resume) if explicit and resume is not None else own
        manager = checkpoint_manager(cfg, sharded, None)
        # Another run's folder is only read: its damaged checkpoints are named, never renamed.
        loaded = manager.load_latest(sharded.model, sharded.optimizer, candidates, set_damaged_aside=not explicit)
        if loaded is not None:
            break
        if explicit and resume is not None:
            raise none_verifies(resume, manager.rejected)
        if dist.get_rank() == 0:
            then = f"resuming from checkpoint.resume {resume}" if resume is not None else "starting fresh"
            print(f"no checkpoint in {cfg.checkpoint_dir} verifies, each kept aside as step-N{DAMAGED_SUFFIX} "
                  f"({rejected_text(manager.rejected)}): {then}", flush=True)
    if loaded is None:
        return None, fresh, None
    path, saved = loaded
    position = saved.reader_state(fresh.world_size, fresh.batch_size)
    reader.load_state_dict(position)
    progress = replace(saved, world_size=fresh.world_size, batch_size=fresh.batch_size)
    if dist.get_rank() == 0:
        # A newer checkpoint that failed verification means a rollback: said here, not only in the log.
        passed = (f"; newer, not verified{f', kept aside as step-N{DAMAGED_SUFFIX}' if not explicit else ''}: "
                  f"{rejected_text(manager.rejected)}" if manager.rejected else "")
        print(f"resumed from {path} at step {progress.step} (epoch {progress.epoch}){passed}", flush=True)
        if saved.world_size != fresh.world_size and 0 < position["batches"] < len(reader):
            # Each rank reads a contiguous share of the epoch's rows: shares of another world are
            # other rows, so no position in the new ones is the rows trained so far.
            print(f"note: the checkpoint was saved in the middle of epoch {progress.epoch} by a world of "
                  f"{saved.world_size} ranks, and this one has {fresh.world_size}: the rest of the epoch trains as "
                  "many rows as were left, not the same ones (some were trained already, as many are not this "
                  "epoch); a resume at an epoch's end, or on as many ranks, trains exactly the rest", flush=True)
    return path, progress, None if explicit else path


def _train_steps(cfg: JobConfig, sharded: ShardedModel, device: torch.device, rank: int) -> TrainSteps:
    def note(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    kind = cfg.train.pipeline
    reason = sharded.method.unpipelined_because(cfg) if kind != "none" else None
    if reason is not None:
        note(f"train.pipeline {kind}: training unpipelined: {reason}")
        kind = "none"
    return TrainSteps(kind, sharded.model, sharded.optimizer, device, note)


def eval_summary(result: EvalResult | None, split: str = "valid") -> dict[str, Any]:
    """The summary's view of an evaluation of `split`: `<split>_<metric>` for each metric (a CTR
    arch's valid_auc and valid_logloss; None without an evaluation), which one is primary and
    its direction and how many examples it saw."""
    if result is None:
        return {f"{split}_primary": None, f"{split}_auc": None, f"{split}_logloss": None}
    return {f"{split}_primary": result.primary, f"{split}_lower_is_better": result.lower_is_better,
            f"{split}_examples": result.examples,
            **{f"{split}_{k}": v for k, v in result.metrics.items()}}


def _measure(sharded: ShardedModel, steps: TrainSteps, reader: ParquetBatchReader, device: torch.device,
             max_batches: int | None) -> EvalResult:
    # Not through the pipeline's rewritten collections: they serve the batches it fetched.
    with steps.paused():
        try:
            result = sharded.arch.evaluate(sharded.model, reader, device, max_batches)
        except UnscoredOutput as e:
            raise ConfigError(f"model.arch {sharded.arch.name!r}: evaluate(): {e}") from None
        return reportable(result, sharded.arch.name)


def _evaluate(cfg, sharded, steps: TrainSteps, reader, device, step, callbacks) -> EvalResult:
    result = _measure(sharded, steps, reader, device, cfg.train.eval_max_batches)
    for cb in callbacks:
        cb.on_eval(step, result)
    return result


def _start_metrics(cfg: JobConfig, bundle: PlanBundle, rank: int, local_rank: int) -> WorkerMetrics | None:
    if not cfg.metrics.enabled:
        return None
    metrics = WorkerMetrics(job=cfg.name, rank=rank, world_size=dist.get_world_size())
    for table, (train_bytes, serve_bytes) in bundle.memory.table_bytes(rank).items():
        metrics.set_embedding_bytes(table, "train", train_bytes)
        metrics.set_embedding_bytes(table, "serve", serve_bytes)
    metrics.start_server(cfg.metrics.port_base, local_rank, cfg.metrics.bind)
    targets: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(targets, metrics.target())
    metrics.listed = [t for t in targets if t]
    if rank == 0 and cfg.metrics.file_sd:
        write_file_sd(cfg.metrics.file_sd, metrics.listed, {"job": cfg.name})
    return metrics
