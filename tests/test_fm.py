"""The `fm` arch: logit = w0 + <w, dense> + per-id biases + every field pair's dot product, on
single- and multi-hot features (a bag's vector and bias are sums over its ids)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch
from conftest import uniform_tables

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.datasets.synth import synthesize
from embshard.trainer.build import build_unsharded

# Half the features single ids, half bags of 3: both poolings are checked.
BAGS = [1] * 13 + [3] * 13


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "data"
    synthesize(out, rows=400, seed=3, max_cardinality=40, bag_sizes=BAGS)
    return out


def test_logit_is_biases_plus_linear_dense_plus_every_field_pair_dot_product(data: Path, tmp_path: Path) -> None:
    cfg = JobConfig(
        output_dir=str(tmp_path / "run"),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(data), batch_size=32, prefetch=1),
        model=ModelConfig(arch="fm"),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(progress=False),
        checkpoint=CheckpointConfig(enabled=False),
    )
    bundle = plan_for_training(cfg, None)
    spec = DatasetSpec.load(data)
    model = build_unsharded(cfg, bundle, spec, torch.device("cpu"))
    fm = model.model
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero biases and weights, so every term is seen
        for bag in fm.biases.values():
            bag.weight.normal_()
        fm.linear.weight.normal_()
        fm.linear.bias.fill_(0.5)
    batch = next(iter(ParquetBatchReader(data, "train", 32, shuffle=False, id_maps=bundle.id_maps())))
    loss, logits = model(batch)

    tables = uniform_tables(model)
    want = batch.dense @ fm.linear.weight[0] + 0.5
    vectors = {}
    for name, size in zip(spec.sparse_names, BAGS, strict=True):
        ids = batch.sparse[name].values().reshape(-1, size)
        vectors[name] = tables[name][ids].sum(1)
        want = want + fm.biases[name].weight[ids, 0].sum(1)
    for f, g in combinations(spec.sparse_names, 2):
        want = want + (vectors[f] * vectors[g]).sum(-1)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(want, batch.labels),
                               rtol=1e-4, atol=1e-4)
