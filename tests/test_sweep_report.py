"""The sweep's report logic on hand-made points: frontier per method, the honest claim, the
planted comparison, merged sweeps; and the sweep's bad-input lines."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import held_elsewhere

from embshard.cluster.cli import main
from embshard.cluster.sweep_cli import write_report
from embshard.cluster.sweep_methods import MLET_KNOBS, Pep, PlannedMethod, TrialRuns, uniform_width
from embshard.cluster.sweep_plan import (
    SweepSpec,
    Trial,
    check_vary,
    method_knobs,
    parse_budgets,
    parse_methods,
    parse_vary,
    setting_label,
    with_knobs,
)
from embshard.cluster.sweep_report import (
    PlantedTruth,
    aggregate,
    by_setting,
    claim,
    curve,
    dataset_sha256,
    markdown,
    merge_reports,
    planted_comparison,
    rank_correlation,
    report,
    with_variants,
)
from embshard.config import EmbeddingsConfig, JobConfig, ShardingConfig, load_job_config
from embshard.datasets.schema import DatasetSpec, SparseFeature
from embshard.errors import ConfigError, DataError
from embshard.typed_config import to_dict

REPO = Path(__file__).resolve().parents[1]


GRID = [2, 8, 16, 24, 32]  # AutoDim's default candidates: the planted comparison's steps


def point(method: str, budget: float, seed: int, value: float, nbytes: int, widths: dict[str, int] | None = None):
    return {"method": method, "budget": budget, "seed": seed, "metric": "auc", "value": value,
            "serving_bytes": nbytes, "serving_params": nbytes // 4, "widths": widths or {"C1": 4}}


def rising() -> list[dict]:
    # uniform rises 0.70 -> 0.75 -> 0.78; mde reaches 0.779 at the middle budget's bytes.
    pts = []
    for seed, jitter in ((0, -0.0002), (1, 0.0002)):
        pts += [point("uniform", 0.25, seed, 0.70 + jitter, 1000), point("uniform", 0.5, seed, 0.75 + jitter, 2000),
                point("uniform", 1.0, seed, 0.78 + jitter, 4000),
                point("mde", 0.25, seed, 0.76 + jitter, 1000), point("mde", 0.5, seed, 0.7795 + jitter, 2000)]
    return pts


def test_aggregate_means_stds_and_errors():
    pts = rising() + [{"method": "mde", "budget": 0.125, "seed": 0, "metric": "auc", "error": "below MDE's floor"}]
    configs, errors = aggregate(pts)
    u = next(c for c in configs if c.method == "uniform" and c.budget == 0.5)
    assert u.mean == pytest.approx(0.75) and u.seeds == 2 and u.std == pytest.approx(0.000283, abs=1e-6)
    assert [c.budget for c in configs if c.method == "uniform"] == [0.25, 0.5, 1.0]  # by bytes
    assert errors == [pts[-1]]


def test_claim_names_the_smallest_plan_when_uniform_rises():
    configs, _ = aggregate(rising())
    c = claim(configs)
    assert c.rises is True
    assert c.tolerance == pytest.approx(0.001)  # the seed stds (0.0003) are smaller
    # Within 0.001 of 0.78: uniform only at 4000 bytes, mde at 2000 bytes -> 2x fewer.
    assert c.smallest["uniform"]["serving_bytes"] == 4000
    assert c.smallest["mde"]["serving_bytes"] == 2000 and c.smallest["mde"]["ratio_vs_uniform"] == pytest.approx(2)
    assert "mde at budget 0.5" in c.statement and "2.00x fewer serving bytes" in c.statement
    # Uniform alone: its own smallest plan is the claim, with nothing saved.
    alone = claim([c for c in configs if c.method == "uniform"])
    assert "is uniform at budget 1" in alone.statement and "no fewer serving bytes" in alone.statement


def test_each_method_is_reported_against_the_best_uniform():
    # mlet never comes within the tolerance: its best (0.775 at budget 0.5) is 0.005 short.
    pts = rising() + [point("mlet", b, s, v, n) for s in (0, 1) for b, v, n in ((0.25, 0.77, 1000), (0.5, 0.775, 2000))]
    rep = report(pts, None, GRID)
    best = rep["claim"]["best"]
    assert best["mlet"]["budget"] == 0.5 and best["mlet"]["behind"] == pytest.approx(0.005)
    assert best["mde"]["behind"] == pytest.approx(0.0005) and best["uniform"]["behind"] == 0
    text = markdown(rep, "t")
    assert ("**Per method**, its smallest plan within 0.0010 of the best uniform, else how far its best plan "
            "falls short: mde at budget 0.5, 2.00x fewer bytes than uniform; mlet none, its best (budget 0.5, "
            "0.7750) 0.0050 short; uniform at budget 1, no fewer bytes than uniform.") in text
    # Where width does not matter there is nothing to fall short of.
    flat = [point("uniform", b, s, 0.70, int(4000 * b)) for b in (0.25, 1.0) for s in (0, 1)]
    assert "Per method" not in markdown(report(flat, None, GRID), "t")


def mse_point(method: str, budget: float, seed: int, value: float, nbytes: int):
    return {**point(method, budget, seed, value, nbytes), "metric": "mse", "lower_is_better": True}


def falling_mse() -> list[dict]:
    # uniform's test MSE falls 0.95 -> 0.90 -> 0.87 with width; mde reaches 0.8705 at 2000 bytes,
    # mlet stays at 0.89 (worse than best + tolerance) even at 4000.
    pts = []
    for seed, jitter in ((0, -0.0002), (1, 0.0002)):
        pts += [mse_point("uniform", 0.25, seed, 0.95 + jitter, 1000),
                mse_point("uniform", 0.5, seed, 0.90 + jitter, 2000),
                mse_point("uniform", 1.0, seed, 0.87 + jitter, 4000),
                mse_point("mde", 0.25, seed, 0.92 + jitter, 1000), mse_point("mde", 0.5, seed, 0.8705 + jitter, 2000),
                mse_point("mlet", 1.0, seed, 0.89 + jitter, 4000)]
    return pts


def test_a_lower_is_better_metric_claims_the_plan_not_above_best_plus_tolerance(tmp_path):
    rep = report(falling_mse(), None, GRID)
    assert rep["metric"] == "test_mse" and rep["lower_is_better"] is True
    c = rep["claim"]
    assert c["rises"] is True and c["best_uniform"] == pytest.approx(0.87)
    assert c["smallest"]["uniform"]["serving_bytes"] == 4000
    mde = c["smallest"]["mde"]
    assert mde["serving_bytes"] == 2000 and mde["ratio_vs_uniform"] == pytest.approx(2)
    assert "mlet" not in c["smallest"]  # 0.89 > 0.87 + 0.001
    assert "test MSE 0.8700" in c["statement"] and "mde at budget 0.5" in c["statement"]
    assert "| test MSE (mean ± std) |" in markdown(rep, "t")
    paths = write_report(rep, "mse", tmp_path, "mse")
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rising_mse_is_width_not_helping():
    # Wider tables overfit: MSE rises with width, so uniform does not improve and no ratio is named.
    pts = [mse_point("uniform", b, s, 0.85 + 0.05 * b, int(4000 * b)) for b in (0.25, 0.5, 1.0) for s in (0, 1)]
    c = report(pts, None, GRID)["claim"]
    assert c["rises"] is False and not c["smallest"]
    assert "improves test MSE by" in c["statement"]


def test_points_of_two_metrics_are_refused():
    with pytest.raises(DataError, match="mixed metrics"):
        report(rising() + falling_mse(), None, GRID)


def test_claim_refuses_a_ratio_when_width_does_not_matter():
    pts = [point("uniform", b, s, 0.70 + 0.0003 * b + 0.001 * s, int(4000 * b)) for b in (0.25, 0.5, 1.0)
           for s in (0, 1)]
    pts += [point("mde", 0.25, s, 0.71, 1000) for s in (0, 1)]
    c = claim(aggregate(pts)[0])
    assert c.rises is False and not c.smallest
    assert c.statement.startswith("width does not matter on this data")


def test_two_budgets_of_one_width_are_one_width_to_the_claim():
    # A merge's budgets 0.125 and 0.25 at one width: the rise between them was claimed as width's
    # ("uniform improves with width ... 0.1000 better than the narrowest").
    pts = [point("uniform", 0.125, s, 0.50, 1000) for s in (0, 1)]
    pts += [point("uniform", 0.25, s, 0.60, 1000) for s in (0, 1)]
    pts += [point("uniform", 1.0, s, 0.599, 4000) for s in (0, 1)]
    c = claim(aggregate(pts)[0])
    assert c.rises is False and "improves test AUC by 0.0000 at most" in c.statement, c.statement
    # Those two budgets alone are one width: nothing to tell width's effect from.
    assert claim(aggregate(pts[:4])[0]).rises is None


def test_a_width_that_does_worse_is_said_beside_width_does_not_matter():
    pts = [mse_point("uniform", 0.25, s, 0.80, 1000) for s in (0, 1)]
    pts += [mse_point("uniform", 1.0, s, 0.85, 4000) for s in (0, 1)]
    c = claim(aggregate(pts)[0], metric="mse", lower_is_better=True)
    # The narrowest is the best: "improves test MSE by -0.0000 at most" was the negative zero.
    assert c.rises is False and "improves test MSE by 0.0000 at most" in c.statement, c.statement
    assert "(wider is worse here: 0.0500 below the best at " in c.statement, c.statement


def test_a_noisy_rise_within_the_seed_std_is_no_rise():
    # The widest uniform is 0.004 better, but its seeds spread by 0.007: no claim.
    pts = [point("uniform", 0.25, s, 0.70, 1000) for s in (0, 1)]
    pts += [point("uniform", 1.0, 0, 0.699, 4000), point("uniform", 1.0, 1, 0.709, 4000)]
    assert claim(aggregate(pts)[0]).rises is False
    # Nor within the narrowest's: steady at the widest, 0.05 apart at the narrowest, 0.002 better
    # on average; a method at the narrowest was claimed 4x smaller on this noise.
    pts = [point("uniform", 0.25, s, v, 1000) for s, v in enumerate((0.55, 0.65, 0.60))]
    pts += [point("uniform", 1.0, s, v, 4000) for s, v in enumerate((0.6019, 0.6020, 0.6021))]
    pts += [point("mde", 0.25, s, v, 1000) for s, v in enumerate((0.55, 0.66, 0.60))]
    noisy = claim(aggregate(pts)[0])
    assert noisy.rises is False and not noisy.smallest and "within the tolerance 0.0500" in noisy.statement


def test_one_uniform_width_gives_no_claim():
    c = claim(aggregate([point("uniform", 0.5, 0, 0.7, 2000), point("mde", 0.5, 0, 0.8, 2000)])[0])
    assert c.rises is None and "two or more widths" in c.statement


def test_planted_comparison_widths_and_distance_to_bayes():
    pts = [point("uniform", 0.5, s, 0.80 + 0.01 * s, 2000, {"C1": 8, "C2": 8}) for s in (0, 1)]
    pts += [point("mde", 0.5, 0, 0.84, 2000, {"C1": 16, "C2": 4}),
            point("mde", 0.5, 1, 0.84, 2000, {"C1": 12, "C2": 4})]
    planted = {"bayes_auc": {"train": 0.9, "valid": 0.88, "test": 0.87},
               "ranks": {"C1": {"rank": 16, "blocks": []}, "C2": {"rank": 3, "blocks": []}}}
    truth = PlantedTruth.of_dataset(planted)
    comparison = planted_comparison(aggregate(pts)[0], truth, [2, 8, 16, 24, 32])
    assert comparison["ranks"] == {"C1": 16, "C2": 3}
    mde = next(c for c in comparison["configs"] if c["method"] == "mde")
    assert mde["widths"] == {"C1": 14, "C2": 4}  # mean over seeds
    # On the grid 2, 8, 16, 24, 32 rank 16 sits at 16 and rank 3 at 8: 14 (-> 16) and 4 (-> 8) are
    # both at their table's step; uniform's 8 is one step below 16 and at 3's step.
    assert mde["within_one_step"] == 1.0
    # On 2, 4, 8, 12, 16 uniform's 8 is two steps below 16 (a miss) and one above 3's 4.
    finer = planted_comparison(aggregate(pts)[0], truth, [2, 4, 8, 12, 16])["configs"]
    assert next(c for c in finer if c["method"] == "uniform")["within_one_step"] == 0.5
    assert mde["distance_to_bayes"] == pytest.approx(0.03)
    uniform = next(c for c in comparison["configs"] if c["method"] == "uniform")
    assert uniform["distance_to_bayes"] == pytest.approx(0.87 - 0.805)
    with pytest.raises(DataError, match="bayes_auc.test"):
        PlantedTruth.of_dataset({"bayes_auc": {}, "ranks": {}})


def test_rank_correlation_says_whether_widths_follow_the_ranks():
    ranks = {"C1": 2, "C2": 4, "C3": 4, "C4": 16}
    assert rank_correlation({"C1": 4, "C2": 8, "C3": 8, "C4": 32}, ranks) == pytest.approx(1.0)
    assert rank_correlation({"C1": 32, "C2": 8, "C3": 8, "C4": 4}, ranks) == pytest.approx(-1.0)
    # Tied widths share their mean position: widths 32, 8, 8, 4 rank 4, 2.5, 2.5, 1 against planted
    # 1, 2, 3, 4; deviations (1.5, 0, 0, -1.5) and (-1.5, -0.5, 0.5, 1.5): rho = -4.5 / sqrt(4.5 * 5).
    swapped = rank_correlation({"C1": 32, "C2": 8, "C3": 8, "C4": 4}, {"C1": 2, "C2": 4, "C3": 8, "C4": 16})
    assert swapped == pytest.approx(-0.9486832980505138)
    # One width everywhere follows nothing, however many tables it lands near.
    assert rank_correlation({"C1": 8, "C2": 8, "C3": 8, "C4": 8}, ranks) is None
    assert rank_correlation({"C1": 8, "C2": None, "C3": None, "C4": None}, ranks) is None
    pts = [point("uniform", 0.5, s, 0.80, 2000, {"C1": 8, "C2": 8}) for s in (0, 1)]
    pts += [point("mde", 0.5, s, 0.84, 2000, {"C1": 16, "C2": 4}) for s in (0, 1)]
    truth = PlantedTruth.of_dataset({"bayes_auc": {"test": 0.87},
                                     "ranks": {"C1": {"rank": 16, "blocks": []}, "C2": {"rank": 3, "blocks": []}}})
    rep = report(pts, truth, GRID)
    text = markdown(rep, "t")
    assert "| mde | 0.5 | 0.0300 | 100% | +1.00 | 16 | 4 |" in text
    assert "| uniform | 0.5 | 0.0700 | 100% | — | 8 | 8 |" in text


def test_the_best_plan_of_each_method_at_twice_the_planted_parameters():
    # Planted: 10 rows at rank 8 and 90 at rank 2, each block with its map into a latent space of 8:
    # (10 + 8) * 8 + (90 + 8) * 2 = 340 parameters; twice that is 680, which holds the 2000-byte
    # (500-parameter) configs and not the 4000-byte ones.
    planted = {"bayes_auc": {"test": 0.8}, "latent_dim": 8,
               "ranks": {"C1": {"rank": 8, "blocks": [{"start": 0, "end": 10, "rank": 8},
                                                       {"start": 10, "end": 100, "rank": 2}]}}}
    truth = PlantedTruth.of_dataset(planted)
    assert truth.params == 340
    pts = rising() + [point("mlet", 1.0, s, 0.79, 4000) for s in (0, 1)]
    rep = report(pts, truth, GRID)
    at = rep["planted"]["at_twice_params"]
    assert rep["planted"]["params"] == 340
    assert at["mde"]["budget"] == 0.5 and at["mde"]["distance_to_bayes"] == pytest.approx(0.8 - 0.7795)
    assert at["uniform"]["budget"] == 0.5 and at["mlet"] is None
    text = markdown(rep, "t")
    assert "Planted parameters: 340 (the generator's: each popularity block's rows and its map" in text
    assert "mde at budget 0.5 (500 parameters) 0.7795, 0.0205 below" in text
    # mlet ran only at budget 1 (1000 parameters): budgets up to 680 / 1000 would hold it.
    assert "No plan that small for mlet (that small is a budget of at most 0.68 of this base model)." in text
    # A merge keeps the count, and with an earlier report that does not record it, takes it from the one that does.
    old = sweep_report_of(rising()[:1], ["uniform"], planted)
    del old["planted"]["params"], old["planted"]["at_twice_params"]
    mde = [p for p in rising() if p["method"] == "mde"]
    merged = merge_reports({"a": old, "b": sweep_report_of(mde, ["mde"], planted)})
    assert merged["planted"]["params"] == 340
    other = sweep_report_of(rising()[:1], ["uniform"], planted)
    other["planted"]["params"] = 300
    with pytest.raises(DataError, match=r"different planted parameter counts \[300, 340\]"):
        merge_reports({"a": other, "b": sweep_report_of(mde, ["mde"], planted)})
    # Blocks not recorded: no count, and no section.
    bare = {"bayes_auc": {"test": 0.8}, "ranks": {"C1": {"rank": 6, "blocks": []}}}
    assert "params" not in report(rising(), PlantedTruth.of_dataset(bare), GRID)["planted"]


def test_report_files(tmp_path):
    planted = {"bayes_auc": {"test": 0.8}, "ranks": {"C1": {"rank": 6, "blocks": []}}}
    rep = report(rising(), PlantedTruth.of_dataset(planted), GRID)
    paths = write_report(rep, "tiny", tmp_path, "tiny")
    assert [p.name for p in paths] == ["sweep-tiny.json", "sweep-tiny.md", "sweep-tiny.png"]
    assert json.loads(paths[0].read_text())["claim"]["rises"] is True
    text = paths[1].read_text()
    assert "| mde | 0.5 | 2,000 | 0.7795 ± 0.0003 | 2 |" in text and "planted rank | | | | | 6 |" in text
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*partial*"))
    assert markdown(rep, "t").count("\n| uniform |") == 6  # the frontier and the planted table


def test_report_says_which_configs_were_still_rising_when_training_stopped():
    pts = rising()
    for p, selected in zip(pts, [100, 100, 60, 100, 100, 100, 100, 100, 100, 100], strict=True):
        p.update(steps=100, selected_step=selected)  # uniform at 1.0 peaked early for seed 0 only
    configs, _ = aggregate(pts)
    assert {(c.method, c.budget): c.at_last_step for c in configs}[("uniform", 1.0)] == 1
    assert aggregate(rising())[0][0].at_last_step is None  # points that do not record their steps
    rep = report(pts, None, GRID)
    best_valid = markdown({**rep, "config": {"train": {"report_at": "best_valid"}}}, "t")
    assert "| uniform | 1 | 4,000 | 0.7800 ± 0.0003 | 2 | 1 of 2 |" in best_valid
    assert "| mde | 0.5 | 2,000 | 0.7795 ± 0.0003 | 2 | 2 of 2 |" in best_valid
    assert "'still rising'" in best_valid
    # Reported at the last step by config: every run is, so the column would say nothing.
    last = markdown({**rep, "config": {"train": {"report_at": "last"}}}, "t")
    assert "still rising" not in last and "| uniform | 1 | 4,000 | 0.7800 ± 0.0003 | 2 |\n" in last
    assert "still rising" not in markdown({**rep, "config": None}, "t")  # merged unchecked: config unknown
    old = markdown({**report(rising(), None, GRID), "config": {"train": {"report_at": "best_valid"}}}, "t")
    assert "still rising" not in old  # points written before they recorded their steps


def test_parse_methods_and_budgets():
    assert parse_methods("uniform, mde+mlet") == ["uniform", "mde+mlet"]
    with pytest.raises(ConfigError, match="unknown method 'mdx'"):
        parse_methods("uniform,mdx")
    with pytest.raises(ConfigError, match="--budgets: empty"):
        parse_budgets(" , ")
    with pytest.raises(ConfigError, match="outside"):
        parse_budgets("0.5,1.5")
    assert parse_budgets("1,0.25") == [0.25, 1.0]
    # One trial folder for both (runs/uniform-b0.5-s0): the second resumed the first's checkpoint.
    with pytest.raises(ConfigError, match=r"--budgets: a budget is named twice in 0.5,0.5"):
        parse_budgets("0.5,0.50000000001")


def test_a_configs_sweep_section_is_validated_naming_the_key(tmp_path):
    cfg = load_job_config(REPO / "configs" / "papers" / "mde-mf-movielens.yaml")
    assert cfg.sweep.methods == ["uniform", "mde", "mlet"] and cfg.sweep.seeds == 3
    assert cfg.sweep.budgets == sorted(cfg.sweep.budgets) and cfg.sweep.budgets[-1] == 1
    assert cfg.model.arch == "mf" and cfg.embeddings.mde.mode == "within"
    assert JobConfig().sweep.methods == ["uniform", "mde"]  # a config without the section
    for override, expected in (("sweep.methods=[uniform,mdx]", "sweep.methods: unknown method 'mdx'"),
                               ("sweep.budgets=[0.5,2]", "sweep.budgets: 2 is outside (0, 1]"),
                               ("sweep.budgets=[]", "sweep.budgets: empty"),
                               ("sweep.seeds=0", "sweep.seeds: must be >= 1"),
                               ("sweep.seed=2", "sweep.seed: unknown field")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_job_config(REPO / "configs" / "default.yaml", [override])


def test_sweep_flags_default_to_the_config_and_override_it(tmp_path, monkeypatch):
    from embshard.cluster import sweep_cli

    seen = []
    monkeypatch.setattr(sweep_cli, "check_trials", lambda cfg, spec, data: seen.append(spec) or _stop())
    data = tmp_path / "data"
    from embshard.datasets.synth import synthesize

    synthesize(data, rows=200, seed=0, max_cardinality=50)
    base = ["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}",
            "--set", "sweep.methods=[uniform,mlet]", "--set", "sweep.budgets=[0.5,1]", "--set", "sweep.seeds=2"]
    assert main(base) == 2
    assert main([*base, "--methods", "mde", "--seeds", "1"]) == 2
    assert main([*base, "--seeds", "1", "--first-seed", "2"]) == 2
    varied = [*base, "--set", "sweep.vary={embeddings.mlet.ratio: [4, 8]}"]
    assert main(varied) == 2
    assert main([*varied, "--methods", "mde", "--vary", "embeddings.mde.alpha=0.5,1",
                 "--vary", "embeddings.mde.blocks=2"]) == 2
    assert seen == [SweepSpec(["uniform", "mlet"], [0.5, 1.0], 2), SweepSpec(["mde"], [0.5, 1.0], 1),
                    SweepSpec(["uniform", "mlet"], [0.5, 1.0], 1, first_seed=2),
                    SweepSpec(["uniform", "mlet"], [0.5, 1.0], 2, vary={"embeddings.mlet.ratio": [4, 8]}),
                    SweepSpec(["mde"], [0.5, 1.0], 2,
                              vary={"embeddings.mde.alpha": [0.5, 1], "embeddings.mde.blocks": [2]})]


def _stop():
    raise ConfigError("stopped before Ray")


def test_a_sweep_of_more_trials_than_a_cluster_runs_is_refused_before_they_are_listed(tmp_path, capsys):
    # --seeds 1000000000 listed its trials until the driver ran out of memory.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'nothing'}\n")
    assert main(["sweep", str(cfg), "--methods", "uniform,pep", "--budgets", "0.5,1", "--seeds", "1000000000"]) == 2
    assert ("a sweep of 3,000,000,000 trials (2 method(s), 2 budget(s), 1,000,000,000 seed(s)); one sweep runs "
            "at most 10,000") in capsys.readouterr().err
    # A method's knob multiplies only its own trials; pep holds every budget in one trial.
    at_most = SweepSpec(["uniform", "mde", "pep"], [0.25, 0.5], 1000, vary={"embeddings.mde.alpha": [0.2, 0.4, 0.6]})
    assert len(at_most.trials()) == 2 * 1000 + 3 * 2 * 1000 + 1000 == 9000
    with pytest.raises(ConfigError, match="13,200 trials.*embeddings.mde.alpha 4"):
        SweepSpec(["uniform", "mde", "pep"], [0.25, 0.5], 1200, vary={"embeddings.mde.alpha": [0.2, 0.4, 0.6, 0.8]})


def test_trials_and_budget_knobs(tmp_path):
    spec = SweepSpec(["uniform", "pep"], [0.25, 1.0], 2)
    assert [t.key for t in spec.trials()] == ["uniform-b0.25-s0", "uniform-b1-s0", "uniform-b0.25-s1",
                                              "uniform-b1-s1", "pep-s0", "pep-s1"]
    # A later seed on its own: the same trials as in the full sweep, so the two merge.
    later = SweepSpec(["uniform", "pep"], [0.25, 1.0], 1, first_seed=1)
    assert [t.key for t in later.trials()] == ["uniform-b0.25-s1", "uniform-b1-s1", "pep-s1"]
    # A sweep folder saved before --first-seed existed records no first_seed and still resumes.
    assert spec.to_json() == {"methods": ["uniform", "pep"], "budgets": [0.25, 1.0], "seeds": 2}
    assert later.to_json()["first_seed"] == 1
    emb = EmbeddingsConfig(dim=16)
    assert [uniform_width(emb, b) for b in (0.125, 0.25, 0.3, 1.0)] == [4, 4, 4, 16]
    data = DatasetSpec(name="t", dense=[], sparse=[SparseFeature("C1", 100), SparseFeature("C2", 50)])
    trial = SweepSpec(["mde+mlet"], [0.5], 1).trials()[0]
    # A config's plan file is one method's at one budget: each trial plans its own (every trial
    # was refused as made for another config, and recorded as a budget its method cannot meet).
    cfg, _ = TrialRuns(JobConfig(sharding=ShardingConfig(plan_file="plan/plan.json")), data, trial, [0.5],
                       tmp_path).first_run()
    assert cfg.sharding.plan_file is None
    assert cfg.embeddings.policy == "mde" and cfg.embeddings.mde.budget_params == 150 * 16 // 2
    assert cfg.embeddings.mlet is not None and cfg.embeddings.mlet.ratio == 4
    assert cfg.train.test and cfg.output_dir == str(tmp_path / "train")


def test_vary_runs_each_method_that_reads_the_knob_at_every_value(tmp_path):
    spec = SweepSpec(["uniform", "mde", "mde+mlet"], [0.25], 1,
                     vary=parse_vary(["embeddings.mde.alpha=0.3,1.0", "embeddings.mlet.ratio=[4, 8]"]))
    assert [t.key for t in spec.trials()] == [
        "uniform-b0.25-s0", "mde-b0.25-s0-mde.alpha=0.3", "mde-b0.25-s0-mde.alpha=1",
        "mde+mlet-b0.25-s0-mde.alpha=0.3-mlet.ratio=4", "mde+mlet-b0.25-s0-mde.alpha=0.3-mlet.ratio=8",
        "mde+mlet-b0.25-s0-mde.alpha=1-mlet.ratio=4", "mde+mlet-b0.25-s0-mde.alpha=1-mlet.ratio=8"]
    assert spec.to_json()["vary"] == {"embeddings.mde.alpha": [0.3, 1.0], "embeddings.mlet.ratio": [4, 8]}
    assert "vary" not in SweepSpec(["mde"], [0.25], 1).to_json()  # a sweep folder from before --vary resumes
    # Values that hold commas come as a YAML list.
    assert parse_vary(["autodim.candidates=[[2, 8, 32], [4, 16, 32]]"]) == {
        "autodim.candidates": [[2, 8, 32], [4, 16, 32]]}
    # Not YAML as a whole, each value is (it was a traceback); a value that is not either, one line.
    assert parse_vary(["model.dense_arch=[32],[16]"]) == {"model.dense_arch": [[32], [16]]}
    assert parse_vary(["model.dense_arch=[64,32],[32,16]"]) == {"model.dense_arch": [[64, 32], [32, 16]]}
    with pytest.raises(ConfigError, match=r"^--vary train\.epochs=\[1:1:3: not valid YAML \("):
        parse_vary(["train.epochs=[1"])
    # What Tune hands a trial and what the trial trains: the knob set over the sweep's config.
    trials = [Trial.from_json(json.loads(json.dumps(t.to_json()))) for t in spec.trials()]
    assert trials == spec.trials()
    assert Trial.from_json({"method": "mde", "seed": 0, "budget": 0.5}) == Trial("mde", 0, 0.5)  # pre-vary trial
    data = DatasetSpec(name="t", dense=[], sparse=[SparseFeature("C1", 100), SparseFeature("C2", 50)])
    cfg = JobConfig()
    alphas = [TrialRuns(with_knobs(cfg, t.knobs), data, t, [0.25], tmp_path).first_run()[0].embeddings.mde.alpha
              for t in trials[1:3]]
    assert alphas == [0.3, 1.0]
    assert with_knobs(cfg, trials[4].knobs).embeddings.mlet.ratio == 8  # from the sweep's MLET default
    assert with_knobs(cfg, (("pep.s_init", -5.0),)).pep.s_init == -5.0  # an unset section is created
    with pytest.raises(ConfigError, match=re.escape("--vary embeddings.mde.alpha: must be in [0, 1], got 2.0")):
        with_knobs(cfg, (("embeddings.mde.alpha", 2.0),))
    # Each setting a curve of its own in the sweep's report, named by its knob.
    points = [{**point(t.method, 0.25, 0, value, 1000), "knobs": method_knobs(with_knobs(cfg, t.knobs), t.method)}
              for t, value in ((trials[0], 0.70), (trials[1], 0.71), (trials[2], 0.72))]
    configs = report(with_variants(points), None, GRID)["configs"]
    assert {c["method"]: c["mean"] for c in configs} == {
        "uniform": 0.70, "mde (mde.alpha=0.3)": 0.71, "mde (mde.alpha=1)": 0.72}


def test_a_varied_setting_runs_every_method_at_each_value_and_reports_each_apart(tmp_path):
    spec = SweepSpec(["uniform", "mde"], [0.25], 1,
                     vary=parse_vary(["model.options.l2=0,0.03", "embeddings.mde.alpha=0.3,1.0"]))
    assert [t.key for t in spec.trials()] == [
        "uniform-b0.25-s0-model.options.l2=0", "uniform-b0.25-s0-model.options.l2=0.03",
        "mde-b0.25-s0-model.options.l2=0-mde.alpha=0.3", "mde-b0.25-s0-model.options.l2=0-mde.alpha=1",
        "mde-b0.25-s0-model.options.l2=0.03-mde.alpha=0.3", "mde-b0.25-s0-model.options.l2=0.03-mde.alpha=1"]
    trials = spec.trials()
    assert [t.settings for t in trials[:2]] == [(("model.options.l2", 0),), (("model.options.l2", 0.03),)]
    assert with_knobs(JobConfig(), trials[5].knobs).model.options["l2"] == 0.03  # what the trial trains
    # Points as the trials tag them: each setting's are one report, its knobs' curves within it.
    points = [{**point(t.method, 0.25, 0, 0.70 + i / 100, 1000), "setting": dict(t.settings),
               "knobs": method_knobs(with_knobs(JobConfig(), t.knobs), t.method)} for i, t in enumerate(trials)]
    assert spec.settings() == [(("model.options.l2", 0),), (("model.options.l2", 0.03),)]
    groups = by_setting(points[::-1], spec.settings())  # a resumed sweep's trials come back in another order
    assert [setting for setting, _ in groups] == spec.settings()
    assert [setting_label(setting) for setting, _ in groups] == ["model.options.l2=0", "model.options.l2=0.03"]
    configs = report(with_variants(groups[1][1][::-1]), None, GRID)["configs"]
    assert {c["method"]: c["mean"] for c in configs} == {
        "uniform": 0.71, "mde (mde.alpha=0.3)": 0.74, "mde (mde.alpha=1)": 0.75}
    assert SweepSpec(["mde"], [0.25], 1, vary={"embeddings.mde.alpha": [0.3, 1.0]}).settings() == [()]
    assert by_setting(rising(), [()]) == [((), rising())]  # a sweep that varies no setting: one report


def test_a_sweep_of_settings_writes_a_report_per_setting_each_mergeable(tmp_path, monkeypatch, capsys):
    """The sweep verb's reporting after its trials (its Ray part is tests/test_sweep_ray.py):
    the trials' points as `run_sweep` returns them, tagged by `trial_points`."""
    from embshard.cluster import sweep_run
    from embshard.datasets.synth import synthesize

    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(data, rows=200, seed=0, max_cardinality=50)
    epochs = {1: (0.70, 0.78), 2: (0.72, 0.78)}  # uniform at 0.5, 1: the narrow one catches up at 2 epochs

    def ran(cfg, spec, folder, resume, parallel, data_sha, data_id):
        folder.mkdir()
        (folder / "sweep-spec.json").write_text(json.dumps(spec.to_json()))  # as run_sweep claims its folder
        return [{**point("uniform", b, 0, epochs[t.settings[0][1]][i], 2000 * (i + 1)), "knobs": {},
                 "setting": dict(t.settings)} for t in spec.trials() for i, b in enumerate([0.5, 1.0]) if t.budget == b]

    monkeypatch.setattr(sweep_run, "run_sweep", ran)
    args = ["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}", "--methods", "uniform",
            "--budgets", "0.5,1", "--seeds", "1", "--vary", "train.epochs=1,2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train.epochs=1: claim: uniform improves with width" in printed
    assert "train.epochs=2: claim: uniform improves with width" in printed
    assert sorted(p.name for p in out.iterdir()) == ["settings.md", "sweep-spec.json", "train.epochs=1",
                                                     "train.epochs=2"]
    side_by_side = (out / "settings.md").read_text()
    assert f"settings side by side: {out / 'settings.md'}" in printed
    assert ("| [train.epochs=2](<train.epochs=2/sweep-data.md>) | uniform | AUC 0.7800 ± 0.0000 (1) | budget 1, no "
            "fewer bytes than uniform |") in side_by_side
    assert "- train.epochs=1: uniform improves with width (best test AUC 0.7800 at budget 1" in side_by_side
    reps = {n: json.loads((out / n / "sweep-data.json").read_text()) for n in ("train.epochs=1", "train.epochs=2")}
    assert reps["train.epochs=2"]["config"]["train"]["epochs"] == 2  # as a sweep with --set train.epochs=2
    assert reps["train.epochs=2"]["sweep"]["setting"] == {"train.epochs": 2}
    assert [p["value"] for p in reps["train.epochs=2"]["points"]] == [0.72, 0.78]
    assert "1 seed(s), train.epochs=2" in (out / "train.epochs=2" / "sweep-data.md").read_text()
    # Each report merges as any sweep's; two settings are not one sweep, and the folder says where they are.
    assert main(["sweep-merge", str(out / "train.epochs=1"), "--out", str(tmp_path / "m")]) == 0
    assert main(["sweep-merge", str(out / "train.epochs=1"), str(out / "train.epochs=2"),
                 "--out", str(tmp_path / "m2")]) == 2
    assert "train.epochs is 2, " in capsys.readouterr().err
    assert main(["sweep-merge", str(out), "--out", str(tmp_path / "m3")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"embshard: error: {out}: a sweep of several settings has a report per setting, in its folders "
        "train.epochs=1, train.epochs=2; name one of them")


@pytest.mark.parametrize("args, expected", [
    (["--vary", "embeddings.mde.alpha"], "--vary 'embeddings.mde.alpha': expected KEY=V1,V2"),
    (["--vary", "train.log_every=1,2"], "--vary train.log_every: not for a sweep to vary"),
    (["--vary", "seed=1,2"], "--vary seed: not for a sweep to vary: each trial sets it"),
    (["--vary", "data.path=a,b"], "--vary data.path: a sweep is of one dataset"),
    (["--vary", "embeddings.mde={alpha: 1}"], "--vary embeddings.mde: a section; vary its keys one by one"),
    # the example is a key a sweep varies (it named embeddings.policy, which each trial sets)
    (["--vary", "embeddings=1,2"], "--vary embeddings: a section; vary its keys one by one (e.g. embeddings.dim)"),
    # A whole section would reset its other keys (and `data` would get past the data.path refusal).
    (["--vary", "train=[{epochs: 2}, {epochs: 3}]"], "--vary train: a section; vary its keys one by one (e.g. train."),
    (["--vary", "data=[{path: a}]"], "--vary data: a section"),
    (["--vary", "cluster.workers=1,2"], "--vary cluster.workers: one for the whole sweep"),
    # Two values one folder name: two trials would share a run folder, two settings a report folder.
    (["--vary", "model.options.l2=0,0.0"], "--vary model.options.l2: expected distinct values, got [0, 0.0]"),
    (["--vary", "model.options.l2=a/b,c"], "--vary model.options.l2: a value with '/' would name a folder"),
    (["--vary", "train.epochz=1,2"], "--vary train.epochz: unknown field"),
    (["--vary", "train.epochs=1,-1"], "--vary train.epochs: must be >= 1"),
    (["--methods", "mde", "--vary", "embeddings.mde.alpha=0.3,2"],
     "--vary embeddings.mde.alpha: must be in [0, 1], got 2.0"),
    (["--methods", "uniform", "--vary", "embeddings.mde.alpha=0.3,1"],
     "--vary embeddings.mde.alpha: read by mde, mde+mlet, none of this sweep's methods"),
    (["--methods", "mde", "--vary", "embeddings.mde.alpha=0.3,0.3"],
     "--vary embeddings.mde.alpha: expected distinct values, got [0.3, 0.3]"),
    (["--methods", "mde", "--vary", "embeddings.mde.budget_params=100,200"],
     "--vary embeddings.mde.budget_params: not for a sweep to vary"),
    (["--methods", "uniform,bogus"], "--methods: unknown method 'bogus'"),
    (["--budgets", ""], "--budgets: empty"),
    (["--seeds", "0"], "--seeds: expected a whole number >= 1"),
    # '\u00b2' passed isdigit(), then int() failed on it: a traceback.
    (["--seeds", "\u00b2"], "--seeds: expected a whole number >= 1, got '\u00b2'"),
    (["--first-seed", "-1"], "--first-seed: must be >= 0"),
])
def test_bad_input_is_one_line(args, expected, capsys):
    code = main(["sweep", str(REPO / "configs" / "default.yaml"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith(f"embshard: error: {expected}")


def test_sweep_folder_is_never_taken_over(tmp_path, capsys):
    from embshard.datasets.synth import synthesize

    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(data, rows=200, seed=0, max_cardinality=50)
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    base = ["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}", "--budgets", "1"]
    assert main([*base, "--out", str(out)]) == 2
    assert "not empty; resume the sweep there with --resume" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "holds no sweep to resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_trial_its_arch_refuses_is_one_line_before_ray_starts(tmp_path, capsys):
    from embshard.datasets.synth import synthesize

    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(data, rows=200, seed=0, max_cardinality=50)
    capsys.readouterr()
    base = ["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}", "--budgets", "1",
            "--out", str(out)]
    for args, expected in (
        (["--vary", "model.options.l2=0,0.1"],  # a setting for mf, given to DLRM
         "model.options.l2: not an option of model.arch 'dlrm' (valid: none)"),
        (["--vary", "model.arch=dlrm,mf"], "model.arch 'mf': dataset 'synth-criteo'"),  # a regression on clicks
    ):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith(f"embshard: error: {expected}"), err
    assert not out.exists()  # refused before the sweep claimed its folder


def test_a_resume_must_be_the_sweep_it_resumes(tmp_path):
    """Tune restores the trials as they were started; a resume that differs would mislabel them
    (this compared values: `0.0` resumed a sweep of `0`, then the report could not place its points)."""
    from embshard.cluster.sweep_run import _claim_folder

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    spec = SweepSpec(["uniform"], [1.0], 1, vary={"model.options.l2": [0, 0.03]})
    out = tmp_path / "out"
    _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    assert json.loads((out / "sweep-spec.json").read_text())["config"]["train"]["epochs"] == 1
    floats = SweepSpec(["uniform"], [1.0], 1, vary={"model.options.l2": [0.0, 0.03]})
    with pytest.raises(ConfigError, match=re.escape('--resume: ' + str(out) + ' is the sweep {"methods": ["uniform"]')):
        _claim_folder(out, out, floats, cfg, resume=True, data_sha="a" * 64)
    other = load_job_config(REPO / "configs" / "default.yaml", ["train.epochs=3", "train.log_every=7"])
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {out} was started with train.epochs = 1, this "
                                                    "command has 3; resume it with the config")):
        _claim_folder(out, out, spec, other, resume=True, data_sha="a" * 64)
    # Other data at data.path (another path, or the path written again): its points were filed as
    # results on the new data, under its hash.
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {out} was started on other data than data.path "
                                                    f"{cfg.data.path} holds now (dataset hash aaaaaaaaaaaa, now "
                                                    "bbbbbbbbbbbb)")):
        _claim_folder(out, out, spec, cfg, resume=True, data_sha="b" * 64)
    # Another data.path that holds the same data: the trials would read the recorded path all the
    # same (a resume put them under the other data, which was then written again, unsaid).
    moved = load_job_config(REPO / "configs" / "default.yaml", [f"data.path={tmp_path / 'elsewhere'}"])
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {out} was started on data.path "
                                                    f"{Path(cfg.data.path).resolve()}, which its trials train on")):
        _claim_folder(out, out, spec, moved, resume=True, data_sha="a" * 64)
    # Keys that change nothing may differ; then, with no Tune state here, it starts afresh.
    quiet = load_job_config(REPO / "configs" / "default.yaml", ["train.log_every=7"])
    assert not _claim_folder(out, out, spec, quiet, resume=True, data_sha="a" * 64)
    # The same content written again (same hash, a new id): its trials' checkpoints hold the
    # earlier writing's ids, and each refused it only once trained again, at every resume.
    again = tmp_path / "again"
    _claim_folder(again, again, spec, cfg, resume=False, data_sha="a" * 64, data_id="1234abcd" * 4)
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {again} was started on data.path {cfg.data.path} as "
                                                    "written before (dataset id 1234abcd, now 99999999): its trials' "
                                                    "checkpoints are of that writing; start the sweep afresh")):
        _claim_folder(again, again, spec, cfg, resume=True, data_sha="a" * 64, data_id="9" * 32)
    assert not _claim_folder(again, again, spec, cfg, resume=True, data_sha="a" * 64, data_id="1234abcd" * 4)
    # Damaged records: each was a traceback (JSONDecodeError, AttributeError) or a loop of resumes.
    saved = (out / "sweep-spec.json").read_text()
    record = json.loads(saved)
    for damaged, why in ((saved[:40], r"not JSON \(Expecting"),
                         # Each was a traceback (ValueError, RecursionError).
                         (saved.replace('"seeds": 1', '"seeds": 1' + "0" * 5000), r"not a file embshard writes "
                                                                                   r"\(ValueError: Exceeds the limit"),
                         ("[" * 100_000 + "]" * 100_000, r"not a file embshard writes \(nested deeper"),
                         # Read as the last of the two, where other JSON readers take the first.
                         (saved.replace('{"methods"', '{"seeds": 3, "methods"'), r"key 'seeds' given twice"),
                         ("[1, 2]", r"not a sweep spec \(expected an object"),
                         ("{}", r"not a sweep spec \(expected an object with methods"),
                         # Each was a TypeError traceback.
                         (json.dumps(record | {"dataset_sha256": 5}), r"not a sweep spec \(expected an object"),
                         (json.dumps(record | {"config": "x"}), r"not a sweep spec \(expected an object")):
        (out / "sweep-spec.json").write_text(damaged)
        with pytest.raises(ConfigError, match=rf"--resume: .*sweep-spec\.json: {why}"):
            _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)
    # A moved or copied sweep: Tune restores its trials with the folder they were started in, so
    # they trained there, and the copy reported another sweep's run.
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    (tmp_path / "copy" / "sweep-spec.json").write_text(saved)
    with pytest.raises(ConfigError, match=re.escape(f"--resume: {tmp_path / 'copy'} is a sweep started at {out} "
                                                    "(moved or copied since); its trials would write there")):
        _claim_folder(tmp_path / "copy", tmp_path / "copy", spec, cfg, resume=True, data_sha="a" * 64)
    (out / "sweep-spec.json").write_text(saved)
    (out / "tune").mkdir()
    (out / "tune" / "experiment_state-2026-12-04.json").write_text('{"trial_data": [')
    (out / "tune" / "tuner.pkl").write_bytes(b"")  # what can_restore looks for
    with pytest.raises(ConfigError, match=r"experiment_state-2026-12-04\.json: Ray Tune's state of the sweep is "
                                          r"damaged"):
        _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)
    # The variant generator's state (a pickle) cut short by a full disk: Tune restored every trial
    # with no config, each failed with "KeyError: 'trial'", and so did every resume after.
    from ray import cloudpickle

    (out / "tune" / "experiment_state-2026-12-04.json").write_text('{"trial_data": []}')
    whole = cloudpickle.dumps({"_total_samples": 2, "_iterators": ["the trials' configs"]})
    (out / "tune" / "basic-variant-state-2026-12-04.json").write_bytes(whole[:-20])
    with pytest.raises(ConfigError, match=r"basic-variant-state-2026-12-04\.json: Ray Tune's state of the sweep is "
                                          r"damaged \(UnpicklingError: pickle data was truncated\); start the sweep"):
        _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)
    (out / "tune" / "basic-variant-state-2026-12-04.json").write_bytes(whole)
    assert _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)  # Tune's state to restore
    # A point of a setting the sweep does not vary is one line, not a KeyError.
    with pytest.raises(DataError, match=re.escape('a point of the setting {"model.options.l2": 0.0}, which this '
                                                  'sweep does not vary')):
        by_setting([{**point("uniform", 1.0, 0, 0.7, 4000), "setting": {"model.options.l2": 0.0}}], spec.settings())


