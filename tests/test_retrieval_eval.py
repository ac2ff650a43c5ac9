"""Sharded recall/NDCG over all items equals a one-process brute force, exactly; an item tying
with the target ranks above it."""

from __future__ import annotations

import math

import pytest
import torch
from distributed import run_ranks

from embshard.trainer.models.retrieval_eval import RetrievalMetrics, metrics_from_positions

ITEMS, DIM, WORLD = 37, 8, 2
KS = [3, 10, 50]  # 50 > either rank's slice: local candidates are padded


def fixture() -> tuple[torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Items [ITEMS, DIM]; per rank, three query batches of different sizes (one empty)."""
    g = torch.Generator().manual_seed(0)
    items = torch.randn(ITEMS, DIM, generator=g)
    sizes = [[5, 0, 7], [3, 4, 0]]
    batches = [[(torch.randn(n, DIM, generator=g), torch.randint(0, ITEMS, (n,), generator=g)) for n in per]
               for per in sizes]
    return items, batches


def brute_force(items: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Each target's position in its full score row, by sorting every row."""
    order = (queries @ items.t()).argsort(dim=1, descending=True)
    position = (order == targets[:, None]).int().argmax(dim=1).clamp_max(max(KS))
    return metrics_from_positions(torch.bincount(position, minlength=max(KS) + 1), KS)


def _sharded(rank: int, world: int) -> tuple[dict[str, float], int]:
    items, batches = fixture()
    lo, hi = ITEMS * rank // world, ITEMS * (rank + 1) // world
    metrics = RetrievalMetrics(KS, torch.device("cpu"))
    for queries, targets in batches[rank]:
        metrics.add(queries, targets, items[lo:hi], torch.arange(lo, hi))
    return metrics.result()


@pytest.mark.slow
def test_sharded_metrics_equal_brute_force() -> None:
    items, batches = fixture()
    queries = torch.cat([q for per in batches for q, _ in per])
    targets = torch.cat([t for per in batches for _, t in per])
    want = brute_force(items, queries, targets)
    assert 0 < want["recall@3"] < want["recall@10"] < 1 and want["recall@50"] == 1
    for metrics, n in run_ranks(_sharded, WORLD):
        assert n == len(targets) == 19
        assert metrics == want  # exact: same scores, same ranks


def test_one_process_metrics() -> None:
    items, batches = fixture()
    metrics = RetrievalMetrics(KS, torch.device("cpu"))
    for queries, targets in batches[0]:
        metrics.add(queries, targets, items, torch.arange(ITEMS))
    got, n = metrics.result()
    assert n == 12
    queries = torch.cat([q for q, _ in batches[0]])
    targets = torch.cat([t for _, t in batches[0]])
    assert got == brute_force(items, queries, targets)
    assert math.isnan(RetrievalMetrics(KS, torch.device("cpu")).result()[0]["ndcg@3"])


def test_an_item_tying_with_the_target_ranks_above_it() -> None:
    # Ties were broken by topk's order, the catalog's: a model scoring every item alike (or PEP's
    # rows pruned to zero) "found" each target early in the catalog, the most popular ones.
    items = torch.zeros(20, DIM)
    items[7] = 1.0  # the one item scored apart
    targets = torch.tensor([*range(20), 99])  # 99: in no slice
    metrics = RetrievalMetrics([1, 10], torch.device("cpu"))
    metrics.add(torch.ones(len(targets), DIM), targets, items, torch.arange(20))
    got, n = metrics.result()
    assert n == 21
    # Item 7 is first; each other ties with 18 items below it (place 19); 99 is missed. By topk's
    # order, 9 of the tied ones were found.
    assert got["recall@1"] == got["recall@10"] == 1 / 21
    # A NaN score finds nothing, nor does a target in no slice: at any K, the catalog's size and more.
    missed = RetrievalMetrics([1, 50], torch.device("cpu"))
    missed.add(torch.full((1, DIM), math.nan), torch.tensor([3]), items, torch.arange(20))
    missed.add(torch.ones(1, DIM), torch.tensor([99]), items, torch.arange(20))
    assert missed.result() == ({"recall@1": 0.0, "ndcg@1": 0.0, "recall@50": 0.0, "ndcg@50": 0.0}, 2)
