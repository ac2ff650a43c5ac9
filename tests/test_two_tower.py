"""two_tower: config checks, 2-rank sharded training and evaluation against one process, export."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from movielens_fixture import write_ml1m_like
from test_model_matrix import METHODS, sharded_state
from test_sharded_equivalence import global_batches, rows_of
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection

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
from embshard.datasets.reader import Batch, ParquetBatchReader
from embshard.datasets.schema import OOV_ID, DatasetSpec
from embshard.errors import ConfigError, DataError
from embshard.planner.pipeline import PlanBundle, plan_with
from embshard.planner.topology import TopologySpec
from embshard.trainer.build import build_sharded, build_unsharded
from embshard.trainer.export import export_serving
from embshard.trainer.loop import make_reader, train_step
from embshard.trainer.method import get_method, method_name
from embshard.trainer.models.retrieval_eval import metrics_from_positions
from embshard.trainer.models.two_tower import TwoTowerArch, encode_catalog
from embshard.trainer.models.two_tower_model import TwoTowerModel
from embshard.trainer.models.two_tower_serving import load_retrieval
from embshard.trainer.planning import planning_step

WORLD = 2
BATCH = 256  # global; each rank takes half
STEPS = 3
OPTIONS = {"hidden": [16], "out_dim": 8, "temperature": 0.1, "k": [5, 20]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("two_tower")
    convert("movielens", write_ml1m_like(tmp / "ml"), tmp / "data", min_count=1)
    return tmp / "data"


def job_config(dataset: Path, **options: object) -> JobConfig:
    return JobConfig(
        seed=5,
        data=DataConfig(path=str(dataset), eval_batch_size=64),
        model=ModelConfig(arch="two_tower", options={**OPTIONS, **options}),
        # SGD: equal gradients give equal weights (see test_sharded_equivalence.py).
        train=TrainConfig(sparse_optimizer="sgd", sparse_lr=0.5, dense_optimizer="sgd", dense_lr=0.1),
    )


# -- bad configs: one line naming the option --------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"item_features": ["movieId", "nope"]}, r"model.options.item_features: unknown feature 'nope' \(dataset"),
    ({"item_features": ["genres"]}, r"model.options.item_features: the item id 'movieId' is not among"),
    ({"item_features": ["movieId", "zip"]}, r"model.options: feature 'zip' is in both the query and the item"),
    ({"query_features": ["userId"], "item_features": ["movieId", "zip"]},
     r"model.options.item_features: 'zip' is not in the item catalog"),
    ({"query_features": []}, r"model.options.query_features: empty"),
    # The target's own features in the query tower: recall 2.6x higher, on a model that cannot serve.
    ({"query_features": ["userId", "genres"], "item_features": ["movieId"]},
     r"model.options.query_features: 'genres' describes the item \(role 'item' or a column of the item catalog\)"),
    ({"item_id": "userId"}, r"model.options.item_id: 'userId', but the item catalog is keyed by 'movieId'"),
    ({"temperature": 0}, r"model.options.temperature: must be > 0"),
    ({"k": [10, 500]}, r"model.options.k: 500 is not below the catalog's 120 items \(recall@500 would be 1"),
    ({"towers": 2}, r"model.options.towers: not an option of model.arch"),
])
def test_bad_options_are_one_line(dataset: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TwoTowerArch().check(job_config(dataset, **options), DatasetSpec.load(dataset))


def test_no_item_features_or_catalog(dataset: Path) -> None:
    spec = DatasetSpec.load(dataset)
    no_roles = replace(spec, sparse=[replace(f, role="") for f in spec.sparse])
    with pytest.raises(ConfigError, match=r"model.options.query_features: dataset 'ml-1m' marks no feature "
                                          r"with role 'query'"):
        TwoTowerArch().check(job_config(dataset), no_roles)
    with pytest.raises(ConfigError, match=r"dataset 'ml-1m' has no item catalog"):
        TwoTowerArch().check(job_config(dataset), replace(spec, catalog=None))
    # Roles come from options where the dataset has none.
    towers = {"query_features": ["userId", "gender", "age", "occupation", "zip"],
              "item_features": ["movieId", "year", "genres"]}
    TwoTowerArch().check(job_config(dataset, **towers), replace(no_roles, catalog=spec.catalog))


@pytest.mark.parametrize("options", [
    {"query_features": ["userId", "age"]},
    {"item_features": ["movieId", "genres"]},
])
def test_a_feature_in_neither_tower_is_refused(dataset: Path, options: dict) -> None:
    # Its table was planned, counted in the serving size, exported and never trained.
    said = r"model.options: dataset 'ml-1m' has features in neither tower \(.*; name each"
    with pytest.raises(ConfigError, match=said):
        TwoTowerArch().check(job_config(dataset, **options), DatasetSpec.load(dataset))


# -- 2 ranks sharded == 1 process ---------------------------------------------------------------


def plan(cfg: JobConfig, out: Path, world: int) -> PlanBundle:
    bundle = plan_with(planning_step(cfg), cfg.data.path,
                     TopologySpec(world_size=world, device="cpu"), out, batch_size=BATCH // world,
                     optimizer=cfg.train.sparse_optimizer, sharding_types=["table_wise"])
    bundle.save()
    return bundle


def mde_config(dataset: Path) -> JobConfig:
    # MDE blocks of several widths: the towers take each feature at its own width.
    embeddings = EmbeddingsConfig(policy="mde", dim=16, min_dim=4, mde=MdeConfig(mode="within", blocks=2, alpha=0.5))
    return replace(job_config(dataset), embeddings=embeddings)


def part(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows [lo, hi) of a batch, its extra columns (item_frequency) included."""
    return replace(rows_of(batch, lo, hi), extra={k: v[lo:hi] for k, v in batch.extra.items()})