def test_a_sweep_stopped_before_tune_started_resumes_afresh(tmp_path, capsys):
    # Ctrl-C while Ray started left the spec (and a log) and no Tune state: --resume said "holds
    # no sweep to resume", and a rerun without it "not empty": the folder was lost for good.
    from embshard.cluster.sweep_run import _claim_folder

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out, spec = tmp_path / "out", SweepSpec(["uniform"], [1.0], 1)
    assert not _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    (out / "logs").mkdir()
    assert not _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)  # no state: start afresh
    assert capsys.readouterr().err.strip() == (f"note: {out} holds no trial yet (stopped before Ray Tune started); "
                                               "starting it afresh")
    # Stopped as Tune started: its tuner.pkl and no experiment state. Restored, its one trial had
    # no config and failed ("KeyError: 'trial'") at every resume.
    (out / "tune").mkdir()
    (out / "tune" / "tuner.pkl").write_bytes(b"Tune's own pickle")
    assert not _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)
    assert "holds no trial yet" in capsys.readouterr().err
    # Runs there, but no Tune state (a bucket's, synced now and then): trials ran, not to be redone.
    (out / "runs").mkdir()
    with pytest.raises(ConfigError, match="holds no sweep to resume"):
        _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)


def test_a_sweep_stopped_before_every_trial_reported_says_how_to_continue(tmp_path):
    # Ctrl-C: Tune returns its results, the unfinished trials without points; this was a KeyError.
    from ray.tune import Result

    from embshard.cluster.sweep_run import trial_points
    from embshard.errors import Interrupted

    done = Result(metrics={"points": json.dumps([point("uniform", 1.0, 0, 0.7, 4000)])}, checkpoint=None,
                  error=None, path=str(tmp_path / "t0"))
    stopped = Result(metrics={"training_iteration": 0}, checkpoint=None, error=None, path=str(tmp_path / "t1"))
    assert [p["value"] for p in trial_points([done], tmp_path, 1)] == [0.7]
    with pytest.raises(Interrupted, match=rf"stopped with 1 of 2 trials unfinished; the finished ones are kept in "
                                          rf"{tmp_path}: run the same command with --resume to continue"):
        trial_points([done, stopped], tmp_path, 2)
    # Tune's results hold the trials it had started: a third, never started, was not counted.
    with pytest.raises(Interrupted, match=r"stopped with 2 of 3 trials unfinished"):
        trial_points([done, stopped], tmp_path, 3)
    # A trial's error of embshard's names the trial and what --resume does (it said neither).
    from embshard.errors import DataError

    failed = Result(metrics={"config": {"trial": {"method": "mde", "seed": 2, "budget": 0.5}}}, checkpoint=None,
                    error=DataError("data/train: part-00001.parquet is damaged"), path=str(tmp_path / "t2"))
    with pytest.raises(DataError, match=r"^trial mde-b0\.5-s2: data/train: part-00001\.parquet is damaged \(1 "
                                        r"trial\(s\) failed; --resume retries them once it is mended\)$"):
        trial_points([done, failed], tmp_path, 2)


