"""`data synth --multi-hot`: MLPerf DLRMv2's pooling factors, end to end through profile, reader and plan."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_datasets_synth import auc

from embshard.cluster.cli import main
from embshard.datasets.cli import register
from embshard.datasets.profile import load_profile
from embshard.datasets.reader import ParquetBatchReader
from embshard.datasets.schema import SPLITS, DatasetSpec
from embshard.datasets.synth import MLPERF_MULTI_HOT_SIZES, hidden_model, synthesize
from embshard.errors import DataError

ROWS = 5_000
CAP = 2_000


@pytest.fixture(scope="module")
def multihot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multihot") / "d"
    synthesize(out, rows=ROWS, seed=0, max_cardinality=CAP, bag_sizes=MLPERF_MULTI_HOT_SIZES)
    return out


def test_mlperf_pooling_factors_are_the_default() -> None:
    # MLPerf Training DLRMv2 (recommendation_v2/torchrec_dlrm), --multi_hot_sizes.
    assert MLPERF_MULTI_HOT_SIZES == (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27,
                                      10, 3, 1, 1)
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["data", "synth", "--out", "x", "--multi-hot"]).multi_hot == MLPERF_MULTI_HOT_SIZES
    assert parser.parse_args(["data", "synth", "--out", "x"]).multi_hot is None


def test_every_row_has_its_feature_pooling_factor_of_ids(multihot_dir: Path) -> None:
    spec = DatasetSpec.load(multihot_dir)
    assert spec.name == "synth-criteo-multihot"
    assert all(f.multi_hot for f in spec.sparse) and len(spec.dense) == 13
    for split in SPLITS:
        table = pq.read_table(multihot_dir / split)
        assert table.schema.equals(spec.arrow_schema())
        for f, k in zip(spec.sparse, MLPERF_MULTI_HOT_SIZES, strict=True):
            lengths = pa.compute.list_value_length(table[f.name]).to_numpy()
            assert (lengths == k).all(), f.name
            ids = table[f.name].combine_chunks().flatten().to_numpy()
            assert ids.min() >= 0 and ids.max() < f.cardinality
    # Zipf-skewed within the 100-id bags too: the top 1% of ids take a large share of lookups.
    counts = load_profile(multihot_dir).counts("C21")
    assert np.sort(counts)[::-1][: CAP // 100].sum() / counts.sum() > 0.3


def test_profile_pooling_factors_match(multihot_dir: Path) -> None:
    profile = load_profile(multihot_dir)
    for i, k in enumerate(MLPERF_MULTI_HOT_SIZES):
        assert profile.pooling_factor(f"C{i + 1}") == k
        assert profile.counts(f"C{i + 1}").sum() == k * 4_000


def test_labels_follow_the_hidden_model(multihot_dir: Path) -> None:
    spec = DatasetSpec.load(multihot_dir)
    table = pq.read_table(multihot_dir / "train")
    label = table["label"].to_numpy()
    assert 0.2 < label.mean() < 0.3
    logit = hidden_model(0, CAP, bag_sizes=MLPERF_MULTI_HOT_SIZES).logit_of_table(table, spec)
    assert auc(logit, label) > 0.7


def test_reader_batches_have_those_lengths(multihot_dir: Path) -> None:
    reader = ParquetBatchReader(multihot_dir, "valid", batch_size=128, shuffle=False)
    batch = next(iter(reader))
    jagged = batch.sparse.to_dict()
    for i, k in enumerate(MLPERF_MULTI_HOT_SIZES):
        lengths = jagged[f"C{i + 1}"].lengths()
        assert lengths.shape == (128,) and (lengths == k).all()
    first = pq.read_table(multihot_dir / "valid")["C21"][0].as_py()
    assert jagged["C21"].values()[:100].tolist() == first


def test_plan_uses_the_pooling_factors(multihot_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from embshard.config import load_job_config
    from embshard.planner.pipeline import block_pooling_factors, load_id_maps, make_plan

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {multihot_dir}\n")
    out = tmp_path / "plan"
    assert main(["plan", str(cfg), "--world-size", "2", "--out", str(out)]) == 0
    assert "2 x cpu ranks" in capsys.readouterr().out and (out / "plan.json").is_file()
    job = load_job_config(cfg, [])
    bundle = make_plan(job.embeddings, multihot_dir, job.sharding.topology(2), tmp_path / "p2",
                       batch_size=job.data.batch_size, optimizer=job.train.sparse_optimizer)
    profile = load_profile(multihot_dir)
    plan = bundle.dimension_plan
    counts = {f: profile.counts(f) for t in plan.tables for f in t.features}
    factors = block_pooling_factors(plan, profile, counts, load_id_maps(plan, tmp_path / "p2"))
    per_feature = {f"C{i + 1}": 0.0 for i in range(26)}
    for table in plan.tables:
        for b in range(len(table.blocks)):
            (feature,) = table.features  # the default plan: one table per feature
            per_feature[feature] += factors[table.block_name(b)]
    assert per_feature == pytest.approx({f"C{i + 1}": k for i, k in enumerate(MLPERF_MULTI_HOT_SIZES)})


def test_custom_sizes_overwrite_and_bad_sizes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "d"
    sizes = ",".join(["2"] * 25 + ["4"])
    argv = ["data", "synth", "--out", str(out), "--rows", "200", "--max-cardinality", "30"]
    args = parser.parse_args([*argv, "--multi-hot", sizes])
    assert args.func(args) == 0
    assert load_profile(out).pooling_factor("C26") == 4 and load_profile(out).pooling_factor("C1") == 2
    args = parser.parse_args([*argv, "--multi-hot"])
    with pytest.raises(DataError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args([*argv, "--multi-hot", "--overwrite"])
    assert args.func(args) == 0
    assert load_profile(out).pooling_factor("C21") == 100
    for bad, what in (("1,2", "got 1,2"), (",".join(["1"] * 25 + ["0"]), "bag sizes from 1 to 10,000"),
                      # More ids a row than any model reads: the pilot alone ran out of memory.
                      (",".join(["1"] * 25 + ["1000000000"]), "bag sizes from 1 to 10,000")):
        args = parser.parse_args([*argv, "--multi-hot", bad, "--overwrite"])
        with pytest.raises(DataError, match=f"--multi-hot needs 26 {what}" if what.startswith("bag") else what):
            args.func(args)
    assert load_profile(out).pooling_factor("C21") == 100  # the refused runs left the dataset alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