def valid_reader(dataset: Path, bundle: PlanBundle, rank: int = 0, world: int = 1) -> ParquetBatchReader:
    return ParquetBatchReader(dataset, "valid", 64, rank=rank, world_size=world, shuffle=False,
                              drop_last=False, id_maps=bundle.id_maps())


def _sharded(rank: int, world: int, cfg: JobConfig, plan_dir: Path
             ) -> tuple[list[float], dict[str, torch.Tensor] | None, dict[str, float], int]:
    dataset = Path(cfg.data.path)
    bundle = PlanBundle.load(plan_dir, cfg.train.sparse_optimizer)
    spec = DatasetSpec.load(dataset)
    init = build_unsharded(cfg, bundle, spec, torch.device("cpu"))
    sharded = build_sharded(cfg, bundle, spec, torch.device("cpu"), init_from=init)
    half = BATCH // world
    losses = [train_step(sharded, part(b, rank * half, (rank + 1) * half)).item()
              for b in global_batches(dataset, bundle)]
    state = {}
    for key, value in sharded.model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size()) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        state[key] = value
    result = sharded.arch.evaluate(sharded.model, valid_reader(dataset, bundle, rank, world), torch.device("cpu"), None)
    return losses, state if rank == 0 else None, dict(result.metrics), result.examples


