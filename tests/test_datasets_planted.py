"""`data synth --planted`: recorded ranks and Bayes AUC are what the generator really planted."""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_datasets_synth import auc

from embshard.datasets.cli import register
from embshard.datasets.planted import expected_auc, planted_model, synthesize_planted
from embshard.datasets.schema import SPLITS, DatasetSpec
from embshard.errors import DataError

ROWS = 40_000
CAP = 2_000
RANKS = (2, 16)
REPO = Path(__file__).resolve().parents[1]


def hanley_mcneil_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an empirical AUC (Hanley & McNeil 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float(np.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)))


def true_probability(table: pa.Table, spec: DatasetSpec, seed: int) -> np.ndarray:
    """The generator's click probability of rows read back (ids mapped back to frequency ranks)."""
    model = planted_model(seed, CAP, RANKS)
    ranks = []
    for f, perm in zip(spec.sparse_names, model.base.id_of_rank, strict=True):
        rank_of_id = np.empty_like(perm)
        rank_of_id[perm] = np.arange(len(perm))
        ranks.append(rank_of_id[table[f].to_numpy()])
    dense = np.column_stack([table[d].to_numpy() for d in spec.dense]).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-model.logit(ranks, dense)))


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("planted") / "d"
    synthesize_planted(out, rows=ROWS, seed=0, max_cardinality=CAP, rank_range=RANKS)
    return out


def test_recorded_bayes_auc_matches_the_labels_sampled(planted_dir: Path) -> None:
    spec = DatasetSpec.load(planted_dir)
    recorded = spec.planted["bayes_auc"]
    assert set(recorded) == set(SPLITS)
    for split in SPLITS:
        table = pq.read_table(planted_dir / split)
        label = table["label"].to_numpy()
        p = true_probability(table, spec, seed=0)
        # The written labels are one draw: their AUC scatters around the expectation by about
        # one Hanley-McNeil standard error, so 4 of them fail by chance less than 1 in 10,000.
        sampled = auc(p, label)
        n_pos = int(label.sum())
        assert abs(sampled - recorded[split]) < 4 * hanley_mcneil_se(sampled, n_pos, len(label) - n_pos)
        assert recorded[split] == pytest.approx(expected_auc(p), abs=1e-6)  # from these very rows
    # Independent of the written labels: many fresh draws over the test rows. The mean of 200
    # AUCs has a standard error of ~0.0006 here (0.008 / sqrt(200)) and the ratio-of-expectations
    # bias is O(1/rows) ~ 1e-4, so 0.003 is ~4 standard errors.
    table = pq.read_table(planted_dir / "test")
    p = true_probability(table, spec, seed=0)
    rng = np.random.default_rng(123)
    draws = [auc(p, (rng.random(len(p)) < p).astype(np.float32)) for _ in range(200)]
    assert abs(np.mean(draws) - recorded["test"]) < 0.003
    assert 0.7 < recorded["test"] < 0.97  # learnable, not trivial


def test_ranks_are_recorded_per_table_and_block_and_really_planted(planted_dir: Path) -> None:
    spec = DatasetSpec.load(planted_dir)
    ranks = spec.planted["ranks"]
    assert list(ranks) == spec.sparse_names
    assert spec.planted["latent_dim"] == RANKS[1] and spec.planted["basis"] == "random"
    model = planted_model(0, CAP, RANKS)
    falling = 0
    for t, f in enumerate(spec.sparse):
        entry = ranks[f.name]
        assert RANKS[0] <= entry["rank"] <= min(RANKS[1], f.cardinality)
        blocks = entry["blocks"]
        assert blocks[0]["start"] == 0 and blocks[-1]["end"] == f.cardinality
        assert all(a["end"] == b["start"] for a, b in pairwise(blocks))
        assert blocks[0]["rank"] == entry["rank"]
        latent = model.latent(t)
        assert latent.shape == (f.cardinality, RANKS[1])
        assert np.linalg.matrix_rank(latent) == entry["rank"]
        for b in blocks:
            assert np.linalg.matrix_rank(latent[b["start"] : b["end"]]) == b["rank"]
        ranks_of_blocks = [b["rank"] for b in blocks]
        assert ranks_of_blocks == sorted(ranks_of_blocks, reverse=True)
        falling += ranks_of_blocks[0] > ranks_of_blocks[-1]
    assert falling >= 10  # popular rows span more dimensions than rare ones in most tables
    assert len({e["rank"] for e in ranks.values()}) >= 5  # ranks spread over the range


