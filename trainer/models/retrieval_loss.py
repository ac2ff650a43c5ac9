"""Two-tower training loss: softmax over in-batch negatives with log-q correction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor,
                          item_frequency: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each positive row's (query, item) pair against the items of every
    positive row of the batch. query/item: [B, D] (L2-normalised); item_ids, item_frequency,
    labels: [B]. Rows with label 0 take no part: they are no query, and their item is no sample
    of the positive distribution that log q describes."""
    positive = labels > 0.5
    if not bool(positive.any()):
        # Still a function of every parameter the batch touched, so DDP and the fused sparse
        # optimizer see (zero) gradients on every rank and no rank waits for another.
        return (query.sum() + item.sum()) * 0.0
    q, v, ids = query[positive], item[positive], item_ids[positive]
    logits = q @ v.t() / temperature
    # In-batch negatives are items drawn with probability q_j (their share of train positives),
    # so popular items are over-represented as negatives and get pushed down too hard. Yi et al.
    # 2019, "Sampling-bias-corrected neural modeling for large corpus item recommendations"
    # (RecSys), correct every logit by subtracting log q_j. Every item here was positive in train,
    # so q_j > 0; the clamp only guards against a dataset whose frequencies say otherwise.
    q_j = item_frequency[positive].clamp_min(torch.finfo(logits.dtype).tiny)
    logits = logits - torch.log(q_j)[None, :]
    # Another row with the same item is the positive itself, not a negative ("accidental hit").
    hit = ids[:, None] == ids[None, :]
    hit.fill_diagonal_(False)
    logits = logits.masked_fill(hit, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(q), device=logits.device))