def sweep_report_of(points: list[dict], methods: list[str], planted: dict | None = None, **overrides: str) -> dict:
    """A sweep's JSON as `embshard sweep` writes it, for hand-made points; `overrides`: its job
    config's `--set`s (dots as __)."""
    rep = report(points, PlantedTruth.of_dataset(planted) if planted else None, GRID)
    sets = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    cfg = load_job_config(REPO / "configs" / "default.yaml", sets)
    return {"dataset": "tiny", "dataset_sha256": dataset_sha256({"name": "tiny"}),
            "sweep": {"methods": methods, "budgets": [0.25, 0.5, 1.0], "seeds": 2},
            "config": json.loads(json.dumps(to_dict(cfg))), "points": points, **rep}


def test_merged_sweeps_claim_over_all_their_points():
    uniform = [p for p in rising() if p["method"] == "uniform"]
    mde = [p for p in rising() if p["method"] == "mde"]
    # Apart, the MDE sweep can claim nothing: it has no uniform curve.
    assert report(mde, None, GRID)["claim"]["rises"] is None
    merged = merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": sweep_report_of(mde, ["mde"])})
    assert merged["claim"] == report(rising(), None, GRID)["claim"]
    assert merged["claim"]["smallest"]["mde"]["ratio_vs_uniform"] == 2.0
    assert merged["merged_from"] == {"a": {"methods": ["uniform"], "budgets": [0.25, 0.5, 1.0], "seeds": 2},
                                     "b": {"methods": ["mde"], "budgets": [0.25, 0.5, 1.0], "seeds": 2}}
    assert len(merged["points"]) == len(rising()) and merged["dataset"] == "tiny"
    # A merged report merges again.
    extra = sweep_report_of([point("mlet", 0.25, 0, 0.78, 1000)], ["mlet"])
    again = merge_reports({"ab": merged, "c": extra})
    assert again["claim"]["smallest"]["mlet"]["ratio_vs_uniform"] == 4.0
    assert again["merged_from"]["ab"] == merged["merged_from"]


