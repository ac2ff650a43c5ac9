"""Recall@K and NDCG@K over every item of a catalog, computed sharded.

Each rank holds the embeddings of its own slice of the catalog. For every batch of queries the
ranks gather every rank's queries and targets (B x D and B each), score all of them against their
slice, and count, per query, the items of the slice that score above its target and those that
tie with it; the target's score (from the rank holding the target) and those two counts are
all-reduced (world x B each). No rank ever holds the whole item matrix.

An item tying with the target ranks above it. Ties are common where rows are alike: PEP prunes
whole rows to zero, and a model that has not learned scores items alike. Broken by the
catalog's order, as a top-K broke them, they counted a target that comes early in it (the most
popular items: ids are ordered by count) as found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

NO_ITEM = -1  # target id of a padding query
MISSED = torch.iinfo(torch.int64).max  # the place of a target not found: beyond every K


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
        world = _world()
        sizes = _all_gather(torch.tensor([queries.shape[0]], device=queries.device))
        most = int(torch.stack(sizes).max())
        if most == 0:
            return
        n = queries.shape[0]
        padded = queries.new_zeros(most, queries.shape[1])
        padded[:n] = queries
        padded_targets = targets.new_full((most,), NO_ITEM)
        padded_targets[:n] = targets
        everyone = torch.cat(_all_gather(padded))  # [world * most, D]
        positions = target_positions(everyone, torch.cat(_all_gather(padded_targets)), items, item_ids)
        rank = dist.get_rank() if world > 1 else 0
        self.add_positions(positions[rank * most: rank * most + n])

    def add_positions(self, positions: torch.Tensor) -> None:
        """positions [n]: each query's target's place among all items (0 = best)."""
        self.counts += torch.bincount(positions.clamp_max(self.ks[-1]), minlength=len(self.counts))

    def result(self) -> tuple[dict[str, float], int]:
        """Collective: (metric name -> mean over every rank's queries, number of queries)."""
        counts = self.counts.clone()
        if _world() > 1:
            dist.all_reduce(counts)
        return metrics_from_positions(counts.cpu(), self.ks), int(counts.sum())


def target_positions(queries: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
                     item_ids: torch.Tensor) -> torch.Tensor:
    """Collective: each query's target's place among every rank's items, counting the items that
    score above it or tie with it; MISSED for a target no rank holds, or whose score is NaN.
    Beside the scores, one boolean [n, m] at a time (each comparison), not float copies of them."""
    scores = queries @ items.t()  # [n, m]
    target_score = scores.new_full((len(targets),), -math.inf)
    held = torch.zeros(len(targets), dtype=torch.bool, device=scores.device)
    if len(item_ids):
        sorted_ids, order = item_ids.sort()
        at = torch.searchsorted(sorted_ids, targets).clamp_max(len(sorted_ids) - 1)
        held = sorted_ids[at] == targets
        column = order[at][:, None]
        target_score = torch.where(held, scores.gather(1, column).squeeze(1), target_score)
    if _world() > 1:
        dist.all_reduce(target_score, op=dist.ReduceOp.MAX)
    above = (scores > target_score[:, None]).sum(dim=1)
    tied = (scores == target_score[:, None]).sum(dim=1) - held.long()  # the target is no tie of its own
    ahead = torch.stack([above, tied])
    if _world() > 1:
        dist.all_reduce(ahead)
    missed = (target_score == -math.inf) | torch.isnan(target_score)
    return torch.where(missed, MISSED, ahead[0] + ahead[1])


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    if _world() == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(parts, t.contiguous())
    return parts
