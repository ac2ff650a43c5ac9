"""The command line: every verb has --help, and bad input is one line naming what was wrong."""

from __future__ import annotations

import pytest

from embshard.cluster.cli import build_parser, main


def _verbs(parser) -> list[list[str]]:
    out = []
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            out.append([name])
            if sub._subparsers is not None:
                out.extend([name, *rest] for rest in _verbs(sub))
    return out


@pytest.mark.parametrize("verb", _verbs(build_parser()), ids=" ".join)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: embshard" in capsys.readouterr().out


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.yaml: config file not found" in err


def test_bad_field_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch_sise: 3\n")
    assert main(["plan", str(cfg)]) == 2
    assert "train.batch_sise: unknown field" in capsys.readouterr().err


def test_bad_value_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  batch_size: abc\n")
    assert main(["plan", str(cfg)]) == 2
    assert "data.batch_size: expected an integer, got 'abc'" in capsys.readouterr().err


def test_override_range_error_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["plan", str(cfg), "--set", "embeddings.mde.alpha=2"]) == 2
    assert "embeddings.mde.alpha: must be in [0, 1]" in capsys.readouterr().err


def test_missing_dataset_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'nodata'}\n")
    assert main(["plan", str(cfg)]) == 2
    assert "nodata: dataset directory not found" in capsys.readouterr().err


def test_plan_for_a_cluster_from_a_laptop(tmp_path, capsys):
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=3000, max_cardinality=5000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\n")
    out = tmp_path / "p.json"
    assert main(["plan", str(cfg), "--world-size", "64", "--device", "cuda",
                 "--device-memory-gb", "80", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "64 x cuda ranks" in text and out.is_file()


def test_plan_a_prune_and_a_search_run(tmp_path, capsys):
    # `embshard plan` used to plan only embeddings.policy: what a PEP or AutoDim run trains (the
    # prune plan's threshold columns, the search tables) could not be seen before running it.
    from embshard.datasets.synth import synthesize
    from embshard.planner.pipeline import PlanBundle

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=500)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\n"
                   f"pep:\n  granularity: feature_dimension\nautodim:\n  candidates: [4, 8]\n  lookup: separate\n")
    plain, pep, search = (tmp_path / f"{name}.json" for name in ("plain", "pep", "search"))
    assert main(["plan", str(cfg), "--out", str(plain)]) == 0
    assert main(["plan", str(cfg), "--method", "pep", "--out", str(pep)]) == 0
    assert main(["plan", str(cfg), "--method", "autodim", "--out", str(search)]) == 0
    capsys.readouterr()
    bytes_of = {p.stem: sum(r["train_bytes"] for r in PlanBundle.load(p, "rowwise_adagrad").memory.per_rank.values())
                for p in (plain, pep, search)}
    assert bytes_of["pep"] > bytes_of["plain"]  # a row threshold per entry: twice as wide
    assert bytes_of["search"] > bytes_of["plain"]  # a table per candidate width
    assert len(PlanBundle.load(search, "rowwise_adagrad").dimension_plan.tables) == 2 * 26
    assert main(["plan", str(cfg), "--method", "nosuch"]) == 2
    assert "method 'nosuch': not registered" in capsys.readouterr().err