def test_a_method_measured_again_replaces_its_earlier_points_with_replace():
    # The first sweep's MDE was measured before a fix; the second measured MDE again at budget 0.5,
    # with one seed: with --replace both earlier seeds at 0.5 go, MDE at 0.25 stays.
    first = sweep_report_of(rising(), ["uniform", "mde"])
    again = sweep_report_of([point("mde", 0.5, 0, 0.781, 2000)], ["mde"])
    with pytest.raises(DataError, match="mde at budget 0.5, seed 0 is also in a; .* or pass --replace"):
        merge_reports({"a": first, "b": again})
    merged = merge_reports({"a": first, "b": again}, replace=True)
    mde = sorted((p["budget"], p["value"]) for p in merged["points"] if p["method"] == "mde")
    assert mde == [(0.25, 0.7598), (0.25, 0.7602), (0.5, 0.781)]
    assert sum(p["method"] == "uniform" for p in merged["points"]) == 6  # the rest of the first sweep stays
    assert merged["replaced"] == {"a": ["mde at 0.5"]}
    assert "Replaced by a later sweep (`--replace`): mde at 0.5 of a." in markdown(merged, "t")
    # Only the same knobs replace: MLET at another ratio is another curve, kept beside it.
    k4 = sweep_report_of([point("mlet", 0.5, 0, 0.77, 2000)], ["mlet"])
    k8 = sweep_report_of([point("mlet", 0.5, 0, 0.78, 2000)], ["mlet"], embeddings__mlet="{ratio: 8}")
    both = merge_reports({"a": first, "k4": k4, "k8": k8}, replace=True)
    assert "replaced" not in both and sum(p["method"] == "mlet" for p in both["points"]) == 2
    # Points of unrecorded knobs (a sweep from before they were recorded) give way to a later
    # sweep's of their method and budget.
    unrecorded = {**first, "config": None}
    again8 = sweep_report_of([point("mde", 0.5, 0, 0.781, 2000)], ["mde"], embeddings__mde__blocks="2")
    later = merge_reports({"a": unrecorded, "b": again8}, assume_same_config=True, replace=True)
    assert later["replaced"] == {"a": ["mde at 0.5"]}
    assert sorted(p.get("variant", "") for p in later["points"] if p["method"] == "mde") == \
        ["knobs unrecorded", "knobs unrecorded", "mde.blocks=2"]


