"""The bench scripts as tools a user runs: they refuse to replace earlier results without
--overwrite before any work, write through temporary files, keep a user's files, and say a bad
argument or input in one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, bench_module

from embshard.errors import DataError


@pytest.fixture
def common(tmp_path, monkeypatch):
    module = bench_module("common")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def _main(module, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    return stopped.value.code


def test_planted_oracle_keeps_earlier_results_and_refuses_no_seeds(common, tmp_path, monkeypatch, capsys):
    # `--seeds 0` wrote an empty table over oracle.json and oracle.md, exit 0; any --label wrote
    # over whatever the results folder held.
    oracle = bench_module("planted_oracle")
    earlier = common.RESULTS / "planted-oracle" / "oracle.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"precious": 1}')
    assert _main(oracle, ["--data", str(tmp_path / "planted"), "--seeds", "0"], monkeypatch) == 2
    assert "argument --seeds: must be >= 1, got 0" in capsys.readouterr().err
    assert _main(oracle, ["--data", str(tmp_path / "planted")], monkeypatch) == 2
    assert f"{earlier} exists; pass --overwrite to replace it" in capsys.readouterr().err  # before reading data
    assert _main(oracle, ["--data", str(tmp_path / "planted"), "--scales", "1,0"], monkeypatch) == 2
    assert "--scales: multiples must be at least 1" in capsys.readouterr().err
    for label in (str(tmp_path / "elsewhere"), "../up"):
        assert _main(oracle, ["--data", str(tmp_path / "planted"), "--label", label], monkeypatch) == 2
        assert "is not the name of one folder under bench/results/" in capsys.readouterr().err
    assert earlier.read_text() == '{"precious": 1}'


def test_papers_and_autodim_keep_earlier_results(common, tmp_path, monkeypatch, capsys):
    papers = bench_module("papers")
    earlier = common.RESULTS / "papers-pep-planted" / "pep.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    # The Criteo sample under another label trained and wrote over that label's results.
    assert _main(papers, ["--only", "pep", "--label", "planted"], monkeypatch) == 2
    assert f"{earlier} exists; pass --overwrite" in capsys.readouterr().err
    autodim = bench_module("autodim")
    monkeypatch.setattr(autodim, "RESULTS", common.RESULTS)
    (common.RESULTS / "autodim-movielens.json").write_text("{}")
    assert _main(autodim, [], monkeypatch) == 2
    assert "autodim-movielens.json exists; pass --overwrite" in capsys.readouterr().err


def test_write_atomic_keeps_the_earlier_file_and_a_users_own(common, tmp_path):
    out = tmp_path / "report.json"
    (tmp_path / "report.tmp").write_text("notes")  # two_tower.py wrote through OUT.tmp, then removed it
    common.write_json(out, {"a": 1})
    with pytest.raises(RuntimeError):
        common.write_atomic(out, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("stop"))))
    assert json.loads(out.read_text()) == {"a": 1} and (tmp_path / "report.tmp").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.tmp"]


def test_an_error_of_embshards_is_one_line(common, monkeypatch, capsys):
    def fails() -> None:
        raise DataError("/data/x: dataset directory not found")

    monkeypatch.setattr(sys, "argv", ["reader.py"])
    with pytest.raises(SystemExit) as stopped:
        common.bench_main(fails)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "reader.py: error: /data/x: dataset directory not found\n"


def test_counts_and_out_names_are_checked_as_arguments(capsys):
    scaling = bench_module("scaling")
    for argv, said in ((["--max-rows", "inf"], "argument --max-rows: not a count: 'inf'"),
                       (["--small-rows", "1e400"], "argument --small-rows: not a count: '1e400'"),
                       (["--out", "."], "--out .: names the files OUT.jsonl, OUT.png: give it a name")):
        with pytest.raises(SystemExit) as stopped:
            scaling.parse(argv)
        assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_a_dot_in_an_out_name_is_kept(tmp_path):
    # `--out res.v2` wrote res.jsonl and res.png: another run's files, without --overwrite.
    scaling = bench_module("scaling")
    args = scaling.parse(["--out", str(tmp_path / "res.v2")])
    assert (args.out_jsonl, args.out_png) == (tmp_path / "res.v2.jsonl", tmp_path / "res.v2.png")
    args = scaling.parse(["--out", str(tmp_path / "res.jsonl")])  # named by one of its files
    assert (args.out_jsonl, args.out_png) == (tmp_path / "res.jsonl", tmp_path / "res.png")


@pytest.mark.slow
def test_convert_memory_leaves_a_dataset_in_its_work_folder_alone(tmp_path):
    # It converted into WORK/out with --overwrite: a dataset the user kept there was replaced.
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "dataset.json").write_text('{"mine": true}')
    done = subprocess.run([sys.executable, str(REPO / "bench" / "convert_memory.py"), "--ratings", "3000",
                           "--avazu-rows", "3000", "--work", str(work)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "out" / "dataset.json").read_text() == '{"mine": true}'
    assert "avazu --dedup-key id" in done.stdout
    assert sorted(p.name for p in work.iterdir()) == ["avazu-3000.csv", "ml-3000", "out"]
