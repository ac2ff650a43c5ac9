"""Serving a two-tower export: a query encoder and the item vectors of the whole catalog (but
its OOV row, which stands for every unknown item).

`embshard export` writes both towers (the arch's state dict, see trainer/export.py). Items are
encoded once here, in one process, from the dataset's item catalog through the item tower:

    from embshard.trainer.models.two_tower_serving import load_retrieval
    retrieval = load_retrieval("outputs/run/serving", "outputs/ml-1m/data")
    scores = retrieval.query_encoder(dense, sparse) @ retrieval.item_vectors.t()   # the dataset's ids in
    best = retrieval.item_ids[scores.topk(10).indices]
    movies = retrieval.query_encoder.serving.decode("movieId", best)  # MovieLens' own movie ids

`retrieval.item_values[i]` is the raw value (MovieLens' movie id) of vector `i` when the export
carries the dataset's vocabularies (a converted dataset's); None otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.datasets.catalog import read_catalog
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.storage import location
from embshard.sharding.embedding_module import inner_module
from embshard.trainer.export import ExportError, ServingModel, load_serving, read_manifest
from embshard.trainer.models.two_tower import FIRST_ITEM, catalog_batches
from embshard.trainer.models.two_tower_model import TowerLayout, TwoTowerModel

ENCODE_BATCH = 4096


class QueryEncoder(nn.Module):
    """(dense, sparse of the dataset's ids over its features; item features may be empty) ->
    unit query vectors [B, out_dim]."""

    def __init__(self, serving: ServingModel, layout: TowerLayout) -> None:
        super().__init__()
        self.serving = serving
        self.layout = layout

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.serving(dense, sparse).query

    def sparse_batch(self, rows: Mapping[str, Sequence[Any]]) -> KeyedJaggedTensor:
        """`serving.sparse_batch` for queries: the query tower's features are needed, no item
        feature (the query tower reads none; a row's item features describe its target)."""
        return self.serving.sparse_batch(rows, unread=[f for f in self.serving.features if f not in self.layout.query])


@dataclass
class Retrieval:
    query_encoder: QueryEncoder
    item_ids: torch.Tensor  # [N]: catalog item ids, as in the data
    item_vectors: torch.Tensor  # [N, out_dim]: unit vectors; score = query . item
    item_values: list[Any] | None = None  # [N]: each item's raw value, from the export's vocabulary


@torch.no_grad()
def load_retrieval(directory: str | Path, dataset_dir: str | Path) -> Retrieval:
    serving = load_serving(directory)
    towers = inner_module(serving, TwoTowerModel)
    if towers is None:
        raise ExportError(f"{directory}: not a two_tower export (its model has no towers)")
    spec = DatasetSpec.load(dataset_dir)
    exported = read_manifest(location(directory)).spec.get("id")
    if exported and spec.id and exported != spec.id:
        # Its ids name other movies, or none: item vectors of the wrong movies, or an index error.
        raise ExportError(f"{dataset_dir}: not the dataset {directory} was trained on (dataset id {spec.id[:8]}, the "
                          f"export's {str(exported)[:8]}); give the dataset the model was trained on")
    catalog = read_catalog(dataset_dir, spec, start=FIRST_ITEM)
    # Raw ids: the serving model applies the plan's remaps itself.
    vectors = [serving(torch.zeros(kjt.stride(), len(spec.dense)), kjt).item
               for kjt in catalog_batches(catalog, spec, towers.layout, {}, ENCODE_BATCH)]
    assert spec.catalog is not None  # read_catalog raised otherwise
    item_id = spec.catalog.item_id
    ids = torch.tensor(catalog[item_id].to_numpy())
    values = serving.decode(item_id, ids) if item_id in serving.vocabularies else None
    return Retrieval(QueryEncoder(serving, towers.layout), ids, torch.cat(vectors), values)