def test_a_method_without_knobs_is_one_curve_whether_or_not_its_report_recorded_them():
    # uniform reads no knobs, so a report without a config has nothing unknown about its uniform
    # points: they are one curve with a recorded sweep's, and the claim still finds uniform.
    unrecorded = {**sweep_report_of([p for p in rising() if p["budget"] != 1.0], ["uniform", "mde"]), "config": None}
    recorded = sweep_report_of([p for p in rising() if p["budget"] == 1.0], ["uniform"])
    merged = merge_reports({"a": unrecorded, "b": recorded}, assume_same_config=True)
    assert {curve(p) for p in merged["points"]} == {"uniform", "mde"}
    assert merged["claim"]["rises"] is True


def test_merging_unlike_sweeps_is_refused():
    uniform = sweep_report_of([p for p in rising() if p["method"] == "uniform"], ["uniform"])
    with pytest.raises(DataError, match="uniform at budget 0.25, seed 0 is also in a"):
        merge_reports({"a": uniform, "b": uniform})
    with pytest.raises(DataError, match=r"different datasets \(other, tiny\)"):
        merge_reports({"a": uniform, "b": {**sweep_report_of([], ["mde"]), "dataset": "other"}})
    planted = {"bayes_auc": {"test": 0.8}, "ranks": {"C1": {"rank": 6, "blocks": []}}}
    other = {"bayes_auc": {"test": 0.8}, "ranks": {"C1": {"rank": 12, "blocks": []}}}
    mde = [p for p in rising() if p["method"] == "mde"]
    for a, b in ((planted, other), (planted, None)):
        with pytest.raises(DataError, match="different planted truths"):
            merge_reports({"a": sweep_report_of(rising()[:1], ["uniform"], a), "b": sweep_report_of(mde, ["mde"], b)})
    same = merge_reports({"a": sweep_report_of(rising()[:1], ["uniform"], planted),
                          "b": sweep_report_of(mde, ["mde"], planted)})
    assert same["planted"]["ranks"] == {"C1": 6} and len(same["planted"]["configs"]) == 3
    # Another autodim.candidates (a method's knob): it was "different planted truths ...: not one
    # dataset", which --assume-same-data did not pass. Every point's share is read on the first grid.
    coarse = sweep_report_of(mde, ["mde"], planted)
    coarse["planted"]["grid"] = [2, 4, 8, 16]
    other_grid = merge_reports({"a": sweep_report_of(rising()[:1], ["uniform"], planted), "b": coarse})
    assert other_grid["planted"]["grid"] == sorted(GRID) != [2, 4, 8, 16]


def test_merged_sweeps_must_have_trained_alike():
    uniform = [p for p in rising() if p["method"] == "uniform"]
    mde = [p for p in rising() if p["method"] == "mde"]
    with pytest.raises(DataError, match=r"b: train.epochs is 3, a has 1: the sweeps did not train alike"):
        merge_reports({"a": sweep_report_of(uniform, ["uniform"]),
                       "b": sweep_report_of(mde, ["mde"], train__epochs="3")})
    # Where runs go, how they log and checkpoint: not a difference in what they trained.
    elsewhere = sweep_report_of(mde, ["mde"], output_dir="/elsewhere", train__log_every="7",
                                checkpoint__every_steps="3", data__path="/mnt/copy",
                                # What each trial sets over the config: it was "did not train alike".
                                seed="5", embeddings__policy="mde")
    merged = merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": elsewhere})
    assert merged["configs_checked"] and merged["config"]["output_dir"] == "outputs/default/run"
    # The same folder name holding other data (converted again, say) is another dataset.
    other_data = {**sweep_report_of(mde, ["mde"]), "dataset_sha256": dataset_sha256({"name": "tiny", "rows": 9})}
    with pytest.raises(DataError, match="different data: their datasets' dataset.json differ.*'tiny'"):
        merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": other_data})
    # A report from before sweeps recorded their config merges only when asked, and says so.
    old = {k: v for k, v in sweep_report_of(mde, ["mde"]).items() if k != "config"}
    with pytest.raises(DataError, match="b: the report records no job config.*--assume-same-config"):
        merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": old})
    unchecked = merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": old}, assume_same_config=True)
    assert not unchecked["configs_checked"] and unchecked["claim"]["rises"]
    # ... and a merge of it stays unchecked.
    extra = sweep_report_of([point("mlet", 0.25, 0, 0.78, 1000)], ["mlet"])
    assert not merge_reports({"ab": unchecked, "c": extra})["configs_checked"]


def test_one_dataset_generated_on_two_machines_merges():
    # The same planted data generated elsewhere sums its Bayes AUC in another order: the last
    # digits move (0.8808783942010165 here, ...169 on the machine that ran the first sweep).
    here = {"bayes_auc": {"test": 0.8808783942010165}, "ranks": {"C1": {"rank": 6, "blocks": []}}}
    there = {"bayes_auc": {"test": 0.8808783942010169}, "ranks": {"C1": {"rank": 6, "blocks": []}}}
    assert dataset_sha256({"name": "tiny", "planted": here}) == dataset_sha256({"name": "tiny", "planted": there})
    assert dataset_sha256({"name": "tiny", "planted": here}) != dataset_sha256(
        {"name": "tiny", "planted": {**here, "bayes_auc": {"test": 0.8809}}})
    uniform = [p for p in rising() if p["method"] == "uniform"]
    mde = [p for p in rising() if p["method"] == "mde"]
    merged = merge_reports({"a": sweep_report_of(uniform, ["uniform"], here),
                            "b": sweep_report_of(mde, ["mde"], there)})
    assert merged["planted"]["ranks"] == {"C1": 6} and "datasets_checked" not in merged
    # Reports hashed before the rounding differ for such data: merged only when asked, and marked.
    old = {**sweep_report_of(mde, ["mde"]), "dataset_sha256": "a hash of the last digits"}
    with pytest.raises(DataError, match="different data.*pass --assume-same-data only if you know they are one"):
        merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": old})
    unchecked = merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": old}, assume_same_data=True)
    assert unchecked["datasets_checked"] is False and unchecked["dataset_sha256"] is None
    extra = sweep_report_of([point("mlet", 0.25, 0, 0.78, 1000)], ["mlet"])
    assert merge_reports({"ab": unchecked, "c": extra}, assume_same_data=True)["datasets_checked"] is False
    # A report that records no hash (an unchecked merge's, an old or edited one): merged only when
    # asked, and marked. It was merged unasked, the mark in the JSON alone.
    hashless = {k: v for k, v in sweep_report_of(mde, ["mde"]).items() if k != "dataset_sha256"}
    with pytest.raises(DataError, match=r"^b: the report records no dataset hash .* pass --assume-same-data"):
        merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": hashless})
    merged = merge_reports({"a": sweep_report_of(uniform, ["uniform"]), "b": hashless}, assume_same_data=True)
    assert merged["datasets_checked"] is False
    assert "**Merged unchecked** (`--assume-same-*`): the sweeps' datasets were not compared." in markdown(merged, "t")


def test_a_method_at_other_knobs_is_its_own_curve():
    uniform = sweep_report_of([p for p in rising() if p["method"] == "uniform"], ["uniform"])
    k4 = [point("mlet", 0.25, s, 0.76, 1000) for s in (0, 1)]
    k8 = [point("mlet", 0.25, s, 0.7795, 1000) for s in (0, 1)]
    merged = merge_reports({"a": uniform, "k4": sweep_report_of(k4, ["mlet"]),
                            "k8": sweep_report_of(k8, ["mlet"], embeddings__mlet="{ratio: 8}")})
    # Uniform reads no MLET knob, so a sweep configured for k = 8d is of one config with it.
    assert merged["configs_checked"]
    mlet = {c["method"]: c["mean"] for c in merged["configs"] if c["method"] != "uniform"}
    assert mlet == {"mlet (mlet.ratio=4)": pytest.approx(0.76), "mlet (mlet.ratio=8)": pytest.approx(0.7795)}
    assert merged["claim"]["smallest"]["mlet (mlet.ratio=8)"]["ratio_vs_uniform"] == 4.0
    assert "mlet (mlet.ratio=4)" not in merged["claim"]["smallest"]
    failed = sweep_report_of([{"method": "mlet", "budget": 0.5, "seed": 0, "error": "budget below the floor"}],
                             ["mlet"], embeddings__mlet="{ratio: 8}")
    table = markdown(merge_reports({"a": uniform, "k4": sweep_report_of(k4, ["mlet"]), "k8": failed}), "t")
    assert "| mlet (mlet.ratio=4) | 0.25 | 1,000 | 0.7600" in table
    assert "| mlet (mlet.ratio=8) | 0.5 | — | budget below the floor | seed 0 |" in table
    assert "mlet (mlet.ratio=4): mlet.init_std=0.25, mlet.ratio=4; mlet (mlet.ratio=8): mlet.init_std=0.25, " \
           "mlet.ratio=8." in table
    # Points keep their method; the knobs they were trained with travel with them, so a merge of
    # the merge tells a third setting apart.
    assert {p["method"] for p in merged["points"]} == {"uniform", "mlet"}
    k16 = sweep_report_of([point("mlet", 0.25, 0, 0.77, 1000)], ["mlet"], embeddings__mlet="{width: 16}")
    again = merge_reports({"m": merged, "k16": k16})
    assert sorted(c["method"] for c in again["configs"] if c["method"] != "uniform") == [
        "mlet (mlet.ratio=4)", "mlet (mlet.ratio=8)", "mlet (mlet.width=16)"]
    # A knob of a method a sweep does not run is no difference; a shared key still is.
    mde = sweep_report_of([p for p in rising() if p["method"] == "mde"], ["mde"])
    assert merge_reports({"a": sweep_report_of(uniform["points"], ["uniform"], embeddings__mde__alpha="0.9"),
                          "b": mde})["configs_checked"]
    with pytest.raises(DataError, match="k8: embeddings.dim is 32, a has 16"):
        merge_reports({"a": uniform, "k8": sweep_report_of(k8, ["mlet"], embeddings__dim="32")})
    # The same curve, budget and seed twice is still refused.
    with pytest.raises(DataError, match=r"mlet \(mlet.ratio=8\) at budget 0.25, seed 0 is also in k8"):
        merge_reports({"a": uniform, "k4": sweep_report_of(k4, ["mlet"]),
                       "k8": sweep_report_of(k8, ["mlet"], embeddings__mlet="{ratio: 8}"),
                       "k8b": sweep_report_of(k8, ["mlet"], embeddings__mlet="{ratio: 8}")})


