"""Validation results, the pointwise CTR evaluation (AUC and logloss gathered from every rank)
that `ModelArch.evaluate` defaults to, and the regression one (MSE, RMSE) of rating models."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embshard.datasets.reader import ParquetBatchReader
from embshard.errors import ConfigError, DataError, TrainingDiverged
from embshard.units import metrics_text


@dataclass(frozen=True)
class EvalResult:
    """`metrics` by name; `primary` names the one progress bars, summaries and dashboards show first."""

    metrics: Mapping[str, float]
    primary: str
    examples: int
    # The primary metric's direction, said by the evaluator that computed it (MSE: lower; AUC,
    # recall@K: higher): best_valid and a sweep rank by it, whatever the arch's metric is called.
    # Not said (None): lower for a name of a loss or an error (`lower_is_better_by_name`), else
    # higher; a user's arch returning "logloss" had best_valid pick its worst step.
    lower_is_better: bool | None = None

    def __post_init__(self) -> None:
        if self.primary not in self.metrics:
            raise ValueError(f"EvalResult: primary metric {self.primary!r} is not among {sorted(self.metrics)}")
        if self.lower_is_better is None:
            object.__setattr__(self, "lower_is_better", lower_is_better_by_name(self.primary))

    def better_than(self, other: EvalResult) -> bool:
        """Whether this primary metric beats `other`'s (same metric) in its direction."""
        mine, theirs = self.metrics[self.primary], other.metrics[other.primary]
        return mine < theirs if self.lower_is_better else mine > theirs

    @property
    def auc(self) -> float | None:
        return self.metrics.get("auc")

    @property
    def logloss(self) -> float | None:
        return self.metrics.get("logloss")

    def text(self) -> str:
        """"AUC 0.7612, logloss 0.4701": the primary metric first."""
        return metrics_text(self.metrics, self.primary)


class UnscoredOutput(ConfigError):
    """The model's output is no score per row, which the default evaluation takes (the loop names
    the arch)."""


def lower_is_better_by_name(metric: str) -> bool:
    """Whether a metric called `metric` is a loss or an error: ...loss, mse, rmse, mae, ...error."""
    name = metric.lower()
    return name.endswith(("loss", "error")) or name in ("mse", "rmse", "mae", "perplexity")


def reportable(result: Any, arch: str) -> EvalResult:
    """An arch's evaluation with its metrics as floats (a one-element tensor, a numpy scalar);
    ConfigError naming the arch for anything else. Said at the evaluation: as it was, a tensor
    failed in Ray's report and a numpy float in summary.json, after the run had trained."""
    if not isinstance(result, EvalResult):
        raise ConfigError(f"model.arch {arch!r}: evaluate() returned {type(result).__name__}, not an EvalResult")
    metrics: dict[str, float] = {}
    for name, value in result.metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"model.arch {arch!r}: evaluate() returned metric {name!r} = {value!r}; metrics are "
                              "named by strings and are numbers (a tensor of one element: .item())")
        if not math.isfinite(value):
            # NaN beat nothing and nothing beat it: it stayed best_valid's choice for good, and
            # summary.json was no JSON.
            raise ConfigError(f"model.arch {arch!r}: evaluate() returned metric {name!r} = {value}; a metric is a "
                              "finite number (a model diverged, or a bug in evaluate)")
        metrics[name] = float(value)
    return replace(result, metrics=metrics)


@torch.no_grad()
def evaluate_pointwise(
    model: torch.nn.Module,
    reader: ParquetBatchReader,
    device: torch.device,
    max_batches: int | None = None,
) -> EvalResult:
    """AUC and logloss of `model` (a `TrainModel`, sharded or not: batch -> (loss, logits [B]))."""
    all_logits, all_labels = pointwise_outputs(model, reader, device, max_batches)
    auc = binary_auc(all_logits, all_labels, f"the {reader.split} split ({reader.split_path})")
    logloss = F.binary_cross_entropy_with_logits(all_logits, all_labels).item()
    return EvalResult({"auc": auc, "logloss": logloss}, "auc", len(all_labels))


