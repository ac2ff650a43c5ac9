"""Recall@K and NDCG@K over every item of a catalog, computed sharded.

Each rank holds the embeddings of its own slice of the catalog. For every batch of queries the
ranks exchange their queries (small: B x D each), score all of them against their slice, keep a
local top-K, and exchange only those candidates (B x K per rank, per rank); each rank merges
its own queries' candidates into the global top-K. No rank ever holds the whole item matrix.
Scores tie with probability ~0 for float embeddings; ties would break by topk's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

NO_ITEM = -1  # id of a padding candidate (a slice holding fewer than K items)


class RetrievalMetrics:
    """How many of this rank's queries found their target at each position of the top K; `result`
    reduces over ranks. Integer counts, so the result does not depend on how queries were split
    over ranks or batches (float sums would, in their last bits)."""

    def __init__(self, ks: Sequence[int], device: torch.device) -> None:
        self.ks = sorted(ks)
        # counts[p]: queries whose target ranked at p (0 = best); counts[K]: not in the top K.
        self.counts = torch.zeros(self.ks[-1] + 1, dtype=torch.int64, device=device)

    def add(self, queries: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
            item_ids: torch.Tensor) -> None:
        """queries [n, D] with their target item ids [n]; items [m, D] this rank's slice with
        ids [m]. Collective: every rank calls it the same number of times (n may be 0)."""
        k = self.ks[-1]
        world = _world()
        sizes = _all_gather(torch.tensor([queries.shape[0]], device=queries.device))
        most = int(torch.stack(sizes).max())
        if most == 0:
            return
        padded = queries.new_zeros(most, queries.shape[1])
        padded[: queries.shape[0]] = queries
        everyone = torch.cat(_all_gather(padded))  # [world * most, D]
        scores, ids = local_top_k(everyone, items, item_ids, k)
        gathered_scores, gathered_ids = _all_gather(scores), _all_gather(ids)
        rank = dist.get_rank() if world > 1 else 0
        mine = slice(rank * most, rank * most + queries.shape[0])
        merged = merge_top_k(torch.cat([s[mine] for s in gathered_scores], dim=1),
                             torch.cat([i[mine] for i in gathered_ids], dim=1), k)
        self.score_ranked(merged, targets)

    def score_ranked(self, ranked_ids: torch.Tensor, targets: torch.Tensor) -> None:
        """ranked_ids [n, K]: each query's top K item ids, best first; targets [n]."""
        found = ranked_ids == targets[:, None]  # at most one True per row
        position = torch.where(found.any(dim=1), found.int().argmax(dim=1), found.shape[1])
        self.counts += torch.bincount(position, minlength=len(self.counts))

    def result(self) -> tuple[dict[str, float], int]:
        """Collective: (metric name -> mean over every rank's queries, number of queries)."""
        counts = self.counts.clone()
        if _world() > 1:
            dist.all_reduce(counts)
        return metrics_from_positions(counts.cpu(), self.ks), int(counts.sum())


def metrics_from_positions(counts: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """recall@k and NDCG@k (one relevant item: DCG = 1 / log2(position + 2), ideal DCG = 1) from
    counts[p] = queries whose target ranked at p, counts[-1] = queries whose target missed."""
    n = int(counts.sum())
    gain = 1.0 / torch.log2(torch.arange(len(counts) - 1, dtype=torch.float64) + 2)
    metrics = {}
    for k in sorted(ks):
        metrics[f"recall@{k}"] = int(counts[:k].sum()) / n if n else math.nan
        metrics[f"ndcg@{k}"] = float((counts[:k].double() * gain[:k]).sum()) / n if n else math.nan
    return metrics


def local_top_k(queries: torch.Tensor, items: torch.Tensor, item_ids: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] best scores of `queries` against `items` and their item ids; padded with -inf and
    NO_ITEM where the slice holds fewer than k items."""
    scores = queries @ items.t()
    take = min(k, items.shape[0])
    values, index = scores.topk(take, dim=1)
    ids = item_ids[index]
    if take < k:
        values = torch.cat([values, values.new_full((values.shape[0], k - take), -math.inf)], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], k - take), NO_ITEM)], dim=1)
    return values, ids


def merge_top_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k best of each row's candidates, best first."""
    _, index = scores.topk(k, dim=1)
    return ids.gather(1, index)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    if _world() == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(parts, t.contiguous())
    return parts