def test_points_of_unknown_knobs_are_not_taken_for_recorded_ones():
    uniform = sweep_report_of([p for p in rising() if p["method"] == "uniform"], ["uniform"])
    old = {k: v for k, v in sweep_report_of([point("mlet", 0.25, 0, 0.76, 1000)], ["mlet"]).items() if k != "config"}
    k8 = sweep_report_of([point("mlet", 0.25, 0, 0.7795, 1000)], ["mlet"], embeddings__mlet="{ratio: 8}")
    merged = merge_reports({"a": uniform, "old": old, "k8": k8}, assume_same_config=True)
    assert {c["method"] for c in merged["configs"]} == {"uniform", "mlet (knobs unrecorded)", "mlet (mlet.ratio=8)"}
    # Alone with its method, a report's unknown knobs name no variant.
    alone = merge_reports({"a": uniform, "old": old}, assume_same_config=True)
    assert {c["method"] for c in alone["configs"]} == {"uniform", "mlet"}
    k4 = sweep_report_of([point("mlet", 0.25, 0, 0.7795, 1000)], ["mlet"])
    merged = merge_reports({"a": uniform, "old": old, "k4": k4}, assume_same_config=True)
    assert {c["method"] for c in merged["configs"]} == {"uniform", "mlet (knobs unrecorded)", "mlet (default knobs)"}


def test_method_knobs_are_what_the_methods_trials_read(tmp_path):
    cfg = load_job_config(REPO / "configs" / "default.yaml",
                          ["embeddings.policy=mde", "embeddings.mde.budget_params=999"])
    assert method_knobs(cfg, "uniform") == {}
    # Defaults filled in (a sweep trains MLET at k = 4d when the config has none); what a trial
    # sets itself (MDE's budget, PEP's targets and paths) is not a knob.
    assert method_knobs(cfg, "mde+mlet") == {"mde.alpha": cfg.embeddings.mde.alpha, "mde.mode": cfg.embeddings.mde.mode,
                                            "mde.blocks": cfg.embeddings.mde.blocks, "mlet.ratio": 4.0,
                                            "mlet.width": None, "mlet.features": None, "mlet.init_std": 0.25}
    assert not {"pep.targets", "pep.out", "pep.retrain_target"} & set(method_knobs(cfg, "pep"))
    assert "autodim.candidates" in method_knobs(cfg, "autodim") and "mlet.ratio" in method_knobs(cfg, "autodim+mlet")


