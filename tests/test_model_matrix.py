"""Every method on every built-in arch: planned by the driver, built by the one builder, a few
steps of the one train step; the loss stays finite and both the tables and the dense layers move.
The click archs train on synthetic click data, `mf` on MovieLens-shaped ratings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import profiled_synth
from movielens_fixture import write_ml1m_like

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    MletConfig,
    ModelConfig,
    PepConfig,
    TrainConfig,
)
from embshard.datasets.convert import convert
from embshard.trainer.build import build_sharded
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.method import get_method, method_name

MDE = EmbeddingsConfig(policy="mde", dim=16, min_dim=4, mde=MdeConfig(mode="within", blocks=3, alpha=0.4))
METHODS: dict[str, dict] = {
    "uniform": {"embeddings": EmbeddingsConfig(dim=16)},
    "mde": {"embeddings": MDE},
    "mde+mlet": {"embeddings": EmbeddingsConfig(**{**MDE.__dict__, "mlet": MletConfig(ratio=2)})},
    # No decay: on CPU none reaches row thresholds, and a decay asked for there is refused.
    "pep": {"embeddings": EmbeddingsConfig(dim=16),
            "pep": PepConfig(granularity="feature_dimension", weight_decay=0.0)},
    "autodim": {"embeddings": EmbeddingsConfig(dim=16), "autodim": AutodimConfig(candidates=[4, 8, 16])},
}
STEPS = 3
ARCHS = {  # arch -> (its options, the dense parameters that must move)
    "dlrm": ({}, (".over_arch.",)),
    "dlrm_dcn": ({"dcn_low_rank_dim": 8}, (".over_arch.", ".crossnet.")),
    "mf": ({"init_bias": 3.0}, (".user_bias.", ".item_bias.", "global_bias")),
    "fm": ({}, (".biases.", ".linear.")),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("matrix") / "data", rows=3000, max_cardinality=300, seed=11)


@pytest.fixture(scope="module")
def ratings(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("matrix-mf")
    src = write_ml1m_like(root / "ml", users=200, movies=80, per_user=20, seed=11)
    convert("movielens", src, root / "data", target="rating", split="random")
    return root / "data"


def sharded_state(sharded) -> dict[str, torch.Tensor]:
    """Local copies of every table shard and dense parameter (one rank: the whole model)."""
    out = {}
    for key, value in sharded.model.state_dict().items():
        if hasattr(value, "local_shards"):
            value = torch.cat([s.tensor.flatten() for s in value.local_shards()])
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value.detach().clone()
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_every_arch(dataset, ratings, tmp_path, process_group, method, arch) -> None:
    options, dense_parts = ARCHS[arch]
    cfg = JobConfig(
        output_dir=str(tmp_path / "run"),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(ratings if arch == "mf" else dataset), batch_size=128, prefetch=1),
        model=ModelConfig(arch=arch, options=options, dense_arch=[16], over_arch=[16]),
        train=TrainConfig(progress=False, sparse_lr=0.1, dense_lr=0.01),
        checkpoint=CheckpointConfig(enabled=False),
        **METHODS[method],
    )
    name = method if method in ("pep", "autodim") else method_name(cfg)
    bundle = plan_for_training(cfg, name)
    # Per-feature widths where the arch takes them and the method's module can give them.
    assert bundle.dimension_plan.uniform_width == (arch in ("dlrm", "mf", "fm") or method in ("pep", "autodim"))
    reader = make_reader(cfg, bundle, "train", 0, 1)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"), method=get_method(name))
    before = sharded_state(sharded)
    losses = [float(train_step(sharded, batch)) for batch, _ in zip(reader, range(STEPS), strict=False)]
    after = sharded_state(sharded)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".ebc." in k or ".ec." in k for k in moved), sorted(before)
    for part in dense_parts:
        assert any(part in k for k in moved), (part, sorted(moved))
