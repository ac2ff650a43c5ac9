"""Cross-cutting concerns of the train loop as callbacks: progress, metrics, reporting, checkpoints.

The loop calls every callback at the same points; each concern lives in one class, so the loop
itself reads as build -> iterate -> report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torchrec.optim.keyed import KeyedOptimizer
from tqdm import tqdm

from embshard.datasets.storage import StoragePath
from embshard.trainer.checkpoint import CheckpointManager, Progress
from embshard.trainer.evaluate import EvalResult
from embshard.trainer.metrics import WorkerMetrics, doing
from embshard.trainer.preemption import StopGuard


@dataclass(frozen=True)
class StepInfo:
    step: int  # global step count after this step
    epoch: int
    samples: int  # this rank's samples in the step
    seconds: float  # compute time of the step, without the wait for input
    data_wait: float  # time the step waited for its batch
    loss: float | None  # only on logging steps: reading it forces a device sync
    evaluated: bool = False  # the loop evaluates the validation split after this step, before the next


class Callback:
    stop_requested: bool = False  # set by a callback that wants the loop to end after this step
    # With stop_requested: the stop is Ctrl-C's or SIGTERM's, so the run is unfinished (a PEP prune
    # run that reached its last target stops finished).
    preempted: bool = False

    def on_train_start(self, total_steps: int) -> None: ...
    def on_step_start(self, step: int) -> None: ...  # `step` steps done; the batch is loaded
    def on_step(self, info: StepInfo) -> None: ...
    def on_eval(self, step: int, result: EvalResult) -> None: ...
    def on_train_end(self, summary: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """tqdm on rank 0 with samples/s (all ranks) and the latest loss."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.bar: tqdm | None = None

    def on_train_start(self, total_steps: int) -> None:
        self.bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def on_step_start(self, step: int) -> None:
        assert self.bar is not None
        if self.bar.n == 0 and step > 0:  # a resumed run: the bar starts where it stands (it ended at 90%)
            self.bar.n = self.bar.last_print_n = self.bar.initial = step
            self.bar.refresh()

    def on_step(self, info: StepInfo) -> None:
        assert self.bar is not None
        self.bar.update(1)
        if info.loss is not None:
            rate = self.bar.format_dict.get("rate") or 0.0
            self.bar.set_postfix(
                loss=f"{info.loss:.4f}", samples_per_s=f"{rate * info.samples * self.world_size:,.0f}"
            )

    def on_eval(self, step: int, result: EvalResult) -> None:
        if self.bar is not None:
            self.bar.write(f"step {step}: valid {result.text()}")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class PrometheusCallback(Callback):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def on_step(self, info: StepInfo) -> None:
        self.metrics.observe_step(info.seconds, info.samples, info.loss)
        self.metrics.add_data_wait(info.data_wait)
        if info.loss is not None:  # a logging step; on CPU this exports nothing
            self.metrics.update_device_memory()

    def on_eval(self, step: int, result: EvalResult) -> None:
        self.metrics.set_eval(result.metrics)


class ReportCallback(Callback):
    """Hands evaluation results and the final summary to an outside reporter (Ray Train's report)."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report

    def on_eval(self, step: int, result: EvalResult) -> None:
        self.report({"step": step, **{f"valid_{k}": v for k, v in result.metrics.items()}})

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.report(summary)


class CheckpointCallback(Callback):
    """Checkpoints every N steps, after the last step (before the final evaluation, the test and
    the report: a failure there, say in a user's `evaluate`, keeps what trained), at the end of a
    run stopped on the way, and after the step in which a stop signal or request arrived (then it
    asks the loop to stop). `snapshot` returns the loop's progress at the call."""

    def __init__(self, manager: CheckpointManager, model: nn.Module, optimizer: KeyedOptimizer,
                 snapshot: Callable[[], Progress], config: dict[str, Any], plan_dir: Path,
                 every_steps: int | None, guard: StopGuard | None = None,
                 metrics: WorkerMetrics | None = None, saved: tuple[StoragePath, int] | None = None) -> None:
        """`saved`: a checkpoint of this run that holds the model already (the one resumed from) and
        its step: a run that trains no further step writes it again as nothing new."""
        self.manager = manager
        self.model = model
        self.optimizer = optimizer
        self.snapshot = snapshot
        self.config = config
        self.plan_dir = plan_dir
        self.every_steps = every_steps
        self.guard = guard
        self.metrics = metrics
        self.last_path: StoragePath | None = saved[0] if saved is not None else None
        self.saved_step: int | None = saved[1] if saved is not None else None
        self.total_steps: int | None = None

    def on_train_start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_step(self, info: StepInfo) -> None:
        preempted = self.guard is not None and self.guard.any_rank_signalled()
        last = info.step == self.total_steps and not preempted  # the final evaluation follows
        if preempted or last or (self.every_steps and info.step % self.every_steps == 0):
            self.save(evaluation_due=info.evaluated)
        self.stop_requested = self.preempted = preempted

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.saved_step != summary["steps"]:
            self.save()
        summary["checkpoint"] = str(self.last_path) if self.last_path else None

    def save(self, evaluation_due: bool = False) -> None:
        progress = replace(self.snapshot(), evaluation_due=evaluation_due)
        start = time.perf_counter()
        with doing(self.metrics, "checkpoint"):
            self.last_path = self.manager.save(progress, self.model, self.optimizer, self.config, self.plan_dir)
        if self.metrics is not None:
            self.metrics.observe_checkpoint(time.perf_counter() - start)
        self.saved_step = progress.step