def test_sweep_merge_writes_one_report_and_takes_over_nothing(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    for folder, method in ((a, "uniform"), (b, "mde")):
        folder.mkdir()
        rep = sweep_report_of([p for p in rising() if p["method"] == method], [method])
        (folder / "sweep-tiny.json").write_text(json.dumps(rep))
        (folder / "sweep-spec.json").write_text("{}")  # the spec beside it is not a report
    assert main(["sweep-merge", str(a), str(b / "sweep-tiny.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "claim: uniform improves with width" in printed and "mde at budget 0.5" in printed
    assert sorted(p.name for p in out.iterdir()) == ["sweep-tiny.json", "sweep-tiny.md", "sweep-tiny.png"]
    assert "(2 sweeps merged)" in (out / "sweep-tiny.md").read_text()
    before = (out / "sweep-tiny.json").read_bytes()
    for args, expected in (
        ([str(a), str(b), "--out", str(out)], f"--out {out}: not empty; pass --overwrite"),
        ([str(a), str(b), "--out", str(a), "--overwrite"], f"--out {a}: holds one of the reports merged"),
        ([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "x")], f"{tmp_path / 'nope'}: no such sweep"),
        ([str(a), str(tmp_path), "--out", str(tmp_path / "x")],
         f"{tmp_path}: expected one sweep-<dataset>.json in the folder, found none"),
    ):
        assert main(["sweep-merge", *args]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and err.startswith(f"embshard: error: {expected}"), err
    assert (out / "sweep-tiny.json").read_bytes() == before
    assert main(["sweep-merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0


def test_sweep_merge_refuses_what_is_no_report_of_points_or_no_merge_of_its_own(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, method in ((a, "uniform"), (b, "mde")):
        folder.mkdir()
        rep = sweep_report_of([p for p in rising() if p["method"] == method], [method])
        (folder / "sweep-tiny.json").write_text(json.dumps(rep))
        (folder / "sweep-spec.json").write_text("{}")
    own = (b / "sweep-tiny.json").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    good = json.loads(own)
    cases = [
        # Each was a traceback (KeyError, TypeError, AttributeError) or a claim of negative bytes.
        ({**good, "points": [{"foo": 1}]}, r"points\[0\]\.method: None"),
        ({**good, "points": "abc"}, r"it has no dataset or points"),
        ({**good, "points": [{**good["points"][0], "value": float("nan")}]}, r"points\[0\]\.value: nan"),
        ({**good, "points": [{**good["points"][0], "serving_bytes": -5}]}, r"points\[0\]\.serving_bytes: -5"),
        ({**good, "points": [{**good["points"][0], "budget": -3}]}, r"points\[0\]\.budget: -3"),
        # Values no sweep writes, edited in: a budget above the base model, an AUC of 5, a negative MSE.
        ({**good, "points": [{**good["points"][0], "budget": 7}]}, r"points\[0\]\.budget: 7"),
        ({**good, "points": [{**good["points"][0], "value": 5.0}]}, r"points\[0\]\.value: 5\.0"),
        ({**good, "points": [{**good["points"][0], "metric": "mse", "value": -0.1}]}, r"points\[0\]\.value: -0\.1"),
        # Fields besides: a TypeError in the merge, or a size not positive taken as measured.
        ({**good, "points": [{**good["points"][0], "knobs": 3}]}, r"points\[0\]\.knobs: 3"),
        ({**good, "points": [{**good["points"][0], "widths": 7}]}, r"points\[0\]\.widths: 7"),
        ({**good, "points": [{**good["points"][0], "widths": {"C1": "x"}}]}, r"points\[0\]\.widths: \{'C1': 'x'\}"),
        ({**good, "points": [{**good["points"][0], "serving_params": -3}]}, r"points\[0\]\.serving_params: -3"),
        # Missing, or too large for a number: KeyError and OverflowError tracebacks.
        ({**good, "points": [{k: v for k, v in good["points"][0].items() if k != "serving_params"}]},
         r"points\[0\]\.serving_params: None"),
        ({**good, "points": [{k: v for k, v in good["points"][0].items() if k != "widths"}]},
         r"points\[0\]\.widths: None"),
        ({**good, "points": [{**good["points"][0], "serving_bytes": 10**400}]}, r"points\[0\]\.serving_bytes: 10+"),
        ({**good, "config": {**good["config"], "train": 5}}, r"config: \{.*'train': 5.*\}"),
        ({**good, "planted": {"ranks": {"C1": 4}, "grid": ["a"], "bayes_auc": 0.8}}, r"planted: \{.*\}"),
        ({**good, "planted": {"ranks": {"C1": 4}, "grid": [4], "bayes_auc": 0.8, "params": [1]}}, r"planted: \{.*\}"),
        # The report's own fields: TypeErrors, and a dataset name that became a path of the output.
        ({**good, "dataset_sha256": [1]}, r"dataset_sha256: \[1\]"),
        ({**good, "planted": 5}, r"planted: 5"),
        # None to compare: a ZeroDivisionError, and an empty grid put every width "at rank".
        ({**good, "planted": {"ranks": {}, "grid": [4], "bayes_auc": 0.8}}, r"planted: \{.*\}"),
        ({**good, "planted": {"ranks": {"C1": 4}, "grid": [], "bayes_auc": 0.8}}, r"planted: \{.*\}"),
        ({**good, "dataset": "../../evil"}, r"dataset: '\.\./\.\./evil'"),
    ]
    for rep, message in cases:
        (bad / "sweep-tiny.json").write_text(json.dumps(rep))
        assert main(["sweep-merge", str(a), str(bad), "--out", str(tmp_path / "m")]) == 2
        assert re.search(rf"bad/sweep-tiny\.json: not a sweep report \({message}\)", capsys.readouterr().err)
    # A value given twice was merged as Python reads it (the last); nesting deeper than the parser
    # follows was a RecursionError traceback.
    first = json.dumps(good).replace('"points": [{', '"points": [{"value": 0.99, ', 1)
    for text, said in ((first, r"key 'value' given twice in one object"),
                       ("[" * 100_000 + "]" * 100_000, r"not a file embshard writes \(nested deeper")):
        (bad / "sweep-tiny.json").write_text(text)
        assert main(["sweep-merge", str(a), str(bad), "--out", str(tmp_path / "m")]) == 2
        assert re.search(rf"bad/sweep-tiny\.json: {said}", capsys.readouterr().err)
    # A folder whose spec is damaged, and an --out no report can go to: each was a traceback, or a
    # bare "File exists".
    (bad / "sweep-tiny.json").unlink()
    for damaged in ("{", "[1, 2]"):
        (bad / "sweep-spec.json").write_text(damaged)
        assert main(["sweep-merge", str(a), str(bad), "--out", str(tmp_path / "m")]) == 2
        assert re.search(r"bad/sweep-spec\.json: not (JSON|a sweep spec)", capsys.readouterr().err)
    (tmp_path / "file").write_text("mine")
    for out, said in ((tmp_path / "file", "a file, not a folder"), (Path("/proc/embshard-m"), "cannot be made")):
        assert main(["sweep-merge", str(a), str(b), "--out", str(out)]) == 2
        assert f"--out {out}: {said}" in capsys.readouterr().err
    # A budget a trial could not train is a point of its own kind, and merges.
    pep_at_1 = {"method": "pep", "budget": 1.0, "seed": 0, "error": "PEP prunes below the base model"}
    (bad / "sweep-tiny.json").write_text(json.dumps({**good, "points": [*good["points"], pep_at_1]}))
    assert main(["sweep-merge", str(a), str(bad), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    # The same report twice, by two names: it was merged as one, or refused as an overlap.
    assert main(["sweep-merge", str(a), str(a / "sweep-tiny.json"), "--out", str(tmp_path / "m")]) == 2
    assert f"{a} and {a / 'sweep-tiny.json'}: the same report ({a / 'sweep-tiny.json'})" in capsys.readouterr().err
    # --overwrite replaced a sweep's own report with a merge, which later merges read as that sweep's.
    assert main(["sweep-merge", str(a), "--out", str(b), "--overwrite"]) == 2
    assert f"--out {b}: holds sweep-spec.json, which no merge writes" in capsys.readouterr().err
    (b / "sweep-spec.json").unlink()
    assert main(["sweep-merge", str(a), "--out", str(b), "--overwrite"]) == 2
    assert f"--out {b}: sweep-tiny.json is a sweep's own report, not a merge's" in capsys.readouterr().err
    assert (b / "sweep-tiny.json").read_bytes() == own
    assert not (tmp_path / "m").exists()
    # Into a dataset's folder, which then could never be replaced.
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "data", rows=100, max_cardinality=20)
    capsys.readouterr()
    assert main(["sweep-merge", str(a), "--out", str(tmp_path / "data" / "rep")]) == 2
    assert "inside the dataset" in capsys.readouterr().err and not (tmp_path / "data" / "rep").exists()


def test_a_damaged_dataset_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    # Found by every trial, once Ray was up: a wall of Tune tracebacks per trial before the line.
    from embshard.cluster import sweep_run
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=200)
    part = data / "test" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    capsys.readouterr()  # synth's progress bars
    monkeypatch.setattr(sweep_run, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}", "--methods", "uniform",
                 "--budgets", "1", "--seeds", "1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test/part-00000.parquet" in err[0], err


def two_sweeps(tmp_path: Path) -> tuple[Path, Path]:
    """Folders a and b, each with a sweep's report: uniform's points, MDE's."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, method in ((a, "uniform"), (b, "mde")):
        folder.mkdir()
        rep = sweep_report_of([p for p in rising() if p["method"] == method], [method])
        (folder / "sweep-tiny.json").write_text(json.dumps(rep))
    return a, b


def test_sweep_merge_overwrite_replaces_an_earlier_merge_whole(tmp_path, capsys):
    (a, b), out = two_sweeps(tmp_path), tmp_path / "m"
    assert main(["sweep-merge", str(a), str(b), "--out", str(out)]) == 0
    merged = (out / "sweep-tiny.json").read_text()
    # An earlier merge of another dataset's name (left beside the new one, sweep-merge then found
    # two reports there) and an interrupted write of ours.
    (out / "sweep-other.json").write_text(merged)
    (out / ".sweep-tiny.partial.json").write_text("{")
    assert main(["sweep-merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep-tiny.json", "sweep-tiny.md", "sweep-tiny.png"]
    # A user's notes or figure named like a merge's, with no merge report of theirs: deleted.
    (out / "sweep-notes.md").write_text("mine")
    capsys.readouterr()
    assert main(["sweep-merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 2
    assert (f"--out {out}: holds sweep-notes.md, which is no merge's (no sweep-notes.json beside it)"
            in capsys.readouterr().err)
    assert (out / "sweep-notes.md").read_text() == "mine"
    (out / "sweep-notes.md").unlink()
    (out / "sweep-tiny.json").write_text(merged[:50])  # truncated: was a JSONDecodeError traceback
    capsys.readouterr()
    assert main(["sweep-merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 2
    assert re.search(r"m/sweep-tiny\.json: not JSON \(", capsys.readouterr().err)


def test_two_merges_into_one_folder_at_once_are_one_merge_and_a_refusal(tmp_path, capsys):
    # They wrote the same staged files and renamed each other's: one merge's .json beside the
    # other's .md, and a FileNotFoundError traceback. The folder is locked for the merge.
    (a, b), out = two_sweeps(tmp_path), tmp_path / "m"
    assert main(["sweep-merge", str(a), str(b), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with held_elsewhere(f"folder_lock(Path({str(out)!r}))") as merging:
        capsys.readouterr()
        assert main(["sweep-merge", str(a), "--out", str(out), "--overwrite"]) == 2
        assert f"{out}: another embshard run is using it (pid {merging} " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".embshard-run.lock"} == before


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, python_ctrl_c):
    # A stop during `sweep-merge --overwrite` left the new sweep-X.md beside the old sweep-X.json
    # (each file was written and renamed in turn), and a .partial file behind.
    import os
    import signal

    from embshard.cluster.sweep_cli import write_files

    def report(text: str) -> dict:
        return {name: (lambda p, t=text: p.write_text(t)) for name in ("r.json", "r.md")}

    write_files(tmp_path, report("old"), marker="r.json")

    def stopped(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, {**report("new"), "r.json": stopped}, marker="r.json")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"r.json": "old", "r.md": "old"}

    replace = Path.replace

    def stop_at_the_first_rename(self: Path, target: Path) -> Path:
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once, unless held back
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", stop_at_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, report("new"), marker="r.json")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"r.json": "new", "r.md": "new"}


def test_a_resume_with_first_seed_or_vary_added_is_another_sweep_not_a_damaged_spec(tmp_path):
    # A spec written without --first-seed had no such key: adding it on --resume said "not a sweep
    # spec ...; start the sweep afresh", of a good sweep.
    from embshard.cluster.sweep_run import _claim_folder

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    _claim_folder(out, out, SweepSpec(["uniform"], [1.0], 1), cfg, resume=False, data_sha="a" * 64)
    for other in (SweepSpec(["uniform"], [1.0], 1, first_seed=1), SweepSpec(["uniform"], [1.0], 1, vary={"seed": [1]})):
        with pytest.raises(ConfigError, match=re.escape(f'--resume: {out} is the sweep {{"methods": ["uniform"], '
                                                        '"budgets": [1.0], "seeds": 1}; resume it with those')):
            _claim_folder(out, out, other, cfg, resume=True, data_sha="a" * 64)


def test_one_driver_at_a_time_per_sweep(tmp_path):
    # Two `--resume`s at once: the second's trials were refused by the first's run locks, and the
    # failed state it left made the next resume train the finished trials again.
    from embshard.cluster.run_lock import FolderInUse, folder_lock
    from embshard.cluster.sweep_run import run_sweep

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    with folder_lock(out):
        with pytest.raises(FolderInUse, match=rf"^{re.escape(str(out))}: another embshard run is using it \(pid "):
            run_sweep(cfg, SweepSpec(["uniform"], [1.0], 1), out, resume=False, parallel=1, data_sha="a" * 64)
        assert [p.name for p in out.iterdir()] == [".embshard-run.lock"]  # no spec written: nothing claimed


def test_a_sweep_stopped_by_sigterm_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    # Ctrl-C, which Tune handles, said "run the same command with --resume"; SIGTERM (a
    # KeyboardInterrupt on the driver) said "embshard: interrupted" and no more.
    import embshard.cluster.sweep_run as sweep_run
    from embshard.datasets.synth import synthesize

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_run, "run_sweep", stopped)
    synthesize(tmp_path / "data", rows=200, seed=0, max_cardinality=50)
    out = tmp_path / "out"
    code = main(["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={tmp_path / 'data'}",
                 "--methods", "uniform", "--budgets", "1", "--seeds", "1", "--out", str(out)])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"embshard: the sweep was stopped; its finished trials are kept in {out}: run the same command with --resume "
        "to continue")


def test_a_report_with_nothing_measured_plots_without_a_warning(tmp_path):
    # A PEP sweep that reached no target printed matplotlib's "No artists with labels found".
    import warnings

    from embshard.cluster.sweep_report import plot

    rep = report([{"method": "pep", "budget": 0.5, "seed": 0, "error": "target 0.5 not reached"}], None, [4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(rep, "nothing", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_every_sweep_method_is_a_base_method_with_or_without_mlet():
    """The sweep asks a trial's base method (`SweepMethod`) for its knobs, runs and points; each
    name `--methods` takes resolves to one, and every base method comes with MLET too."""
    from embshard.cluster.sweep_methods import SWEEP_BASES
    from embshard.config import SWEEP_METHODS

    resolved = {m: (Trial(m, 0).sweep_method.name, Trial(m, 0).with_mlet) for m in SWEEP_METHODS}
    assert set(resolved.values()) == {(base, mlet) for base in SWEEP_BASES for mlet in (False, True)}
    assert resolved["mlet"] == ("uniform", True) and resolved["pep+mlet"] == ("pep", True)
    # Only PEP's one prune run covers every budget, so a PEP trial is per seed, not per budget.
    assert [t.key for t in SweepSpec(["pep", "autodim"], [0.25, 0.5], 1).trials()] == [
        "pep-s0", "autodim-b0.25-s0", "autodim-b0.5-s0"]


class HalfWidth(PlannedMethod):
    """A user's sweep method: every table at half the uniform width of the budget."""

    name = "half_width"

    def embeddings_at(self, base, spec, budget):
        return replace(base.embeddings, policy="uniform", method=None, decisions=None, mlet=None,
                       dim=uniform_width(base.embeddings, budget / 2))


class WithKnobs(HalfWidth):
    knobs = MLET_KNOBS


class Failing(HalfWidth):
    def embeddings_at(self, base, spec, budget):
        return base.embeddings.no_such_field


class NegativeDim(HalfWidth):
    def embeddings_at(self, base, spec, budget):
        return replace(base.embeddings, dim=-3)


class DictEmbeddings(HalfWidth):
    def embeddings_at(self, base, spec, budget):
        return {"dim": 4}


class TwoRuns(Pep):
    knobs = None


def test_a_users_sweep_method_by_reference_plans_its_runs(tmp_path):
    """`--methods uniform,module:Class`: a SweepMethod of the user's trains beside the built-ins,
    with MLET too; what is not one is refused in one line naming it."""
    methods = parse_methods("uniform,test_sweep_report:HalfWidth,test_sweep_report:HalfWidth+mlet")
    trials = SweepSpec(methods, [0.5], 1).trials()
    assert [t.key for t in trials] == ["uniform-b0.5-s0", "test_sweep_report:HalfWidth-b0.5-s0",
                                       "test_sweep_report:HalfWidth+mlet-b0.5-s0"]
    data = DatasetSpec(name="t", dense=[], sparse=[SparseFeature("C1", 100), SparseFeature("C2", 50)])
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=16))
    planned = [TrialRuns(cfg, data, t, [0.5], tmp_path / t.key).first_run()[0].embeddings for t in trials]
    assert [(e.dim, e.mlet is not None) for e in planned] == [(8, False), (4, False), (4, True)]
    assert method_knobs(cfg, methods[1]) == {} and "mlet.ratio" in method_knobs(cfg, methods[2])
    # MLET's knobs vary for the user's X+mlet alone (they were refused as read by no method here).
    check_vary(cfg, {"embeddings.mlet.ratio": [2, 4]}, methods[2:], "--vary")
    # A merged report names the method: its knobs are known without importing it (a machine
    # without the user's code merged nothing).
    assert method_knobs(cfg, "nowhere_module:Thing+mlet") == {k: v for k, v in method_knobs(cfg, "mlet").items()}
    for name, said in (("test_sweep_report:uniform_width", "a function, not a SweepMethod"),
                       ("test_sweep_report:WithKnobs", "a method of yours has no knob section of its own"),
                       ("test_sweep_report:TwoRuns+mlet", r"\+mlet is for a PlannedMethod of yours"),
                       # A built-in named as a reference was a second curve of the same method.
                       ("embshard.cluster.sweep_methods:Uniform", "the built-in 'uniform'; name it so"),
                       ("embshard.cluster.sweep_methods:Mde", "the built-in 'mde'; name it so"),
                       ("nowhere_module:Thing", "cannot import module 'nowhere_module'")):
        with pytest.raises(ConfigError, match=rf"^method '{re.escape(name)}': .*{said}"):
            _ = SweepSpec([name], [0.5], 1).trials()[0].sweep_method
    # Its own code failing is one line naming it and where, not a traceback.
    failing = SweepSpec(["test_sweep_report:Failing"], [0.5], 1).trials()[0]
    with pytest.raises(ConfigError, match=r"^method 'test_sweep_report:Failing': its first_run raised "
                                          r"AttributeError: .*no_such_field.* at .*test_sweep_report\.py:\d+$"):
        TrialRuns(cfg, data, failing, [0.5], tmp_path / "failing").first_run()
    # A config it built that embshard refuses: "dim: must be positive, got -3", read as the
    # config's own embeddings.dim (which was 16), the method unnamed.
    negative = SweepSpec(["test_sweep_report:NegativeDim"], [0.5], 1).trials()[0]
    with pytest.raises(ConfigError, match=r"^method 'test_sweep_report:NegativeDim': its first_run: .*dim: must be "
                                          r"positive, got -3"):
        TrialRuns(cfg, data, negative, [0.5], tmp_path / "negative").first_run()
    # Named as raised "at .../dataclasses.py:1472", where replace() found it.
    wrong = SweepSpec(["test_sweep_report:DictEmbeddings"], [0.5], 1).trials()[0]
    with pytest.raises(ConfigError, match=r"^method 'test_sweep_report:DictEmbeddings': its first_run: "
                                          r"embeddings_at\(\) returned dict, not an EmbeddingsConfig$"):
        TrialRuns(cfg, data, wrong, [0.5], tmp_path / "wrong").first_run()
    with pytest.raises(ConfigError, match=r"^--methods: unknown method 'half_width' \(known: uniform, "):
        parse_methods("uniform,half_width")


def test_a_long_vary_value_names_its_folders_within_what_a_file_system_takes(tmp_path):
    # 90 layers in --vary model.over_arch named the trial's run folder: "File name too long" after
    # the first trial had trained.
    from embshard.cluster.sweep_plan import setting_label

    longs = [Trial("uniform", 0, 0.5, (("model.over_arch", [2] + [1] * n),)) for n in (90, 91)]
    assert longs[0].key != longs[1].key
    # With room for the names made of it: Ray's folder of a run, `sweep-KEY-retrain-0.99-pep`.
    assert all(len(f"sweep-{t.key}-retrain-0.99-pep".encode()) <= 255 for t in longs)
    for t in longs:
        (tmp_path / t.key).mkdir()  # the file system takes it
    label = setting_label((("model.over_arch", [1] * 200),))
    assert len(label.encode()) <= 255 and label.startswith("model.over_arch=[1, 1")
    assert Trial("uniform", 0, 0.5, (("model.over_arch", [2]),)).key == "uniform-b0.5-s0-model.over_arch=[2]"


def test_a_budget_of_no_parameter_names_the_budget(tmp_path):
    # Was "budget_params: must be positive, got 0": a field the user never set.
    data = DatasetSpec(name="t", dense=[], sparse=[SparseFeature("C1", 100), SparseFeature("C2", 50)])
    cfg = JobConfig(embeddings=EmbeddingsConfig(dim=16))
    trial = SweepSpec(["mde"], [1e-300], 1).trials()[0]
    with pytest.raises(ConfigError, match=r"^--budgets 1e-300: 1e-300 x the base model's 2,400 embedding "
                                          r"parameters is no parameter for mde$"):
        TrialRuns(cfg, data, trial, [1e-300], tmp_path / "tiny").first_run()


def merge_folders(tmp_path: Path, **edits) -> tuple[Path, Path]:
    """Two sweeps' folders (uniform, mde) as `embshard sweep` leaves them: its spec, then its report
    (with `edits`)."""
    folders = tmp_path / "a", tmp_path / "b"
    for folder, method in zip(folders, ("uniform", "mde"), strict=True):
        folder.mkdir()
        rep = {**sweep_report_of([p for p in rising() if p["method"] == method], [method]), **edits}
        (folder / "sweep-spec.json").write_text(json.dumps(rep["sweep"]))
        write_report(rep, "t", folder, rep["dataset"])
    return folders


def test_a_report_of_a_dataset_named_spec_leaves_the_sweeps_spec_alone(tmp_path, capsys):
    # Its sweep-spec.json was written over the sweep's spec: --resume said "not a sweep spec", and
    # sweep-merge found no report in the folder (nor in a merge's of that dataset).
    from embshard.cluster.sweep_cli import sweep_json
    from embshard.cluster.sweep_report import report_file

    a, b = merge_folders(tmp_path, dataset="spec")
    assert json.loads((a / "sweep-spec.json").read_text())["methods"] == ["uniform"]
    assert sorted(p.name for p in a.iterdir()) == ["sweep-spec-report.json", "sweep-spec-report.md",
                                                   "sweep-spec-report.png", "sweep-spec.json"]
    assert sweep_json(str(a)) == a / "sweep-spec-report.json"
    out = tmp_path / "m"
    assert main(["sweep-merge", str(a), str(b), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep-spec-report.json", "sweep-spec-report.md",
                                                     "sweep-spec-report.png"]
    assert main(["sweep-merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert main(["sweep-merge", str(out), "--out", str(tmp_path / "again")]) == 0  # a merge's report is found
    # A file system blind to case takes sweep-Spec.json for the spec too; other names are as they were.
    assert report_file("Spec", "json") == "sweep-Spec-report.json" and report_file("specs", "md") == "sweep-specs.md"
    # A sweep's folder from before: its report over its spec, the one copy of its points.
    old = tmp_path / "old"
    old.mkdir()
    (a / "sweep-spec-report.json").rename(old / "sweep-spec.json")
    assert sweep_json(str(old)) == old / "sweep-spec.json"


def test_a_dataset_name_too_long_for_its_report_files_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # A 300-character name in a report: "File name too long" once the merge wrote, leaving an empty
    # --out. A dataset folder's name of 240 bytes (a file system takes 255): the same, once every
    # trial had trained; `.sweep-NAME.partial.json`, the report as it is written, must fit.
    from embshard.cluster import sweep_run
    from embshard.datasets.synth import synthesize

    a, _ = merge_folders(tmp_path)
    good = json.loads((a / "sweep-tiny.json").read_text())
    for size in (300, 236):
        bad = tmp_path / f"bad{size}"
        bad.mkdir()
        (bad / "sweep-tiny.json").write_text(json.dumps({**good, "dataset": "d" * size}))
        assert main(["sweep-merge", str(bad), "--out", str(tmp_path / "m")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"embshard: error: {bad / 'sweep-tiny.json'}: not a sweep report (dataset: a name of {size} bytes; its "
            "report's files take one of at most 235)")
    assert not (tmp_path / "m").exists()
    longest = tmp_path / "longest"
    longest.mkdir()
    (longest / "sweep-tiny.json").write_text(json.dumps({**good, "dataset": "d" * 235}))
    assert main(["sweep-merge", str(longest), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / f"sweep-{'d' * 235}.json").is_file()

    data = tmp_path / ("d" * 240)
    synthesize(tmp_path / "data", rows=200, seed=0, max_cardinality=50)
    (tmp_path / "data").rename(data)
    capsys.readouterr()
    monkeypatch.setattr(sweep_run, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "s"
    assert main(["sweep", str(REPO / "configs" / "default.yaml"), "--set", f"data.path={data}", "--methods", "uniform",
                 "--budgets", "1", "--seeds", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"embshard: error: data.path {data}: a folder name of 240 bytes, which names the sweep's report files; they "
        "take one of at most 235: rename the folder")
    assert not out.exists()


@pytest.mark.parametrize("edit, said", [
    # Written into the merged report as NaN, which JSON readers refuse.
    ({"valid_value": float("nan")}, r"valid_value: nan"),
    ({"valid_value": 5.0}, r"valid_value: 5\.0"),  # an AUC cannot be
    # "sweep points: mixed metrics [('auc', False), ('auc', True)]", naming no file.
    ({"lower_is_better": "no"}, r"lower_is_better: 'no'"),
    # Anywhere in a point: copied into the merged report as NaN too.
    ({"knobs": {"mlet.ratio": float("inf")}}, r"knobs\.mlet\.ratio: inf"),
    # Each contradicts the rest of its point and went into the report as it was: an AUC ranked
    # lower-better named the worst as the best; a size beside other parameters was printed; a
    # measured point with an error became an error row, its value dropped.
    ({"lower_is_better": True}, r"lower_is_better: True"),
    ({"serving_bytes": 5}, r"serving_bytes: 5"),
    ({"steps": 9, "selected_step": 100}, r"selected_step: 100"),
    ({"error": "x"}, r"error: 'x'"),
    # "method 'uniform ': 'uniform ' is not package.module:attr", naming no file.
    ({"method": "uniform "}, r"method: 'uniform '"),
])
def test_a_points_edited_value_is_refused_naming_the_file_and_field(tmp_path, capsys, edit, said):
    a, b = merge_folders(tmp_path)
    rep = json.loads((b / "sweep-tiny.json").read_text())
    rep["points"][1] |= edit
    (b / "sweep-tiny.json").write_text(json.dumps(rep))
    assert main(["sweep-merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(rf"b/sweep-tiny\.json: not a sweep report \(points\[1\]\.{said}\)$",
                                              err.strip()), err
    assert not (tmp_path / "m").exists()


def test_a_point_without_a_validation_value_merges(tmp_path):
    # A run without an evaluation records None; a point with an error records none at all.
    a, b = merge_folders(tmp_path)
    rep = json.loads((b / "sweep-tiny.json").read_text())
    rep["points"][0]["valid_value"] = None
    rep["points"].append({"method": "pep", "budget": 1.0, "seed": 0, "error": "PEP prunes below the base model"})
    (b / "sweep-tiny.json").write_text(json.dumps(rep))
    assert main(["sweep-merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0


def test_a_resume_refuses_a_hand_edited_config_as_no_sweep_spec(tmp_path):
    # `config.train: 5` said "was started with train = 5, this command has '(unset)'", and `config: {}`
    # named a default as what the sweep was started with: differences of this command's.
    from embshard.cluster.sweep_run import _claim_folder, _record_sha256

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out, spec = tmp_path / "out", SweepSpec(["uniform"], [1.0], 1)
    _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    saved = json.loads((out / "sweep-spec.json").read_text())
    for config, why in (({**saved["config"], "train": 5}, "config.train: expected a mapping, got int"),
                        ({}, "config.data: missing")):
        (out / "sweep-spec.json").write_text(json.dumps({**saved, "config": config}))
        with pytest.raises(ConfigError, match=re.escape(f"--resume: {out / 'sweep-spec.json'}: not a sweep spec "
                                                        f"({why}")):
            _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)
    # A key added to the config since the sweep started takes its default, as before, and one
    # today's schema no longer has does not stop the resume of its finished trials.
    def retired_and_added(config):  # read as it was, a key retired since was a difference no command mends
        config["train"]["retired_knob"] = 1
        config["train"].pop("report_at")

    for edit in (lambda config: config["train"].pop("report_at"), retired_and_added):
        config = json.loads(json.dumps(saved["config"]))
        edit(config)
        written = {**saved, "config": config}  # as that version wrote it: sealed with its digest
        (out / "sweep-spec.json").write_text(json.dumps(written | {"record_sha256": _record_sha256(written)}))
        assert not _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)


def test_sweep_merge_into_a_dangling_link_makes_the_folder_it_names(tmp_path, capsys):
    # As `embshard sweep --out` does; it was "--out LINK: cannot be made (File exists)".
    a, b = merge_folders(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "not-yet")
    assert main(["sweep-merge", str(a), str(b), "--out", str(link)]) == 0
    assert sorted(p.name for p in (tmp_path / "not-yet").iterdir()) == ["sweep-tiny.json", "sweep-tiny.md",
                                                                         "sweep-tiny.png"]


def test_a_sweep_spec_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # Cut short, the folder held half a spec: --resume refused it as "not a sweep spec", and a
    # fresh sweep there as "not empty".
    from embshard.cluster.sweep_run import _claim_folder

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out, spec = tmp_path / "out", SweepSpec(["uniform"], [1.0], 1)
    write_text = Path.write_text

    def cut_short(self: Path, text: str, *args, **kwargs) -> int:
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    monkeypatch.undo()
    assert list(out.iterdir()) == []
    assert not _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    assert json.loads((out / "sweep-spec.json").read_text())["methods"] == ["uniform"]


def test_a_resume_refuses_a_sweep_spec_edited_since_the_sweep_started(tmp_path):
    # Tune restores the trials it was started with: with a method added to the spec by hand (and to
    # the command), the resume finished the recorded trials, counted fewer than the spec lists, and
    # said "run the same command with --resume to continue", at every resume.
    from embshard.cluster.sweep_run import _claim_folder

    cfg = load_job_config(REPO / "configs" / "default.yaml")
    out, spec = tmp_path / "out", SweepSpec(["uniform"], [1.0], 1)
    _claim_folder(out, out, spec, cfg, resume=False, data_sha="a" * 64)
    saved = json.loads((out / "sweep-spec.json").read_text())
    more = SweepSpec(["uniform", "mde"], [1.0], 1)
    for edited, now in (({**saved, "methods": ["uniform", "mde"]}, more),
                        ({**saved, "config": {**saved["config"], "seed": 5}}, spec)):
        (out / "sweep-spec.json").write_text(json.dumps(edited))
        with pytest.raises(ConfigError, match=re.escape(f"--resume: {out / 'sweep-spec.json'}: changed since the sweep "
                                                        "started (Ray Tune resumes the trials as they were started)")):
            _claim_folder(out, out, now, cfg, resume=True, data_sha="a" * 64)
    # Read back as written, it resumes.
    (out / "sweep-spec.json").write_text(json.dumps(saved, indent=2))
    assert not _claim_folder(out, out, spec, cfg, resume=True, data_sha="a" * 64)


def test_each_finished_trial_is_a_line_counted_among_the_sweeps(capsys):
    # A sweep of 36 trials said nothing for minutes, then a line per trial with no count.
    from types import SimpleNamespace

    from embshard.cluster.sweep_run import _TrialLine
    from embshard.units import duration_text

    def trial(tid: str, status: str, seconds: float | None = None) -> SimpleNamespace:
        result = {"points": json.dumps([point("uniform", 1.0, 0, 0.7, 4000)])}
        return SimpleNamespace(trial_id=tid, status=status, config={"trial": {"method": "uniform", "seed": 0}},
                               last_result=result | ({"time_total_s": seconds} if seconds is not None else {}))

    line = _TrialLine(4)
    # A resume: one trial restored as finished (TERMINATED); Tune calls back while a trial still runs.
    restored, a, b = trial("r", "TERMINATED"), trial("a", "RUNNING", 302.4), trial("b", "RUNNING", 48)
    line.on_trial_complete(0, [restored, a, b], a)
    line.on_trial_complete(0, [restored, a, b], b)  # `a` not yet marked TERMINATED: still counted once
    assert capsys.readouterr().err.splitlines() == ["[2/4] trial uniform seed 0: budget 1: AUC 0.7000 (5 min 2 s)",
                                                    "[3/4] trial uniform seed 0: budget 1: AUC 0.7000 (48 s)"]
    # Tune restores a sweep's callbacks from its pickle: one from before the count had no total.
    old = _TrialLine.__new__(_TrialLine)
    old.on_trial_complete(0, [a], a)
    assert capsys.readouterr().err == "[1] trial uniform seed 0: budget 1: AUC 0.7000 (5 min 2 s)\n"
    assert [duration_text(s) for s in (0.4, 59.6, 3600 * 2 + 61)] == ["0 s", "1 min 0 s", "2 h 1 min"]
