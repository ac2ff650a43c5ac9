"""The `mf` arch: prediction = <user, item> + user bias + item bias + global bias, MSE loss, MSE and
RMSE evaluation; it trains only on rating data with just the two ids, and click archs refuse ratings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import uniform_tables
from movielens_fixture import write_ml1m_like

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    MdeConfig,
    ModelConfig,
    TrainConfig,
)
from embshard.datasets.convert import convert
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import DatasetSpec
from embshard.errors import ConfigError
from embshard.trainer.build import build_unsharded
from embshard.trainer.evaluate import EvalResult


@pytest.fixture(scope="module")
def ml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ml1m_like(tmp_path_factory.mktemp("mf") / "ml", users=80, movies=50, per_user=12)


@pytest.fixture(scope="module")
def ratings(ml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mf") / "ratings"
    convert("movielens", ml, out, target="rating", split="random", min_count=1)
    return out


def mf_config(data: Path, tmp: Path, embeddings: EmbeddingsConfig | None = None, **options) -> JobConfig:
    return JobConfig(
        seed=5,
        output_dir=str(tmp / "run"),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(data), batch_size=64, eval_batch_size=50, prefetch=1),
        model=ModelConfig(arch="mf", options=options),
        embeddings=embeddings or EmbeddingsConfig(dim=8),
        train=TrainConfig(progress=False),
        checkpoint=CheckpointConfig(enabled=False),
    )


def _model(cfg: JobConfig):
    bundle = plan_for_training(cfg, None)
    model = build_unsharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    return bundle, model


def test_prediction_is_dot_product_plus_three_biases(ratings: Path, tmp_path: Path) -> None:
    cfg = mf_config(ratings, tmp_path, init_bias=3.0)
    bundle, model = _model(cfg)
    mf = model.model
    assert mf.global_bias.item() == 3.0
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero biases, so each term is seen
        mf.user_bias.weight.normal_()
        mf.item_bias.weight.normal_()
    batch = next(iter(ParquetBatchReader(ratings, "train", 64, shuffle=False, id_maps=bundle.id_maps())))
    loss, rated = model(batch)

    users, items = batch.sparse["userId"].values(), batch.sparse["movieId"].values()
    tables = uniform_tables(model)
    u, i = tables["userId"][users], tables["movieId"][items]
    bu, bi = mf.user_bias.weight[users, 0], mf.item_bias.weight[items, 0]
    want = (u * i).sum(-1) + bu + bi + 3.0
    torch.testing.assert_close(rated.prediction, want)
    torch.testing.assert_close(loss, ((want - batch.labels) ** 2).mean())
    assert rated.penalty.item() == 0.0
    assert batch.labels.min() >= 1 and batch.labels.max() <= 5

    # l2: regularised MF's penalty on the batch's vectors and biases, added to the loss.
    regularised = mf_config(ratings, tmp_path, init_bias=3.0, l2=0.01)
    _, reg_model = _model(regularised)
    reg_model.load_state_dict(model.state_dict())
    loss, rated = reg_model(batch)
    penalty = 0.01 * ((u**2).sum(-1) + (i**2).sum(-1) + bu**2 + bi**2).mean()
    torch.testing.assert_close(rated.penalty, penalty)
    torch.testing.assert_close(loss, ((want - batch.labels) ** 2).mean() + penalty)


def test_evaluation_is_mse_and_rmse_over_the_whole_split(ratings: Path, tmp_path: Path) -> None:
    cfg = mf_config(ratings, tmp_path, init_bias=3.0)
    bundle, model = _model(cfg)
    reader = ParquetBatchReader(ratings, "test", 50, shuffle=False, drop_last=False, id_maps=bundle.id_maps())
    result = model.arch.evaluate(model, reader, torch.device("cpu"), None)
    errors = torch.cat([(model(b)[1].prediction - b.labels) ** 2 for b in reader])
    assert result.primary == "mse" and result.lower_is_better
    assert not EvalResult({"auc": 0.5, "logloss": 0.7}, "auc", 1).lower_is_better  # as evaluate_pointwise makes it
    assert result.examples == DatasetSpec.load(ratings).rows["test"] == len(errors)
    assert result.metrics["mse"] == pytest.approx(errors.mean().item(), rel=1e-5)
    assert result.metrics["rmse"] == pytest.approx(errors.mean().sqrt().item(), rel=1e-5)


def test_mde_within_tables_projects_both_vectors_to_the_base_dim(ratings: Path, tmp_path: Path) -> None:
    mde = EmbeddingsConfig(policy="mde", dim=16, min_dim=4, mde=MdeConfig(mode="within", blocks=3, alpha=1.0))
    bundle, model = _model(mf_config(ratings, tmp_path, mde))
    assert bundle.dimension_plan.uniform_width
    assert any(len({b.dim for b in t.blocks}) > 1 for t in bundle.dimension_plan.tables)
    batch = next(iter(ParquetBatchReader(ratings, "train", 64, shuffle=False, id_maps=bundle.id_maps())))
    loss, rated = model(batch)
    assert rated.prediction.shape == batch.labels.shape and torch.isfinite(loss)


def test_mf_refuses_click_data_and_extra_features(ml: Path, tmp_path: Path) -> None:
    clicks = tmp_path / "clicks"
    convert("movielens", ml, clicks, split="random", min_count=1)
    with pytest.raises(ConfigError, match=r"model.arch 'mf': dataset 'ml-1m' .* has 'click' labels; "
                                          r"this arch trains on 'rating' labels"):
        plan_for_training(mf_config(clicks, tmp_path), None)


def test_mf_options_name_the_bad_key(ratings: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.options.user: unknown feature 'uid'"):
        plan_for_training(mf_config(ratings, tmp_path, user="uid"), None)
    with pytest.raises(ConfigError, match=r"model.options: user and item are both 'userId'"):
        plan_for_training(mf_config(ratings, tmp_path, item="userId"), None)
    with pytest.raises(ConfigError, match=r"model.options.l2: must be >= 0, got -0.1"):
        plan_for_training(mf_config(ratings, tmp_path, l2=-0.1), None)


def test_click_archs_refuse_rating_labels(ratings: Path, tmp_path: Path) -> None:
    cfg = mf_config(ratings, tmp_path)
    cfg.model = ModelConfig(arch="dlrm", dense_arch=[8], over_arch=[8])
    with pytest.raises(ConfigError, match=r"model.arch 'dlrm': .* has 'rating' labels; this arch trains on 'click'"):
        plan_for_training(cfg, None)


def test_dense_features_mf_never_reads_are_said_in_the_plan(ratings: Path) -> None:
    # Thirteen dense columns beside the ratings were read and checked every batch, and never a
    # part of the model, without a word.
    import dataclasses

    from embshard.trainer.models import get_arch
    from embshard.trainer.planning import unread_settings

    cfg = mf_config(ratings, Path("unused"))
    spec = DatasetSpec.load(ratings)
    assert unread_settings(cfg, get_arch(cfg.model), spec) == []
    with_dense = dataclasses.replace(spec, dense=["I1", "I2", "I3", "I4"])
    assert unread_settings(cfg, get_arch(cfg.model), with_dense) == [
        "the dataset's 4 dense feature(s) (I1, I2, I3, ...) are not read by model.arch 'mf': they change nothing "
        "in this run"]
    assert unread_settings(dataclasses.replace(cfg, model=ModelConfig()), get_arch(ModelConfig()), with_dense) == []
