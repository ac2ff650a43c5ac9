"""Cross-cutting concerns of the train loop as callbacks: progress, metrics, reporting.

The loop calls every callback at the same points; each concern lives in one class, so the loop
itself reads as build -> iterate -> report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from embshard.trainer.evaluate import EvalResult
from embshard.trainer.metrics import WorkerMetrics


@dataclass(frozen=True)
class StepInfo:
    step: int  # global step count after this step
    epoch: int
    samples: int  # this rank's samples in the step
    seconds: float  # compute time of the step, without the wait for input
    data_wait: float  # time the step waited for its batch
    loss: float | None  # only on logging steps: reading it forces a device sync


class Callback:
    def on_train_start(self, total_steps: int) -> None: ...
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
            self.bar.write(f"step {step}: valid AUC {result.auc:.4f}, logloss {result.logloss:.4f}")

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class PrometheusCallback(Callback):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def on_step(self, info: StepInfo) -> None:
        self.metrics.observe_step(info.seconds, info.samples, info.loss)
        self.metrics.add_data_wait(info.data_wait)

    def on_eval(self, step: int, result: EvalResult) -> None:
        self.metrics.set_eval(result.auc, result.logloss)


class ReportCallback(Callback):
    """Hands evaluation results and the final summary to an outside reporter (Ray Train's report)."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self.report = report

    def on_eval(self, step: int, result: EvalResult) -> None:
        self.report({"step": step, "valid_auc": result.auc, "valid_logloss": result.logloss})

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.report(summary)