def test_aligned_tables_are_zero_past_their_rank_and_otherwise_the_same_draws() -> None:
    random, aligned = planted_model(0, CAP, RANKS), planted_model(0, CAP, RANKS, aligned=True)
    zero_past_rank = 0
    for t in range(len(random.coords)):
        rank = aligned.rank(t)
        np.testing.assert_array_equal(aligned.coords[t], random.coords[t])
        np.testing.assert_array_equal(aligned.latent(t)[:, :rank], aligned.coords[t])
        assert not aligned.latent(t)[:, rank:].any()
        # A random subspace leaves no coordinate zero, so element-wise pruning cannot see the rank.
        zero_past_rank += not random.latent(t)[:, rank:].any()
    assert zero_past_rank == sum(aligned.rank(t) == RANKS[1] for t in range(len(random.coords)))


def test_cli_aligned_is_recorded_and_needs_planted(tmp_path: Path) -> None:
    argv = ["data", "synth", "--aligned", "--out", str(tmp_path / "d"), "--rows", "300", "--max-cardinality", "30"]
    args = _parser().parse_args(argv)
    with pytest.raises(DataError, match="--aligned needs --planted"):
        args.func(args)
    args = _parser().parse_args([*argv, "--planted"])
    assert args.func(args) == 0
    spec = DatasetSpec.load(tmp_path / "d")
    assert spec.planted["basis"] == "aligned" and "aligned" in spec.source
    assert spec.planted["bayes_auc"]["train"] > 0.5


def test_deterministic_per_seed(planted_dir: Path, tmp_path: Path) -> None:
    again = synthesize_planted(tmp_path / "a", rows=ROWS, seed=0, max_cardinality=CAP, rank_range=RANKS)
    assert replace(again, id="") == replace(DatasetSpec.load(planted_dir), id="")  # the id names a writing
    assert pq.read_table(tmp_path / "a" / "test").equals(pq.read_table(planted_dir / "test"))
    other = synthesize_planted(tmp_path / "b", rows=200, seed=1, max_cardinality=CAP, rank_range=RANKS)
    assert other.planted["ranks"] != again.planted["ranks"]


def test_a_split_too_small_for_an_auc_records_none(tmp_path: Path) -> None:
    spec = synthesize_planted(tmp_path / "d", rows=10, max_cardinality=20, rank_range=(2, 4))
    assert spec.rows["test"] == 1 and spec.planted["bayes_auc"]["test"] is None
    assert DatasetSpec.load(tmp_path / "d") == spec  # strict JSON: no NaN written
    assert "NaN" not in (tmp_path / "d" / "dataset.json").read_text()


# The sweep compares its finished trials with the planted answer; it hands trials nothing of it.
SWEEP_REPORT = {"cluster/sweep_report.py", "cluster/sweep_cli.py"}


def test_no_planner_or_training_code_reads_the_planted_answer() -> None:
    readers = [p for pkg in ("planner", "sharding", "trainer", "cluster")
               for p in (REPO / pkg).rglob("*.py") if "planted" in p.read_text()]
    assert [str(p.relative_to(REPO)) for p in readers if str(p.relative_to(REPO)) not in SWEEP_REPORT] == []
    # ... and the trials the sweep launches get their configs without it.
    assert "planted" not in (REPO / "cluster" / "sweep_trial.py").read_text()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embshard")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_planted_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    argv = ["data", "synth", "--planted", "--rank-range", "3:6", "--out", str(out), "--rows", "500",
            "--max-cardinality", "50"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert "planted Bayes AUC: train 0." in capsys.readouterr().out
    spec = DatasetSpec.load(out)
    assert spec.name == "synth-planted" and spec.planted["latent_dim"] == 6
    assert len(spec.dense) == 13 and len(spec.sparse) == 26
    with pytest.raises(DataError, match="--overwrite"):
        args.func(args)
    args = _parser().parse_args([*argv, "--overwrite", "--seed", "2"])
    assert args.func(args) == 0
    assert DatasetSpec.load(out).planted != spec.planted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_rank_ranges_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "synth", "--planted", "--rank-range", "8", "--out", str(tmp_path)])
    assert "expected LO:HI" in capsys.readouterr().err
    args = _parser().parse_args(["data", "synth", "--planted", "--rank-range", "8:4", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="rank range must be 1 <= LO <= HI <= 512, got 1:100000"):
        planted_model(rank_range=(1, 100_000))  # asked for 40 GB before a row was written
    with pytest.raises(DataError, match="rank range must be 1 <= LO <= HI <= 512, got 8:4"):
        args.func(args)
    args = _parser().parse_args(["data", "synth", "--rank-range", "2:4", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="--rank-range needs --planted"):
        args.func(args)
    assert list(tmp_path.iterdir()) == []
