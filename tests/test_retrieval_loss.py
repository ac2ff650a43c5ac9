"""In-batch sampled softmax: log-q correction, accidental hits, negative rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from embshard.trainer.models.retrieval_loss import in_batch_softmax_loss

T = 0.1


def rows() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    item = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    ids = torch.tensor([7, 3, 7, 9, 2])
    freq = torch.tensor([0.5, 0.1, 0.5, 0.25, 0.15])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    return query, item, ids, freq, labels


def test_log_q_correction_and_accidental_hits_by_hand() -> None:
    query, item, ids, freq, labels = rows()
    loss = in_batch_softmax_loss(query, item, ids, freq, labels, T)
    pos = [0, 1, 2, 4]  # row 3 is a negative: neither query nor candidate
    want = []
    for i in pos:
        terms = []
        for j in pos:
            if j != i and ids[j] == ids[i]:
                continue  # rows 0 and 2 hold the same item: not each other's negative
            terms.append((j, float(query[i] @ item[j]) / T - math.log(float(freq[j]))))
        logits = torch.tensor([s for _, s in terms], dtype=torch.float64)
        own = [j for j, _ in terms].index(i)
        want.append(float(torch.logsumexp(logits, 0) - logits[own]))
    assert math.isclose(loss.item(), sum(want) / len(want), rel_tol=1e-5)


def test_correction_changes_the_loss_and_popular_negatives_count_less() -> None:
    query, item, ids, freq, labels = rows()
    uniform = in_batch_softmax_loss(query, item, ids, torch.full_like(freq, 0.2), labels, T)
    corrected = in_batch_softmax_loss(query, item, ids, freq, labels, T)
    assert not math.isclose(uniform.item(), corrected.item(), rel_tol=1e-4)
    # Scaling every q by one factor shifts every logit equally: the softmax is unchanged.
    scaled = in_batch_softmax_loss(query, item, ids, freq * 3, labels, T)
    assert math.isclose(scaled.item(), corrected.item(), rel_tol=1e-5)


def test_no_positive_rows_give_zero_loss_with_gradients() -> None:
    query, item, ids, freq, labels = rows()
    query.requires_grad_(True)
    loss = in_batch_softmax_loss(query, item, ids, freq, torch.zeros_like(labels), T)
    loss.backward()
    assert loss.item() == 0.0 and query.grad is not None and not query.grad.any()