def reference_training(cfg: JobConfig, bundle: PlanBundle) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, plain SGD; each step's loss is the mean of the two half-batches' losses, as the
    ranks' (in-batch negatives come from a rank's own half; DDP averages the ranks' gradients)."""
    model = build_unsharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    tables = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not t for t in tables)]
    opt = torch.optim.SGD([{"params": tables, "lr": cfg.train.sparse_lr}, {"params": others, "lr": cfg.train.dense_lr}])
    losses = []
    half = BATCH // WORLD
    for batch in global_batches(Path(cfg.data.path), bundle):
        loss = sum(model(part(batch, r * half, (r + 1) * half))[0] for r in range(WORLD)) / WORLD
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def brute_force(cfg: JobConfig, bundle: PlanBundle, state: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
    """The trained weights in one process: every valid positive's target ranked among every
    catalog item by sorting its full score row."""
    model = build_unsharded(cfg, bundle, DatasetSpec.load(cfg.data.path), torch.device("cpu"))
    model.load_state_dict(state)
    towers = model.model
    assert isinstance(towers, TwoTowerModel)
    reader = valid_reader(Path(cfg.data.path), bundle)
    with torch.no_grad():
        items, ids = encode_catalog(towers, reader, torch.device("cpu"))
        assert len(ids) == DatasetSpec.load(cfg.data.path).catalog.rows - 1  # all but the OOV row
        row_of = {int(i): r for r, i in enumerate(ids)}
        positions = []
        for batch in reader:
            out = towers(batch.dense, batch.sparse)
            positive = (batch.labels > 0.5) & (out.item_ids != oov_item(reader))
            order = (out.query[positive] @ items.t()).argsort(dim=1, descending=True)
            for row, target in zip(order, out.item_ids[positive], strict=True):
                positions.append(int((row == row_of[int(target)]).nonzero()))
    ks = OPTIONS["k"]
    counts = torch.bincount(torch.tensor(positions).clamp_max(max(ks)), minlength=max(ks) + 1)
    return metrics_from_positions(counts, ks), len(positions)


def oov_item(reader: ParquetBatchReader) -> int:
    """The OOV movie's id as the model sees it (after the plan's remap)."""
    remap = reader.id_maps.get("movieId")
    return int(remap[OOV_ID]) if remap is not None else OOV_ID


def test_the_oov_movie_is_no_target_and_no_candidate(tmp_path: Path, process_group: None) -> None:
    # Row 0 stands for every unknown movie: a valid positive of it was a query that found its
    # "target" whenever row 0 ranked high (on a MovieLens subset, over half of recall@10's hits).
    dataset = tmp_path / "data"
    convert("movielens", write_ml1m_like(tmp_path / "ml", movies=600, per_user=10), dataset,
            min_count=4)  # movies rated fewer than 4 times in train share row 0
    cfg = mde_config(dataset)
    bundle = plan(cfg, tmp_path / "plan", 1)
    model = build_unsharded(cfg, bundle, DatasetSpec.load(dataset), torch.device("cpu"))
    reader = valid_reader(dataset, bundle)
    raw = ParquetBatchReader(dataset, "valid", 64, shuffle=False, drop_last=False)
    movies = torch.cat([b.sparse["movieId"].values()[b.labels > 0.5] for b in raw])
    assert (movies == OOV_ID).any() and (movies != OOV_ID).any()
    result = model.arch.evaluate(model, reader, torch.device("cpu"), None)
    assert result.examples == int((movies != OOV_ID).sum())
    _, ids = encode_catalog(model.model, reader, torch.device("cpu"))
    assert oov_item(reader) not in ids.tolist()


@pytest.mark.slow
def test_two_tower_sharded_training_and_evaluation_equal_one_process(dataset: Path, tmp_path: Path) -> None:
    cfg = mde_config(dataset)
    bundle = plan(cfg, tmp_path / "plan", WORLD)
    assert not bundle.dimension_plan.uniform_width
    widths = {b.dim for t in bundle.dimension_plan.tables for b in t.blocks}
    assert len(widths) > 1
    ref_losses, ref_state = reference_training(cfg, bundle)
    results = run_ranks(_sharded, WORLD, cfg, bundle.directory)

    mean_losses = [sum(ls) / WORLD for ls in zip(*[r[0] for r in results], strict=True)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert ref_losses[-1] < ref_losses[0]
    state = results[0][1]
    for key, want in ref_state.items():
        torch.testing.assert_close(state[key], want, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")

    want, queries = brute_force(cfg, bundle, state)
    assert queries > 50 and 0 < want["recall@5"] < want["recall@20"] < 1
    for _, _, metrics, examples in results:
        assert examples == queries
        assert metrics == want  # exact: both ranked the same scores


# -- export: the query encoder and the item vectors reproduce the trained model ------------------


def test_export_reproduces_the_trained_models_scores(dataset: Path, tmp_path: Path) -> None:
    cfg = mde_config(dataset)
    bundle = plan(cfg, tmp_path / "plan", 1)
    assert any(t.remap for t in bundle.dimension_plan.tables)  # raw ids differ from the model's
    spec = DatasetSpec.load(dataset)
    model = build_unsharded(cfg, bundle, spec, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for batch in global_batches(dataset, bundle):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    export_serving(model, tmp_path / "serving", model_config=cfg.model, spec=spec, plan_dir=bundle.directory,
                   data_dir=dataset)
    retrieval = load_retrieval(tmp_path / "serving", dataset)
    # Another writing of the data (its ids name other movies): item vectors of the wrong movies.
    import json
    import shutil

    from embshard.trainer.export import ExportError

    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    written = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**written, "id": "f" * 32}))
    with pytest.raises(ExportError, match=rf"^{other}: not the dataset {tmp_path / 'serving'} was trained on"):
        load_retrieval(tmp_path / "serving", other)

    towers = model.model
    assert isinstance(towers, TwoTowerModel)
    remapped = valid_reader(dataset, bundle)
    raw = ParquetBatchReader(dataset, "valid", 64, shuffle=False, drop_last=False)
    with torch.no_grad():
        items, _ = encode_catalog(towers, remapped, torch.device("cpu"))
        torch.testing.assert_close(retrieval.item_vectors, items)
        assert retrieval.item_ids.tolist() == list(range(1, spec.catalog.rows))  # never the OOV row
        for trained_batch, raw_batch in zip(remapped, raw, strict=True):
            out = towers(trained_batch.dense, trained_batch.sparse)
            # A row's own item vector is its catalog item's: the catalog holds the rows' features.
            movie = raw_batch.sparse["movieId"].values()
            known = movie != OOV_ID
            torch.testing.assert_close(out.item[known], retrieval.item_vectors[movie[known] - 1])
            served = retrieval.query_encoder(raw_batch.dense, raw_batch.sparse) @ retrieval.item_vectors.t()
            torch.testing.assert_close(served, out.query @ items.t())
    # Raw values in (MovieLens' own ids, genre names), as the converter read them: the same scores.
    serving = retrieval.query_encoder.serving
    assert retrieval.item_values == serving.decode("movieId", retrieval.item_ids)
    movies = (dataset.parent / "ml" / "movies.dat").read_text().splitlines()
    assert sorted(retrieval.item_values) == sorted(int(line.split("::")[0]) for line in movies)
    raw_batch = next(iter(raw))
    rows = {f: serving.decode(f, jagged.values()) for f, jagged in raw_batch.sparse.to_dict().items()}
    genres, lengths = rows["genres"], raw_batch.sparse["genres"].lengths().tolist()
    rows["genres"] = [genres[sum(lengths[:i]):sum(lengths[:i + 1])] for i in range(len(lengths))]
    assert all(isinstance(g, str) for row in rows["genres"] for g in row) and 2858 not in rows["movieId"]
    again = serving.sparse_batch(rows)
    assert again.keys() == raw_batch.sparse.keys()
    assert torch.equal(again.values(), raw_batch.sparse.values())
    assert torch.equal(again.lengths(), raw_batch.sparse.lengths())
    with torch.no_grad():
        torch.testing.assert_close(retrieval.query_encoder(raw_batch.dense, again),
                                   retrieval.query_encoder(raw_batch.dense, raw_batch.sparse))
    # A query needs the query tower's features alone: the item features' rows were a must.
    encoder = retrieval.query_encoder
    query_rows = {f: rows[f] for f in encoder.layout.query}
    assert "movieId" not in query_rows
    with torch.no_grad():
        torch.testing.assert_close(encoder(raw_batch.dense, encoder.sparse_batch(query_rows)),
                                   encoder(raw_batch.dense, raw_batch.sparse))
    with pytest.raises(DataError, match=r"^sparse_batch: no values for 'userId'"):
        encoder.sparse_batch({f: v for f, v in query_rows.items() if f != "userId"})
    with pytest.raises(DataError, match=r"^sparse_batch: no feature given"):
        serving.sparse_batch({}, unread=list(serving.features))
    with pytest.raises(DataError, match=r"^sparse_batch: unknown feature 'movieID'"):
        serving.sparse_batch(query_rows, unread=["movieID"])  # a typo left every item feature to be given
    unseen = serving.sparse_batch({**{f: [None] for f in rows}, "movieId": [99_999], "genres": [["Western"]]})
    assert unseen.values().tolist() == [OOV_ID] * len(rows)  # every value unknown: the OOV id
    n = len(rows["userId"])
    for bad, message in [({"movieId": [1]}, r"sparse_batch: no values for 'userId'"),
                         ({**rows, "rating": [1]}, r"sparse_batch: unknown feature 'rating'"),
                         ({**rows, "userId": ["x"] * n}, r"feature 'userId': the values are int64; got 'x' \(str\)"),
                         ({**rows, "genres": ["Drama"] * n}, r"sparse_batch: feature 'genres' is multi-hot: give"),
                         ({**rows, "gender": ["F"]}, rf"sparse_batch: features given for different numbers of rows "
                                                     rf"\(\[1, {n}\]\)")]:
        with pytest.raises(DataError, match=rf"^{message}"):
            serving.sparse_batch(bad)
    with pytest.raises(DataError, match=r"^feature 'movieId': id 10000 outside \[0, "):
        serving.decode("movieId", [1, 10_000])
    for ids, message in [([None], r"ids are integers; got object"), ([1.9], r"ids are integers; got float64"),
                         ([2**70], r"ids are integers; got object")]:
        with pytest.raises(DataError, match=rf"^feature 'movieId': {message}"):
            serving.decode("movieId", ids)
    with pytest.raises(DataError, match=r"^feature 'userId': the values are int64; got 300.5 \(float\)"):
        serving.encode("userId", [300.5])  # was user 300's id
    # A top-k's ids, [queries, k], decode as a list a query (the module docstring's example).
    scores = retrieval.query_encoder(raw_batch.dense, raw_batch.sparse) @ retrieval.item_vectors.t()
    best = retrieval.item_ids[scores.topk(3).indices]
    movies_of = serving.decode("movieId", best)
    assert len(movies_of) == len(best) and movies_of[0] == [retrieval.item_values[int(i) - 1] for i in best[0]]
    for bad, message in [({**rows, "userId": 42}, r"feature 'userId': give a list of values, one a row"),
                         ({**rows, "genres": [5] * n}, r"feature 'genres' is multi-hot: give a list of values a row")]:
        with pytest.raises(DataError, match=rf"^sparse_batch: {message}"):
            serving.sparse_batch(bad)
    # A second export replaces the first, vocabularies and all; a user's file beside them is kept.
    export_serving(model, tmp_path / "serving", model_config=cfg.model, spec=spec, plan_dir=bundle.directory,
                   data_dir=dataset, overwrite=True)
    (tmp_path / "serving" / "vocab" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds 'vocab/notes.txt', which no export holds"):
        export_serving(model, tmp_path / "serving", model_config=cfg.model, spec=spec, data_dir=dataset,
                       overwrite=True)
    # Without the dataset folder the export cannot carry them, and says so where it was called.
    with pytest.warns(UserWarning, match=r"export without the vocabularies of dataset 'ml-1m'") as warned:
        export_serving(model, tmp_path / "bare", model_config=cfg.model, spec=spec, plan_dir=bundle.directory)
    assert warned[0].filename == __file__
    # Another writing of the data, as many ids each: its vocabularies would name every id wrongly.
    with pytest.raises(ExportError, match=rf"^{other}: holds another dataset \(id ffffffff\) than the model was "
                                          r"trained on"):
        export_serving(model, tmp_path / "wrong", model_config=cfg.model, spec=spec, plan_dir=bundle.directory,
                       data_dir=other)
    assert not (tmp_path / "wrong").exists()
    bare = load_retrieval(tmp_path / "bare", dataset)
    assert bare.item_values is None
    with pytest.raises(DataError, match=r"^feature 'movieId': the export has no vocabulary for it"):
        bare.query_encoder.serving.encode("movieId", [1])
    # Without vocabularies a batch is given by ids, in the same call.
    by_ids = {f: jagged.values().tolist() for f, jagged in raw_batch.sparse.to_dict().items()}
    by_ids["genres"] = [by_ids["genres"][sum(lengths[:i]):sum(lengths[:i + 1])] for i in range(len(lengths))]
    assert torch.equal(bare.query_encoder.serving.sparse_batch(by_ids).values(), raw_batch.sparse.values())
    with pytest.raises(DataError, match=r"^feature 'userId' \(no vocabulary: give its ids\): an id is missing"):
        bare.query_encoder.serving.sparse_batch({**by_ids, "userId": [None] * n})
    # Any array a user holds values in; an empty one decodes to nothing.
    import pandas as pd
    import pyarrow as pa

    some = rows["userId"][:3]
    want = serving.encode("userId", some)
    assert torch.equal(serving.encode("userId", pa.array(some)), want)
    assert torch.equal(serving.encode("userId", pd.Series(some)), want)
    assert torch.equal(serving.encode("userId", torch.tensor(some)), want)
    assert serving.decode("userId", []) == [] and serving.decode("userId", torch.tensor([], dtype=torch.int64)) == []


# -- every method on two_tower ------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_two_tower(dataset: Path, tmp_path: Path, process_group: None, method: str) -> None:
    cfg = JobConfig(
        output_dir=str(tmp_path / "run"),
        cluster=ClusterConfig(workers=1),
        data=DataConfig(path=str(dataset), batch_size=256, prefetch=1),
        model=ModelConfig(arch="two_tower", options=OPTIONS),
        train=TrainConfig(progress=False, sparse_lr=0.1, dense_lr=0.01),
        checkpoint=CheckpointConfig(enabled=False),
        **METHODS[method],
    )
    name = method if method in ("pep", "autodim") else method_name(cfg)
    bundle = plan_for_training(cfg, name)
    reader = make_reader(cfg, bundle, "train", 0, 1)
    sharded = build_sharded(cfg, bundle, reader.spec, torch.device("cpu"), method=get_method(name))
    before = sharded_state(sharded)
    losses = [float(train_step(sharded, batch)) for batch, _ in zip(reader, range(3), strict=False)]
    after = sharded_state(sharded)
    assert all(math.isfinite(x) for x in losses)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".ebc." in k or ".ec." in k for k in moved) and any("_tower." in k for k in moved)
    result = sharded.arch.evaluate(sharded.model, make_reader(cfg, bundle, "valid", 0, 1), torch.device("cpu"), None)
    assert result.primary == "recall@5" and 0 <= result.metrics["recall@5"] <= result.metrics["recall@20"] <= 1


def test_an_export_in_a_bucket_is_named_by_its_uri_in_errors(dataset: Path, tmp_path: Path, s3) -> None:
    # It is read from a local copy: errors named the copy, a folder gone by the time they were read.
    from embshard.datasets.schema import vocabulary_file
    from embshard.datasets.storage import copytree, location
    from embshard.trainer.export import ExportError, load_serving

    cfg = mde_config(dataset)
    bundle = plan(cfg, tmp_path / "plan", 1)
    spec = DatasetSpec.load(dataset)
    model = build_unsharded(cfg, bundle, spec, torch.device("cpu"))
    export_serving(model, tmp_path / "serving", model_config=cfg.model, spec=spec, plan_dir=bundle.directory,
                   data_dir=dataset)
    uri = s3.uri("serving")
    copytree(tmp_path / "serving", location(uri))
    assert load_serving(uri).decode("movieId", [1]) == load_serving(tmp_path / "serving").decode("movieId", [1])
    with pytest.raises(ExportError, match=rf"^{s3.uri('nope')}: no serving.json \(not a folder written by"):
        load_serving(s3.uri("nope"))
    client = s3.server.client()
    client.put_object(Bucket=s3.name, Key=f"serving/{vocabulary_file('userId')}",
                      Body=(tmp_path / "serving" / vocabulary_file("zip")).read_bytes())
    # Another feature's vocabulary in its place: not the file written (serving.json's sizes and hashes).
    with pytest.raises(ExportError, match=rf"^{uri}/vocab/userId\.parquet: [\d,]+ bytes, written [\d,]+; the export "
                                          r"is damaged"):
        load_serving(uri)
