"""`two_tower`: retrieval over an item catalog (MovieLens: users -> movies).

Options (`model.options`): query_features / item_features / item_id override the dataset's
feature roles (`role` in dataset.json, the catalog's item id); hidden (tower MLP widths), out_dim,
temperature (of the training softmax) and k (the cut-offs of recall@K / NDCG@K).
Training: in-batch sampled softmax with log-q correction (retrieval_loss.py). Evaluation: every
positive row of the split is a query whose target is its item, ranked among ALL catalog items,
sharded (retrieval_eval.py): each rank encodes only its slice of the catalog.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embshard.config import MAX_LAYER_WIDTH, JobConfig, ModelConfig, layers_problem
from embshard.datasets.catalog import read_catalog
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import ITEM_FREQUENCY, OOV_ID, DatasetSpec, flat_ids
from embshard.errors import ConfigError, DataError
from embshard.sharding.embedding_module import EmbeddingModule, inner_module
from embshard.trainer.evaluate import EvalResult
from embshard.trainer.models.arch import ModelArch
from embshard.trainer.models.retrieval_eval import RetrievalMetrics
from embshard.trainer.models.retrieval_loss import in_batch_softmax_loss
from embshard.trainer.models.two_tower_model import TowerLayout, TowerOutput, TwoTowerModel
from embshard.typed_config import from_dict

WHERE = "model.options"
# Catalog row 0 is the OOV id's: the row every unknown or rare movie shares, no item to rank or serve.
FIRST_ITEM = OOV_ID + 1


@dataclass
class TwoTowerOptions:
    query_features: list[str] | None = None  # default: the dataset's features with role "query"
    item_features: list[str] | None = None  # default: role "item" (the item id among them)
    item_id: str | None = None  # default: the item catalog's id column
    hidden: list[int] = field(default_factory=lambda: [64])  # hidden widths of each tower's MLP
    out_dim: int = 32  # width of query and item vectors
    temperature: float = 0.05  # softmax temperature of the cosine scores in training
    k: list[int] = field(default_factory=lambda: [10, 50])  # recall@K and NDCG@K cut-offs

    def __post_init__(self) -> None:
        problem = layers_problem(self.hidden)
        if problem:
            raise ConfigError(f"{WHERE}.hidden: {problem}")
        if not 1 <= self.out_dim <= MAX_LAYER_WIDTH:
            raise ConfigError(f"{WHERE}.out_dim: must be 1 to {MAX_LAYER_WIDTH:,}, got {self.out_dim}")
        if not self.temperature > 0:
            raise ConfigError(f"{WHERE}.temperature: must be > 0, got {self.temperature}")
        if not self.k or any(k < 1 for k in self.k):
            raise ConfigError(f"{WHERE}.k: one or more cut-offs >= 1, got {self.k}")


def parse_options(options: Mapping[str, Any]) -> TwoTowerOptions:
    return from_dict(TwoTowerOptions, options, WHERE)


def tower_layout(spec: DatasetSpec, options: TwoTowerOptions) -> TowerLayout:
    """The features of each tower; ConfigError naming the option (or the dataset) that is wrong."""
    catalog = spec.catalog
    if catalog is None:
        raise ConfigError(f"model.arch 'two_tower': dataset {spec.name!r} has no item catalog to rank "
                          "(dataset.json `catalog`; `embshard data convert movielens` writes one)")
    if ITEM_FREQUENCY not in spec.extra:
        raise ConfigError(f"model.arch 'two_tower': dataset {spec.name!r} has no {ITEM_FREQUENCY!r} column "
                          "(the item sampling frequency of the log-q correction)")
    query = _features(spec, options.query_features, "query", "query_features")
    item = _features(spec, options.item_features, "item", "item_features")
    of_item = set(spec.with_role("item")) | {catalog.item_id, *catalog.features}
    leaked = [f for f in query if f in of_item]
    if leaked:
        # Each row's item features describe its target: in the query tower they give the answer
        # away (recall@10 2.6x higher on MovieLens, on a model that cannot serve).
        raise ConfigError(f"{WHERE}.query_features: {leaked[0]!r} describes the item (role 'item' or a column of "
                          "the item catalog); a query tower must not see its target")
    both = sorted(set(query) & set(item))
    if both:
        raise ConfigError(f"{WHERE}: feature {both[0]!r} is in both the query and the item tower")
    item_id = options.item_id or catalog.item_id
    key = f"{WHERE}.item_id" if options.item_id else f"{WHERE}.item_features"
    if item_id != catalog.item_id:
        raise ConfigError(f"{WHERE}.item_id: {item_id!r}, but the item catalog is keyed by {catalog.item_id!r}")
    if item_id not in item:
        raise ConfigError(f"{key}: the item id {item_id!r} is not among the item features {item}")
    off_catalog = [f for f in item if f not in (catalog.item_id, *catalog.features)]
    if off_catalog:
        raise ConfigError(f"{WHERE}.item_features: {off_catalog[0]!r} is not in the item catalog "
                          f"(it has {', '.join([catalog.item_id, *catalog.features])})")
    unread = [f for f in spec.sparse_names if f not in query and f not in item]
    if unread:
        # Their tables would be planned, counted in the serving size and an MDE budget, exported,
        # and never trained (as mf refuses for its two ids).
        raise ConfigError(f"{WHERE}: dataset {spec.name!r} has features in neither tower ({', '.join(unread)}); "
                          "name each in query_features or item_features, or convert the data without them")
    items = catalog.rows - FIRST_ITEM
    if max(options.k) >= items:
        raise ConfigError(f"{WHERE}.k: {max(options.k)} is not below the catalog's {items} items (recall@"
                          f"{max(options.k)} would be 1 for any model)")
    return TowerLayout(query, item, item_id)


def _features(spec: DatasetSpec, named: list[str] | None, role: str, option: str) -> list[str]:
    if named is None:
        found = spec.with_role(role)
        if not found:
            raise ConfigError(f"{WHERE}.{option}: dataset {spec.name!r} marks no feature with role {role!r}; "
                              f"name the {role} features")
        return found
    if not named:
        raise ConfigError(f"{WHERE}.{option}: empty; the {role} tower needs at least one feature")
    for name in named:
        if name not in spec.sparse_names:
            raise ConfigError(f"{WHERE}.{option}: unknown feature {name!r} (dataset {spec.name!r} has "
                              f"{', '.join(spec.sparse_names)})")
    return list(named)


class TwoTowerArch(ModelArch):
    uniform_width = False  # the towers concatenate: each feature at its own width
    reads_layers = False  # its towers' widths are `model.options.hidden`
    reads_dense = False  # ids alone
    options = tuple(f.name for f in fields(TwoTowerOptions))
    settings: TwoTowerOptions | None = None

    def check(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        super().check(cfg, spec)
        tower_layout(spec, parse_options(cfg.model.options))

    def build(self, embeddings: EmbeddingModule, spec: DatasetSpec, cfg: ModelConfig,
              device: torch.device | None) -> nn.Module:
        # Kept on the arch: the loss and evaluation of the model it builds read them.
        self.settings = parse_options(cfg.options)
        layout = tower_layout(spec, self.settings)
        return TwoTowerModel(embeddings, layout, self.settings.hidden, self.settings.out_dim, device)

    def loss(self, output: TowerOutput, batch: Batch) -> torch.Tensor:
        return in_batch_softmax_loss(output.query, output.item, output.item_ids, batch.extra[ITEM_FREQUENCY],
                                     batch.labels, self._settings().temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, reader: ParquetBatchReader, device: torch.device,
                 max_batches: int | None) -> EvalResult:
        """recall@K and NDCG@K of every positive row of `reader`'s split over all catalog items
        (the OOV row, catalog row 0, is neither a target nor a candidate)."""
        towers = _find_towers(model)
        was_training = towers.training
        towers.eval()
        try:
            items, item_ids = encode_catalog(towers, reader, device)
            # A positive of the OOV item has no target to find: its row stands for every unknown movie.
            oov = int(_mapped(reader.id_maps, towers.layout.item_id, np.array([OOV_ID]))[0])
            metrics = RetrievalMetrics(self._settings().k, device)
            for i, batch in enumerate(reader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = batch.to(device)
                out = towers(batch.dense, batch.sparse)
                positive = (batch.labels > 0.5) & (out.item_ids != oov)
                metrics.add(out.query[positive], out.item_ids[positive], items, item_ids)
            values, queries = metrics.result()
        finally:
            towers.train(was_training)
        if queries == 0:
            raise DataError(f"{reader.split_path}: no positive rows to evaluate retrieval on")
        return EvalResult(values, f"recall@{min(self._settings().k)}", queries)

    def _settings(self) -> TwoTowerOptions:
        if self.settings is None:
            raise RuntimeError("two_tower: loss or evaluate before build")
        return self.settings


def _find_towers(model: nn.Module) -> TwoTowerModel:
    # Called directly, not through DMP/DDP: evaluation needs the towers apart, and under no_grad
    # the data-parallel wrapper has nothing to do. The sharded embedding collection inside is
    # still the one DMP built, so item lookups stay sharded.
    found = inner_module(model, TwoTowerModel)
    if found is None:
        raise ConfigError("model.arch 'two_tower': the model has no TwoTowerModel inside")
    return found


def encode_catalog(towers: TwoTowerModel, reader: ParquetBatchReader,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the catalog through the item tower: vectors [m, D] and item ids [m]
    (as the model sees them: after the plan's id remap). Collective: every rank runs the same
    number of equal batches (slices are padded to one length; the padding is dropped after)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dataset = reader.split_path.parent
    spec = reader.spec
    assert spec.catalog is not None  # tower_layout checked it
    total = spec.catalog.rows
    if total <= FIRST_ITEM:
        raise DataError(f"{dataset}: the item catalog holds no item but the OOV row")
    per = math.ceil((total - FIRST_ITEM) / world)
    wanted = np.arange(FIRST_ITEM + rank * per, FIRST_ITEM + (rank + 1) * per)
    real = wanted < total
    rows = np.minimum(wanted, total - 1)  # padding repeats the last item
    table = read_catalog(dataset, spec, int(rows[0]), int(rows[-1]) + 1)
    table = table.take(rows - rows[0])
    vectors = []
    for sparse in catalog_batches(table, spec, towers.layout, reader.id_maps, reader.batch_size):
        sparse = sparse.to(device)
        out = towers(torch.zeros(sparse.stride(), len(spec.dense), device=device), sparse)
        vectors.append(out.item)
    ids = torch.from_numpy(_mapped(reader.id_maps, towers.layout.item_id, rows))
    keep = torch.from_numpy(real)
    return torch.cat(vectors)[keep.to(device)], ids[keep].to(device)


def catalog_batches(table: pa.Table, spec: DatasetSpec, layout: TowerLayout,
                    id_maps: Mapping[str, np.ndarray], batch_size: int) -> Iterator[KeyedJaggedTensor]:
    """The catalog rows as KeyedJaggedTensors over every feature of the dataset (the embedding
    collection takes them all): item features from the catalog, every other feature empty."""
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        n = chunk.num_rows
        values, lengths = [], []
        for name in spec.sparse_names:
            if name not in layout.item:
                values.append(np.empty(0, np.int64))
                lengths.append(np.zeros(n, np.int32))
                continue
            ids, offsets = flat_ids(chunk[name])
            values.append(_mapped(id_maps, name, ids))
            lengths.append(np.diff(offsets).astype(np.int32) if offsets is not None else np.ones(n, np.int32))
        yield KeyedJaggedTensor(keys=spec.sparse_names, values=torch.from_numpy(np.concatenate(values)),
                                lengths=torch.from_numpy(np.concatenate(lengths)), stride=n)


def _mapped(id_maps: Mapping[str, np.ndarray], name: str, ids: np.ndarray) -> np.ndarray:
    """Ids as the model sees them: through the plan's remap of `name`, if it has one."""
    mapping = id_maps.get(name)
    return np.ascontiguousarray(ids if mapping is None else mapping[ids], dtype=np.int64)

