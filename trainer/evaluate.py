"""Validation: AUC and logloss over a split, gathered from every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from embshard.datasets.reader import ParquetBatchReader
from embshard.errors import DataError


@dataclass(frozen=True)
class EvalResult:
    auc: float
    logloss: float
    examples: int
    mse: float | None = None  # of the raw rating, when the dataset carries one (MovieLens)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    reader: ParquetBatchReader,
    device: torch.device,
    max_batches: int | None = None,
) -> EvalResult:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for i, batch in enumerate(reader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        logits.append(model(batch.dense, batch.sparse).float())
        labels.append(batch.labels)
    model.train(was_training)
    local_logits = torch.cat(logits) if logits else torch.empty(0, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, device=device)
    all_logits, all_labels = _gather(local_logits), _gather(local_labels)
    if len(all_labels) == 0:
        raise DataError(f"{reader.split_path}: no rows to evaluate on")
    auc = binary_auroc(torch.sigmoid(all_logits), all_labels.long()).item()
    logloss = F.binary_cross_entropy_with_logits(all_logits, all_labels).item()
    return EvalResult(auc=auc, logloss=logloss, examples=len(all_labels))


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (ranks may hold different counts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.cpu()
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat([p for p in parts if p is not None])