def binary_auc(scores: torch.Tensor, labels: torch.Tensor, where: str) -> float:
    """The probability that a positive scores above a negative, ties counting half (Mann-Whitney),
    in float64 on the scores themselves. Not on sigmoid(logits) in float32, which is 1.0 for every
    logit above about 16.6 and rounds nearby ones together above about 8: confident models' AUC
    fell toward 0.5. DataError when `labels` hold one class (torchmetrics said 0.0)."""
    clicks = (labels == 0) | (labels == 1)
    if not bool(clicks.all()):
        raise DataError(f"{where}: label {labels[~clicks][0].item():g} is no click (0 or 1); AUC is of click labels "
                        "(a rating target is evaluated by MSE)")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        raise DataError(f"{where}: every one of the {len(labels):,} rows evaluated has label {int(n_pos > 0)}, so "
                        "its AUC is undefined; evaluate a split holding both (or more of it: "
                        "train.eval_max_batches)")
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    # Each distinct score's rank among all, 1-based, averaged over its ties.
    counts = counts.double()  # exact to 2**53 rows, where float32 ranks stopped at 2**24
    below = torch.cumsum(counts, 0) - counts
    ranks = (below + (counts + 1) / 2)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate_regression(
    model: torch.nn.Module,
    reader: ParquetBatchReader,
    device: torch.device,
    max_batches: int | None = None,
    prediction: Callable[[Any], torch.Tensor] | None = None,
) -> EvalResult:
    """MSE (primary) and RMSE of `model`'s predictions [B] (`prediction` of its output) against
    the labels (ratings)."""
    predictions, labels = pointwise_outputs(model, reader, device, max_batches, prediction)
    mse = F.mse_loss(predictions, labels).item()
    return EvalResult({"mse": mse, "rmse": mse**0.5}, "mse", len(labels), lower_is_better=True)


def pointwise_outputs(model: torch.nn.Module, reader: ParquetBatchReader, device: torch.device,
                      max_batches: int | None,
                      prediction: Callable[[Any], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [N], labels [N]) of every row of `reader`'s split on every rank, on CPU; an
    output is what the model returns for a batch, or `prediction` of it."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for i, batch in enumerate(reader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        _, output = model(batch)
        scores = prediction(output) if prediction else output
        if not isinstance(scores, torch.Tensor) or scores.shape != batch.labels.shape:
            # A dict of outputs trained for an epoch, then was "AttributeError: 'dict' object has no
            # attribute 'float'" at the first evaluation, naming neither the arch nor the cause.
            what = f"a tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else \
                f"a {type(scores).__name__}"
            raise UnscoredOutput(f"the model's output for a batch of {len(batch.labels)} rows is {what}, where the "
                              "default evaluate() takes one score per row (a tensor of that many); an arch whose "
                              "forward returns other outputs overrides evaluate()")
        outputs.append(scores.float())
        labels.append(batch.labels)
    model.train(was_training)
    local_outputs = torch.cat(outputs) if outputs else torch.empty(0, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, device=device)
    all_outputs, all_labels = gather_rows(local_outputs), gather_rows(local_labels)
    if len(all_labels) == 0:
        raise DataError(f"{reader.split_path}: no rows to evaluate on")
    broken = int((~torch.isfinite(all_outputs)).sum())
    if broken:  # every rank gathered the same outputs, so every rank stops here
        # AUC ranks NaN among the scores and reads as a number: the run would report it.
        raise TrainingDiverged(f"the model's outputs on the {reader.split} split hold {broken} NaN or infinite "
                               f"values of {all_outputs.numel()}: no metric is computed on them")
    return all_outputs, all_labels


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (ranks may hold different counts), on CPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.cpu()
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat([p for p in parts if p is not None])
