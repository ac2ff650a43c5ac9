"""Validation results, and the pointwise CTR evaluation (AUC and logloss gathered from every rank)
that `ModelArch.evaluate` defaults to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from embshard.datasets.reader import ParquetBatchReader
from embshard.errors import DataError


@dataclass(frozen=True)
class EvalResult:
    """`metrics` by name; `primary` names the one progress bars, summaries and dashboards show first."""

    metrics: Mapping[str, float]
    primary: str
    examples: int

    def __post_init__(self) -> None:
        if self.primary not in self.metrics:
            raise ValueError(f"EvalResult: primary metric {self.primary!r} is not among {sorted(self.metrics)}")

    @property
    def auc(self) -> float | None:
        return self.metrics.get("auc")

    @property
    def logloss(self) -> float | None:
        return self.metrics.get("logloss")

    def text(self) -> str:
        """"auc 0.7612, logloss 0.4701": the primary metric first."""
        names = [self.primary, *(k for k in self.metrics if k != self.primary)]
        return ", ".join(f"{k} {self.metrics[k]:.4f}" for k in names)


@torch.no_grad()
def evaluate_pointwise(
    model: torch.nn.Module,
    reader: ParquetBatchReader,
    device: torch.device,
    max_batches: int | None = None,
) -> EvalResult:
    """AUC and logloss of `model` (a `TrainModel`, sharded or not: batch -> (loss, logits [B]))."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for i, batch in enumerate(reader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        _, output = model(batch)
        logits.append(output.float())
        labels.append(batch.labels)
    model.train(was_training)
    local_logits = torch.cat(logits) if logits else torch.empty(0, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, device=device)
    all_logits, all_labels = gather_rows(local_logits), gather_rows(local_labels)
    if len(all_labels) == 0:
        raise DataError(f"{reader.split_path}: no rows to evaluate on")
    auc = binary_auroc(torch.sigmoid(all_logits), all_labels.long()).item()
    logloss = F.binary_cross_entropy_with_logits(all_logits, all_labels).item()
    return EvalResult({"auc": auc, "logloss": logloss}, "auc", len(all_labels))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (ranks may hold different counts), on CPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.cpu()
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat([p for p in parts if p is not None])
