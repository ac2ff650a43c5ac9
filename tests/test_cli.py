"""The command line: every verb has --help, and bad input is one line naming what was wrong."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import held_elsewhere

from embshard.cluster.cli import build_parser, main
from embshard.errors import EXIT_INTERRUPTED, ConfigError


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


def _config_on_data(tmp_path, config: str, max_cardinality: int) -> Path:
    """tmp_path/c.yaml: `config` on a small synthetic dataset in tmp_path/data."""
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "data", rows=2000, max_cardinality=max_cardinality)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'data'}\n{config}")
    return cfg


def test_plan_a_prune_and_a_search_run(tmp_path, capsys):
    # `embshard plan` used to plan only embeddings.policy: what a PEP or AutoDim run trains (the
    # prune plan's threshold columns, the search tables) could not be seen before running it.
    from embshard.planner.pipeline import PlanBundle

    cfg = _config_on_data(tmp_path, "embeddings:\n  dim: 8\npep:\n  granularity: feature_dimension\n  weight_decay: 0\n"
                                    "autodim:\n  candidates: [4, 8]\n  lookup: separate\n", max_cardinality=500)
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


def test_the_machine_refusing_a_write_is_one_line(tmp_path, capsys, monkeypatch):
    import embshard.datasets.writer as writer
    from embshard.cluster import console

    monkeypatch.setattr(console, "_current_log", None)  # no run's log yet, whatever ran before

    def full_disk(staging, out, overwrite):
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "train" / "part-00000.parquet"))
    monkeypatch.setattr(writer, "publish", full_disk)
    assert main(["data", "synth", "--rows", "100", "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("embshard: error: ") and last.endswith("part-00000.parquet: No space left on device")
    assert list(tmp_path.iterdir()) == []  # the staging folder went too

    # pyarrow's and numpy's writers name no file: the line named neither file nor folder.
    def full_disk_unnamed(staging, out, overwrite):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "publish", full_disk_unnamed)
    assert main(["data", "synth", "--rows", "100", "--out", str(tmp_path / "ds")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"embshard: error: writing {tmp_path / 'ds'}: No space left on device (OSError: [Errno 28] No space left on "
        "device)")

    def bug(staging, out, overwrite):
        raise OSError(errno.EBADF, "Bad file descriptor", "x")  # not the machine's doing: a crash
    monkeypatch.setattr(writer, "publish", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):  # no run log yet: Python's traceback
        main(["data", "synth", "--rows", "100", "--out", str(tmp_path / "ds")])
    # Inside a run (a log to hold the traceback) it is still the crash line, not an escape.
    with console.run_log(tmp_path / "run"):
        assert main(["data", "synth", "--rows", "100", "--out", str(tmp_path / "ds")]) == 1
    assert "embshard: crashed: OSError: [Errno 9] Bad file descriptor: 'x' (full traceback:" in capsys.readouterr().err


def test_a_negative_seed_is_refused_by_its_flag(tmp_path, capsys):
    for argv in (["data", "synth", "--rows", "100"], ["data", "convert", "criteo", str(tmp_path / "x.txt")]):
        with pytest.raises(SystemExit):
            main([*argv, "--seed", "-1", "--out", str(tmp_path / "ds")])
        assert "--seed: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_sigterm_during_a_conversion_removes_its_staging_folder(tmp_path):
    # SIGKILL aside, a stopped conversion leaves nothing behind: SIGTERM cleans up as Ctrl-C does.
    command = [sys.executable, "-c", "from embshard.cluster.cli import main; raise SystemExit(main())",
               "data", "synth", "--rows", "3000000", "--out", str(tmp_path / "ds")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".ds.partial-*/test")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".ds.partial-*/test")), "the synth never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "embshard: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_plan_file_must_fit_the_data_the_dim_and_the_device(tmp_path, capsys):
    # Each of these once trained with exit 0 or crashed in the workers: ids past a table's rows read
    # row 0 (FBGEMM's bounds check, said only in the log), the config's dim was recorded but not
    # trained, a cuda plan failed inside every worker.
    from embshard.datasets.synth import synthesize

    small, large = tmp_path / "small", tmp_path / "large"
    synthesize(small, rows=2000, max_cardinality=300)
    synthesize(large, rows=2000, max_cardinality=500)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {large}\nembeddings:\n  dim: 8\ncluster:\n  workers: 1\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    for name, flags in (("small", ["--set", f"data.path={small}"]), ("cuda", ["--device", "cuda"]),
                        ("same", []), ("cw", ["--set", "sharding.sharding_types=[column_wise]"])):
        assert main(["plan", str(cfg), *flags, "--world-size", "1", "--out", str(tmp_path / f"{name}.json")]) == 0
    capsys.readouterr()
    for name, flags, message in (
            # Trained column-wise where the config allows table-wise alone, without a word.
            ("cw", ["--set", "sharding.sharding_types=[table_wise]"],
             r"sharding\.plan_file .*cw\.json: t_C\d+ is sharded column_wise, which sharding\.sharding_types "
             r"\['table_wise'\] does not allow; plan it again with them"),
            ("small", [], r"sharding\.plan_file .*small\.json on .*large: feature 'C\d+' takes [\d,]+ ids, "
                          r"table 't_C\d+' has 300 rows: the plan was made for other data"),
            ("same", ["--set", "embeddings.dim=16"], r"a plan for embeddings\.dim 8, the config has 16"),
            ("cuda", [], r"shard plan was made for cuda ranks, training runs on cpu")):
        assert main(["train", str(cfg), "--set", f"sharding.plan_file={tmp_path / f'{name}.json'}", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_out_replaces_only_a_plan_and_only_when_asked(tmp_path, capsys):
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=300)
    spec_before = (data / "dataset.json").read_bytes()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\n")
    # Once: plan.json written beside it, then renamed over the dataset's own spec. (Now refused
    # before that, as anything written inside a dataset is; a file that is no plan, elsewhere:)
    assert main(["plan", str(cfg), "--out", str(data / "dataset.json"), "--overwrite"]) == 2
    assert f"plan {data / 'dataset.json'}: inside the dataset {data}" in capsys.readouterr().err
    assert (data / "dataset.json").read_bytes() == spec_before and not (data / "plan.json").exists()
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main(["plan", str(cfg), "--out", str(notes), "--overwrite"]) == 2
    assert re.search(r"notes\.json: exists and is no plan \(.*no 'dimension_plan'\)\); refusing",
                     capsys.readouterr().err)
    assert notes.read_text() == '{"mine": 1}'
    notes.unlink()
    out = tmp_path / "p.json"
    assert main(["plan", str(cfg), "--out", str(out)]) == 0
    assert main(["plan", str(cfg), "--out", str(out)]) == 2
    assert "p.json: a plan is there already; pass --overwrite" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "data", "p.json"]


def test_plan_never_writes_into_a_checkpoint_step_or_an_export(tmp_path, capsys):
    # A plan written into a checkpoint's step replaced its plan.json unasked (its output_dir there),
    # or with --overwrite: the step never verified again. Into an export, the same.
    cfg = _config_on_data(tmp_path, "embeddings:\n  dim: 8\n", max_cardinality=300)
    step = tmp_path / "run" / "checkpoints" / "step-000008"
    (step / "plan").mkdir(parents=True)
    (step / "plan" / "plan.json").write_text('{"dimension_plan": {}, "shard_plan": {}}')
    export = tmp_path / "export"
    export.mkdir()
    (export / "serving.json").write_text('{"version": 2, "weights": "weights.pt", "plan": "plan.json"}')
    (export / "plan.json").write_text('{"dimension_plan": {}, "shard_plan": {}}')
    # A step copied out of its run is one by its manifest.
    best = tmp_path / "best"
    (best / "plan").mkdir(parents=True)
    (best / "manifest.json").write_text('{"version": 2, "files": {}}')
    for flags, folder in ((["--set", f"output_dir={step}"], f"checkpoint step {step}"),
                          (["--out", str(best / "plan" / "plan.json")], f"checkpoint step {best}"),
                          (["--out", str(step / "plan" / "plan.json"), "--overwrite"], f"checkpoint step {step}"),
                          (["--out", str(step / "plan" / "mine.json")], f"checkpoint step {step}"),
                          (["--out", str(export / "plan.json"), "--overwrite"], f"export {export}")):
        assert main(["plan", str(cfg), *flags]) == 2
        assert f": inside the {folder}, which holds its own files alone" in capsys.readouterr().err
    assert sorted(p.name for p in step.rglob("*")) == ["plan", "plan.json"]
    assert (step / "plan" / "plan.json").read_text() == (export / "plan.json").read_text()


def test_plan_for_zero_ranks_is_refused_by_its_flag(tmp_path, capsys):
    # 0 fell back to cluster.workers, as if the flag were not given.
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path / "c.yaml"), "--world-size", "0"])
    assert "--world-size: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "named"), [(["--world-size", "100000000"], "--world-size"),
                                              (["--set", "cluster.workers=100000000"], "cluster.workers")])
def test_a_world_size_no_cluster_has_is_refused_before_planning(tmp_path, capsys, flags, named):
    # TorchRec's planner takes time in proportion to the ranks: 100,000,000 planned for hours.
    cfg = _config_on_data(tmp_path, "embeddings:\n  dim: 8\n", max_cardinality=300)
    try:
        assert main(["plan", str(cfg), *flags, "--out", str(tmp_path / "p")]) == 2
    except SystemExit as e:  # argparse's exit for a flag
        assert e.code == 2
    err = capsys.readouterr().err
    assert "65,536" in err and "100,000,000" in err and named in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("result", ["summary.json", "checkpoints/step-00000010"])
def test_plan_without_out_keeps_the_plan_a_run_trained_on(tmp_path, capsys, result):
    # `plan` into the run's own folder replaced a finished run's plan.json without a word.
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\noutput_dir: {tmp_path / 'run'}\n", max_cardinality=300)
    assert main(["plan", str(cfg)]) == 0
    assert main(["plan", str(cfg), "--set", "embeddings.dim=16"]) == 0  # a draft: replaced unasked
    plan = tmp_path / "run" / "plan" / "plan.json"
    made = plan.read_bytes()
    (tmp_path / "run" / result).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / result).mkdir() if "step" in result else (tmp_path / "run" / result).write_text("{}")
    capsys.readouterr()
    assert main(["plan", str(cfg)]) == 2
    assert f"{plan}: the plan {tmp_path / 'run'} trained on" in capsys.readouterr().err
    assert plan.read_bytes() == made
    assert main(["plan", str(cfg), "--overwrite"]) == 0
    assert plan.read_bytes() != made


def test_dense_layers_no_rank_holds_are_refused_by_the_plan(tmp_path, capsys):
    # The memory report counted tables and projections only: a worker's "crashed: can't allocate".
    cfg = _config_on_data(tmp_path, "embeddings:\n  dim: 8\n", max_cardinality=300)
    assert main(["plan", str(cfg), "--set", "model.dense_arch=[16000000,16000000]", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"rank \d needs .* TiB for training .*largest there: the dense layers \(.* TiB\), t_C", err), err
    assert not (tmp_path / "p").exists()


def test_a_search_or_prune_refuses_an_output_it_would_destroy_before_it_starts(tmp_path, capsys):
    # search --out wrote the decisions over any file (the job's own config too); a folder there,
    # or a file as pep.out, was found out after the whole run, as a crash.
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\npep:\n  targets: [0.5]\n"
                                    f"output_dir: {tmp_path / 'run'}\n", max_cardinality=300)
    config_text = cfg.read_text()
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    for out, message in ((cfg, r"c\.yaml: exists and is no decisions file \(.*not JSON.*\); refusing to replace it"),
                         (tmp_path / "folder", r"folder: a directory; give the path of a file to write the "
                                               r"decisions file to$")):
        assert main(["search", "autodim", str(cfg), "--out", str(out), "--overwrite"]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert main(["prune", "pep", str(cfg), "--set", f"pep.out={tmp_path / 'notes.txt'}"]) == 2
    assert "notes.txt: a file; it names the folder the prune run writes its targets into" in capsys.readouterr().err
    assert cfg.read_text() == config_text and (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "run").exists()


def test_a_plan_into_a_training_runs_plan_folder_is_refused(tmp_path, capsys, monkeypatch):
    # `plan --out RUN/plan/plan.json --overwrite` of another config replaced the plan of a run
    # still training: every checkpoint after it held the new plan beside weights of the old widths,
    # and neither export nor a resume could read them. `plan` locked --out's folder, not the run's.
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\noutput_dir: {tmp_path / 'run'}\n", max_cardinality=300)
    assert main(["plan", str(cfg)]) == 0
    plan = tmp_path / "run" / "plan" / "plan.json"
    planned = plan.read_bytes()
    with held_elsewhere(f"run_lock(load_job_config({str(cfg)!r}))") as training:
        capsys.readouterr()
        other = tmp_path / "other.yaml"
        other.write_text(cfg.read_text().replace("dim: 8", "dim: 16").replace(str(tmp_path / "run"),
                                                                              str(tmp_path / "elsewhere")))
        assert main(["plan", str(other), "--out", str(plan), "--overwrite"]) == 2
        assert f"{tmp_path / 'run'}: another embshard run is using it (pid {training} " in capsys.readouterr().err
    assert plan.read_bytes() == planned
    # A run whose output_dir lies inside another's (a search's retrain) locks its own: a `train`
    # of it that began while `plan` planned into it was let through (`plan` held the outer one).
    from embshard.cluster import cli as cli_module

    retrain = tmp_path / "retrain.yaml"
    retrain.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(tmp_path / "run" / "retrain")))
    planning, seen = cli_module._plan_into, {}

    def train_meanwhile(*args, **kwargs):
        seen["train"] = subprocess.run([sys.executable, "-c", "from embshard.cluster.run_lock import run_lock\n"
                                        "from embshard.config import load_job_config\n"
                                        f"with run_lock(load_job_config({str(retrain)!r})):\n"
                                        "    print('trained')\n"], capture_output=True, text=True, timeout=120)
        return planning(*args, **kwargs)

    monkeypatch.setattr(cli_module, "_plan_into", train_meanwhile)
    assert main(["plan", str(retrain)]) == 0
    assert f"{tmp_path / 'run' / 'retrain'}: another embshard run is using it" in seen["train"].stderr, seen


def over_a_finished_run(run: Path) -> str:
    """What `train`, `search` and `prune` say of an output_dir that holds a finished run."""
    return (f"output_dir {run}: holds a finished run (its summary.json) and it holds no checkpoint to resume, so this "
            "run would train from scratch over it; set another output_dir, or pass --overwrite to replace it")


def test_a_search_refuses_a_decisions_file_its_own_run_writes_and_a_finished_search(tmp_path, capsys, monkeypatch):
    # `--out RUN/summary.json` (or its log, plan, alpha history) said "decisions -> ..." while the
    # run's own file replaced the decisions, or the decisions replaced it; and a search into the
    # folder of a finished one (checkpoints off) replaced its decisions, summary, plan and history.
    import embshard.cluster.launch as launch

    run = tmp_path / "run"
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\n"
                                    f"output_dir: {run}\n", max_cardinality=300)
    for own in ("summary.json", "logs/embshard.log", "alpha_history.jsonl", "plan/plan.json", "checkpoints/x.json"):
        assert main(["search", "autodim", str(cfg), "--out", str(run / own), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"--out {run / own}: the search's own run writes {run / own.split('/')[0]}; give the decisions file "
            "another name")
    assert not run.exists()
    run.mkdir()
    (run / "summary.json").write_text('{"steps": 9}')  # a finished search's, no checkpoint kept
    monkeypatch.setattr(launch, "init_ray", lambda cfg: pytest.fail("trained over a finished search"))
    assert main(["search", "autodim", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().endswith(over_a_finished_run(run))
    assert (run / "summary.json").read_text() == '{"steps": 9}'
    # Its own decisions file is no such file, where the config names another one.
    cfg.write_text(cfg.read_text().replace("autodim:\n", f"autodim:\n  decisions: {tmp_path / 'd.json'}\n"))
    assert main(["search", "autodim", str(cfg), "--out", str(run / "decisions.json")]) == 2
    assert "holds a finished run" in capsys.readouterr().err  # refused for that alone


def test_a_search_checks_its_default_decisions_path_before_it_searches(tmp_path, capsys, monkeypatch):
    # Unnamed, <output_dir>/decisions.json was not checked: a user's file there was replaced, exit
    # 0, and a folder there was found only after the whole search ("Is a directory", of a temp file).
    import embshard.cluster.launch as launch

    run = tmp_path / "run"
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\n"
                                    f"output_dir: {run}\n", max_cardinality=300)
    monkeypatch.setattr(launch, "init_ray", lambda cfg: pytest.fail("searched before its decisions path was checked"))
    run.mkdir()
    (run / "decisions.json").write_text('{"my": "hand-tuned widths"}')
    assert main(["search", "autodim", str(cfg)]) == 2
    assert f"{run / 'decisions.json'}: " in capsys.readouterr().err
    assert (run / "decisions.json").read_text() == '{"my": "hand-tuned widths"}'
    (run / "decisions.json").unlink()
    (run / "decisions.json").mkdir()
    assert main(["search", "autodim", str(cfg)]) == 2
    assert f"{run / 'decisions.json'}: a directory" in capsys.readouterr().err


def test_a_search_whose_decisions_file_another_search_writes_is_refused(tmp_path, capsys):
    # Two searches with one --out both said they wrote it; the file held the last one's widths.
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\n"
                                    f"output_dir: {tmp_path / 'run'}\n", max_cardinality=300)
    out = tmp_path / "decisions" / "d.json"
    with held_elsewhere(f"file_lock(Path({str(out)!r}))") as searching:
        assert main(["search", "autodim", str(cfg), "--out", str(out)]) == 2
        assert f"{out}: another embshard process is writing it (pid {searching} " in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not out.exists()


def test_two_searches_write_two_decisions_files_of_one_folder_at_once(tmp_path):
    # The search locked the whole folder of its decisions file: a second search writing another
    # file there (a folder of decisions, one per dataset) was refused.
    from embshard.cluster.run_lock import file_lock

    folder = tmp_path / "decisions"
    with held_elsewhere(f"file_lock(Path({str(folder / 'criteo.json')!r}))"), file_lock(folder / "avazu.json"):
        assert folder.is_dir()
    assert folder.is_dir()  # the other search's lock file is still there


def _mde_within_on_two_datasets(tmp_path: Path) -> Path:
    """A config of plans that reorder rows, and two datasets (data0, data1) whose rows rank apart."""
    from embshard.datasets.synth import synthesize

    cfg = tmp_path / "c.yaml"
    cfg.write_text("embeddings:\n  policy: mde\n  dim: 16\n  mde:\n    mode: within\n    blocks: 2\n")
    for seed in (0, 1):
        synthesize(tmp_path / f"data{seed}", rows=3000, seed=seed, max_cardinality=200)
    return cfg


def test_a_plan_never_swaps_the_remap_another_plan_of_its_folder_reads(tmp_path, capsys):
    # Remap files were written into --out's folder while planning: a second plan there, of other
    # data, gave the first plan its row order, and both loaded without a word. Remaps are named by
    # their rows now, so both plans keep their own.
    from embshard.planner.pipeline import PlanBundle

    cfg = _mde_within_on_two_datasets(tmp_path)
    plans = tmp_path / "plans"

    def plan(data: str, out: str, *flags: str) -> dict[str, np.ndarray]:
        assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / data}", "--out", str(plans / out),
                     *flags]) == 0
        return PlanBundle.load(plans / out, "rowwise_adagrad").id_maps()

    def remaps() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in plans.glob("*.remap.npy")}

    a = plan("data0", "a.json")
    of_a = remaps()
    assert of_a, "an MDE plan within tables reorders rows"
    b = plan("data1", "b.json")
    assert any(not np.array_equal(a[f], b[f]) for f in a), "the two datasets' rows rank differently"
    assert remaps().items() >= of_a.items()  # a.json's files are as they were, and it reads them
    assert all(np.array_equal(PlanBundle.load(plans / "a.json", "rowwise_adagrad").id_maps()[f], a[f]) for f in a)
    # Replacing a.json (with --overwrite) by b.json's plan: its own remaps go with it, b.json's stay,
    # and so does one a decisions file there reads.
    kept = sorted(of_a)[0]
    (plans / "decisions.json").write_text(json.dumps({"version": 1, "method": "m", "base_dim": 16,
                                                      "tables": {"C1": {"dim": 16, "remap": kept}}}))
    assert plan("data1", "a.json", "--overwrite").keys() == b.keys()
    assert set(remaps()) == set(of_b := {n for n in remaps() if n not in of_a}) | {kept} and of_b
    assert sorted(p.name for p in plans.iterdir() if not p.name.endswith(".remap.npy")) == \
        ["a.json", "b.json", "decisions.json"]
    capsys.readouterr()


def test_replacing_a_plan_deletes_only_its_own_remap_files(tmp_path, capsys):
    # The names came from the plan replaced: a hand-edited one's "../notes" or an absolute path was
    # deleted, and a reader's "./t_C2.<digest>.remap.npy" did not keep that file.
    cfg = _mde_within_on_two_datasets(tmp_path)
    plans = tmp_path / "plans"

    def plan(*flags: str) -> None:
        assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data0'}", "--out", str(plans / "a.json"),
                     *flags]) == 0

    plan()
    ours = sorted(p.name for p in plans.glob("*.remap.npy"))
    raw = json.loads((plans / "a.json").read_text())
    precious = [tmp_path / "precious_abs.txt", tmp_path / "precious_rel.txt"]
    for path in precious:
        path.write_text("keep me")
    tables = raw["dimension_plan"]["tables"]
    tables[0]["remap"], tables[1]["remap"] = str(precious[0]), "../precious_rel.txt"
    (plans / "a.json").write_text(json.dumps(raw))
    (plans / "reader.json").write_text(json.dumps({"version": 1, "method": "m", "base_dim": 16,
                                                   "tables": {"C1": {"dim": 16, "remap": f"./{ours[-1]}"}}}))
    plan("--set", "embeddings.policy=uniform", "--overwrite")
    assert all(path.read_text() == "keep me" for path in precious)
    named = {t["remap"] for t in tables if t.get("remap")}
    assert ours[-1] in named and len(named & set(ours)) > 1
    # Those a.json named went, but for the one reader.json reads; the two it no longer named stayed.
    assert sorted(p.name for p in plans.glob("*.remap.npy")) == sorted(set(ours) - named | {ours[-1]})
    capsys.readouterr()


def test_a_runs_readers_share_one_copy_of_its_remaps(tmp_path, capsys):
    # Each reader read the remap files again: the test reader, made at the start with the others,
    # held a third copy for the whole training (800 MB each for a table of 100M rows).
    from embshard.config import load_job_config
    from embshard.planner.pipeline import PlanBundle
    from embshard.trainer.loop import make_reader

    cfg = _mde_within_on_two_datasets(tmp_path)
    assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data0'}", "--out", str(tmp_path / "p")]) == 0
    bundle = PlanBundle.load(tmp_path / "p", "rowwise_adagrad")
    job = load_job_config(cfg, [f"data.path={tmp_path / 'data0'}"])
    readers = [make_reader(job, bundle, split, 0, 1) for split in ("train", "valid", "test")]
    assert readers[0].id_maps and all(
        np.shares_memory(r.id_maps[f], readers[0].id_maps[f]) for r in readers[1:] for f in readers[0].id_maps)
    capsys.readouterr()


def test_a_link_where_a_plan_goes_is_refused(tmp_path, capsys):
    # A dangling one became a file of its own, without --overwrite.
    cfg = _config_on_data(tmp_path, "embeddings:\n  dim: 8\n", max_cardinality=300)
    link = tmp_path / "p.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    assert main(["plan", str(cfg), "--out", str(link)]) == 2
    assert f"{link}: a symbolic link; give the file it points to" in capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "elsewhere.json").exists()


def test_a_plan_of_any_suffix_case_keeps_its_remaps_and_its_errors_name_it(tmp_path, capsys):
    # `plan --out X.JSON` is a plan file, but the folder's readers of remaps were *.json alone:
    # replacing another plan there deleted X.JSON's remap files. And a hand-edited plan's errors
    # named plan.json, or no file at all.
    from embshard.errors import PlanError
    from embshard.planner.pipeline import PlanBundle

    cfg = _mde_within_on_two_datasets(tmp_path)
    plans = tmp_path / "plans"
    for name in ("X.JSON", "y.json"):
        assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data0'}", "--out", str(plans / name)]) == 0
    assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data0'}", "--set", "embeddings.policy=uniform",
                 "--out", str(plans / "y.json"), "--overwrite"]) == 0
    assert PlanBundle.load(plans / "X.JSON", "rowwise_adagrad").id_maps()
    raw = json.loads((plans / "X.JSON").read_text())
    raw["shard_plan"]["topology"]["world_size"] = 0
    (plans / "Z.JSON").write_text(json.dumps(raw))
    with pytest.raises(PlanError, match=rf"^{plans / 'Z.JSON'}: world_size: must be >= 1, got 0$"):
        PlanBundle.load(plans / "Z.JSON", "rowwise_adagrad")
    (plans / "X.JSON").rename(plans / "x.json")
    for remap in plans.glob("*.remap.npy"):
        remap.unlink()
    with pytest.raises(PlanError, match=rf"^{plans / 'x.json'}: its remap file .* is not beside it"):
        PlanBundle.load(plans / "x.json", "rowwise_adagrad")
    capsys.readouterr()


def test_a_plan_replaced_midway_keeps_reading_its_own_rows(tmp_path, monkeypatch):
    # `plan --out DIR --overwrite` wrote the new remap files over the old ones, then the plan file:
    # stopped between the two, the old plan read the new plan's row order, silently.
    from embshard.planner.pipeline import PlanBundle

    cfg = _mde_within_on_two_datasets(tmp_path)
    out = tmp_path / "plan"
    assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data0'}", "--out", str(out)]) == 0
    before = PlanBundle.load(out, "rowwise_adagrad").id_maps()
    (out / "t_C1.remap.npy").write_text("my notes")  # a file of the user's, of the old remap name

    def stopped(self, name="plan.json"):
        raise KeyboardInterrupt

    monkeypatch.setattr(PlanBundle, "save", stopped)
    assert main(["plan", str(cfg), "--set", f"data.path={tmp_path / 'data1'}", "--out", str(out),
                 "--overwrite"]) == EXIT_INTERRUPTED
    after = PlanBundle.load(out, "rowwise_adagrad").id_maps()
    assert all(np.array_equal(after[f], before[f]) for f in before)
    assert (out / "t_C1.remap.npy").read_text() == "my notes"
    assert not [p for p in out.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")]


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """The console script's first second is spent importing the command line; a Ctrl-C there
    was a traceback through importlib."""
    import importlib

    import tomllib

    class CtrlCWhileImporting:
        def find_spec(self, name, path=None, target=None):
            if name == "embshard.cluster.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "embshard.cluster.cli")
    monkeypatch.setattr(sys, "meta_path", [CtrlCWhileImporting(), *sys.meta_path])
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, function = declared["project"]["scripts"]["embshard"].split(":")
    assert getattr(importlib.import_module(module), function)() == 130
    assert capsys.readouterr().err == "embshard: interrupted\n"


def test_a_cluster_address_where_nothing_listens_is_one_line_at_once(monkeypatch):
    # Ray retried it for over two minutes, its C++ warnings on the console, before the one line.
    import socket

    import ray

    from embshard.cluster.launch import init_ray
    from embshard.config import ClusterConfig, JobConfig
    from embshard.errors import ConfigError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # closed again: nothing listens there
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was asked to join"))
    for given in (address, f"ray://{address}"):
        with pytest.raises(ConfigError, match=rf"^cluster.address {given}: no Ray answers there \(Connection "
                                              r"refused\); start the cluster"):
            init_ray(JobConfig(cluster=ClusterConfig(address=given)))
    # The dashboard's address, what `submit` takes, was read as a host named "http".
    with pytest.raises(ConfigError, match=r"^cluster.address http://127.0.0.1:8265: the Ray dashboard's HTTP "
                                          r"address, which `embshard submit` takes; a run joins the cluster at"):
        init_ray(JobConfig(cluster=ClusterConfig(address="http://127.0.0.1:8265")))


def test_a_local_cluster_whose_workers_this_machine_cannot_hold_is_refused(monkeypatch, tmp_path):
    # `--workers 1000` on a laptop started a local cluster sized for them, and spawned workers
    # (each a process that imports torch and TorchRec) until the machine ran out of memory.
    import ray

    from embshard.cluster import launch
    from embshard.cluster.launch import init_ray
    from embshard.config import ClusterConfig, JobConfig
    from embshard.errors import ConfigError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a local cluster was started"))
    monkeypatch.setattr(launch, "PROC_CGROUP", tmp_path / "none")  # this machine's own limits, if any, left out
    machine = {"SC_PHYS_PAGES": 4 << 20, "SC_PAGE_SIZE": 4096}  # 16 GiB
    monkeypatch.setattr(os, "sysconf", lambda name: machine[name])
    with pytest.raises(ConfigError, match=r"^cluster\.workers: a local cluster of 1,000 workers needs about 429\.7 GiB "
                                          r"for their processes alone \(each imports torch and TorchRec, about 440 "
                                          r"MiB\), and this machine has 16\.0 GiB; use fewer workers, or join a "
                                          r"cluster \(--address\)$"):
        init_ray(JobConfig(cluster=ClusterConfig(workers=1000)))
    with pytest.raises(ConfigError, match=r"a local cluster of 40 workers \(4 trials of 10 at once\) needs"):
        init_ray(JobConfig(cluster=ClusterConfig(workers=10)), jobs=4)


@pytest.mark.parametrize("version", ["v1", "v2", "container"])
def test_a_control_group_s_memory_limit_is_the_machine_s_memory(tmp_path, monkeypatch, version):
    # In a container or pod the check read the host's physical memory, so a local cluster past the
    # container's limit started, and the kernel killed its workers.
    from embshard.cluster import launch
    from embshard.config import ClusterConfig, JobConfig
    from embshard.errors import ConfigError

    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 4 << 20, "SC_PAGE_SIZE": 4096}[name])  # 16 GiB
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/pods/job/worker\n")
        root = tmp_path / "fs"
        (root / "pods/job/worker").mkdir(parents=True)
        (root / "pods/job/worker/memory.max").write_text("max\n")
        (root / "pods/job/memory.max").write_text(f"{2 << 30}\n")  # the pod's 2 GiB holds its groups below
        limited = root / "pods/job"
    elif version == "container":
        # Its own cgroup namespace names the host's path, absent below its root, which holds the limit.
        proc.write_text("a line of another format\n0::/../system.slice/docker-abc.scope\n")
        root = tmp_path / "fs"
        root.mkdir()
        (root / "memory.max").write_text(f"{2 << 30}\n")
        limited = root
    else:
        proc.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n")
        root = tmp_path / "fs"
        (root / "memory/docker/abc").mkdir(parents=True)
        (root / "memory/docker/abc/memory.limit_in_bytes").write_text(f"{2 << 30}\n")
        (root / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
        limited = root / "memory/docker/abc"
    monkeypatch.setattr(launch, "PROC_CGROUP", proc)
    monkeypatch.setattr(launch, "CGROUP_ROOT", root)
    assert launch.memory_limit() == (2 << 30, f"this process's control group ({limited})")
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.ray, "init", lambda *a, **k: pytest.fail("a local cluster was started"))
    with pytest.raises(ConfigError, match=rf"a local cluster of 5 workers needs about 2\.1 GiB .*, and this process's "
                                          rf"control group \({re.escape(str(limited))}\) has 2\.0 GiB; use fewer"):
        launch.init_ray(JobConfig(cluster=ClusterConfig(workers=5)))
    launch._check_machine_holds(4, 1)  # 1.7 GiB fits


def test_a_damaged_or_foreign_plan_file_is_one_line(tmp_path, capsys):
    # A plan file (edited, copied without its folder, made for other data) that trained with exit 0
    # (a data-parallel table on CPU never updates; a feature without a table was left out) or
    # stopped with a traceback (a rank outside the world, a remap file not copied).
    import json

    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=300)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\ncluster:\n  workers: 2\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    good = tmp_path / "good" / "plan.json"
    assert main(["plan", str(cfg), "--out", str(good)]) == 0
    assert main(["plan", str(cfg), "--out", str(tmp_path / "mde"), "--set", "embeddings.policy=mde",
                 "--set", "embeddings.mde.mode=within", "--set", "embeddings.mde.blocks=2"]) == 0
    assert main(["plan", str(cfg), "--out", str(tmp_path / "other-method.json"), "--method", "autodim",
                 "--set", "autodim.candidates=[4,8]"]) == 0
    capsys.readouterr()
    raw = json.loads(good.read_text())
    first = next(iter(raw["shard_plan"]["tables"]))

    def edited(name: str, change) -> Path:
        copy = json.loads(json.dumps(raw))
        change(copy)
        path = tmp_path / name / "plan.json"
        path.parent.mkdir()
        path.write_text(json.dumps(copy))
        return path

    def drop_first_table(p):
        p["dimension_plan"]["tables"] = p["dimension_plan"]["tables"][1:]
        del p["shard_plan"]["tables"][first]

    copied_alone = tmp_path / "alone" / "plan.json"
    copied_alone.parent.mkdir()
    copied_alone.write_text((tmp_path / "mde" / "plan.json").read_text())
    cases = [
        (edited("dp", lambda p: p["shard_plan"]["tables"][first].update(
            sharding_type="data_parallel", compute_kernel="dense", ranks=[0, 1], shards=None)),
         rf"{first}: sharding type 'data_parallel' is not one cpu ranks train pooled tables with"),
        (edited("kernel", lambda p: p["shard_plan"]["tables"][first].update(compute_kernel="quantum")),
         r"unknown compute kernel 'quantum'"),
        (edited("rank", lambda p: p["shard_plan"]["tables"][first]["shards"][0].update(placement="rank:5/cpu")),
         r"placed on rank 5, outside the plan's 2 ranks"),
        (edited("shard", lambda p: p["shard_plan"]["tables"][first]["shards"][0]["sizes"].__setitem__(0, 1)),
         rf"{first}: its shards cover"),
        (edited("missing", drop_first_table), r"the data's feature 'C1' has no table in the plan"),
        # its memory check passed against a million GB per rank
        (edited("memory", lambda p: p["shard_plan"]["topology"].update(device_memory_gb=1e6)),
         r"shard plan was made for [\d.]+ TiB per rank, this run's ranks have 16\.0 GiB"),
        (copied_alone,
         r"its remap file t_C\d+\.[0-9a-f]{16}\.remap\.npy is not beside it; copy the plan's whole folder"),
        # an MDE plan trained under the uniform config, recorded as uniform in every checkpoint
        (tmp_path / "mde" / "plan.json",
         r"mde.plan\.json was made for another model config: embeddings\.mde\.blocks \(plan 2, config 8\), "
         r"embeddings\.mde\.mode \(plan 'within', config 'across'\), embeddings\.policy \(plan 'mde', config "
         r"'uniform'\); train it with the config it was made with, or make a plan for this one with `embshard plan`"),
        (tmp_path / "other-method.json", r"autodim\.candidates \(plan \[4, 8\], config None\)"),
    ]
    for plan_file, message in cases:
        assert main(["train", str(cfg), "--set", f"sharding.plan_file={plan_file}"]) == 2, plan_file
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (plan_file, err)
    # the same config, trained by another method than planned it (AutoDim's search plan)
    assert main(["train", str(cfg), "--set", f"sharding.plan_file={tmp_path / 'other-method.json'}",
                 "--set", "autodim.candidates=[4,8]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"was made for method 'autodim', this run trains 'uniform'", err[0]), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_writes_nothing_it_refuses_and_never_over_a_file_not_a_plan(tmp_path, capsys):
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=300)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\noutput_dir: {tmp_path / 'run'}\n")
    # A plan that does not fit was written all the same (and replaced a good one with --overwrite).
    out = tmp_path / "p.json"
    assert main(["plan", str(cfg), "--out", str(out)]) == 0
    before = out.read_bytes()
    assert main(["plan", str(cfg), "--out", str(out), "--overwrite", "--device-memory-gb", "0.000001"]) == 2
    err = capsys.readouterr().err
    assert out.read_bytes() == before
    # Sizes in units that keep their digits: it said "need 0.00 GiB, ... short by 0.00 GiB".
    assert "0.00 GiB" not in err and re.search(r"short by [\d.]+ (KiB|MiB)", err), err
    # Without --out the run's plan folder: a plan there is replaced, another file never.
    notes = tmp_path / "run" / "plan" / "plan.json"
    notes.parent.mkdir(parents=True)
    notes.write_text('{"my": "precious notes"}')
    assert main(["plan", str(cfg)]) == 2
    assert "exists and is no plan" in capsys.readouterr().err and "precious" in notes.read_text()
    notes.unlink()
    assert main(["plan", str(cfg)]) == 0 and main(["plan", str(cfg)]) == 0
    # A FIFO held the check's read open for good, and a socket's read was a traceback.
    fifo, sock = tmp_path / "f.json", tmp_path / "s.json"
    os.mkfifo(fifo)
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(sock))
        for path in (fifo, sock):
            assert main(["plan", str(cfg), "--out", str(path), "--overwrite"]) == 2
            assert capsys.readouterr().err.strip() == (
                f"embshard: error: {path}: exists and is no plan (not a regular file); refusing to replace it, even "
                "with --overwrite")
    # a plan file in the config is not what `plan` reads: said, not silently passed over
    assert main(["plan", str(cfg), "--set", f"sharding.plan_file={out}", "--out", str(tmp_path / "q.json")]) == 0
    assert f"note: sharding.plan_file {out} is what `train` trains; `plan` makes a new plan" in capsys.readouterr().out
    for bad, said in (("nan", "nan"), ("inf", "inf"), ("-1", "-1.0"), ("1e300", "1e+300")):  # 1e300: a traceback
        with pytest.raises(SystemExit) as exited:
            main(["plan", str(cfg), "--device-memory-gb", bad])
        assert exited.value.code == 2
        assert (f"argument --device-memory-gb: must be a positive number of GiB up to 1,048,576, got {said}"
                in capsys.readouterr().err)


def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    import numpy as np

    from embshard.datasets.synth import synthesize
    from embshard.planner import pipeline

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=300)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\n")
    # numpy's own error for an array the machine cannot hold (a 1e9-row table's counts on a laptop)
    monkeypatch.setattr(pipeline, "block_pooling_factors", lambda *a, **k: np.empty(2**47, dtype=np.int8))
    capsys.readouterr()
    assert main(["plan", str(cfg), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("embshard: error: out of memory (MemoryError: Unable to allocate 128. TiB"), err


def test_checkpoints_where_fsspec_has_no_client_are_refused_before_training(tmp_path, capsys):
    # gs:// passed the bucket check (pyarrow serves it) and DCP, through fsspec, found no gcsfs at
    # the first save: after the run had trained.
    import importlib.util

    from embshard.datasets.synth import synthesize

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: fsspec serves gs://")
    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\ncluster:\n  workers: 1\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    capsys.readouterr()
    for argv, field in ((["train", str(cfg), "--set", "checkpoint.dir=gs://bucket/ck"], "checkpoint.dir"),
                        (["train", str(cfg), "--set", "checkpoint.resume=gs://bucket/ck"], "checkpoint.resume"),
                        (["export", "gs://bucket/ck", "--out", str(tmp_path / "serving")], "checkpoint")):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"embshard: error: {field} gs://bucket/ck: checkpoints are read and written there through "
                       "fsspec, which cannot: ImportError: Please install gcsfs to access Google Storage"], err
    assert not (tmp_path / "run" / "ray").exists() and not (tmp_path / "serving").exists()


def test_the_outputs_line_names_no_checkpoint_folder_a_run_did_not_write():
    from embshard.cluster.cli import outputs_line
    from embshard.config import CheckpointConfig, JobConfig

    assert "checkpoints outputs/x/checkpoints," in outputs_line(JobConfig(output_dir="outputs/x"), "r")
    off = JobConfig(output_dir="outputs/x", checkpoint=CheckpointConfig(enabled=False))
    assert "checkpoints none (checkpoint.enabled is false)," in outputs_line(off, "r")
    assert outputs_line(off, "r").endswith(", log outputs/x/logs/embshard.log")  # the README's promise


def test_main_runs_off_the_main_thread(tmp_path, capsys):
    # Putting SIGTERM's handler back raised ValueError there (signals are the main thread's).
    import threading

    result = []
    worker = threading.Thread(target=lambda: result.append(main(["plan", str(tmp_path / "none.yaml")])))
    worker.start()
    worker.join()
    assert result == [2] and "config file not found" in capsys.readouterr().err


def test_nothing_is_written_inside_a_dataset(tmp_path, capsys):
    # A synth, plan, prune record, sweep or run written inside a dataset folder went through, and
    # the dataset could then never be replaced ("holds 'sub', which no dataset holds").
    from embshard.cluster.launch import plan_for_training
    from embshard.cluster.sweep_plan import SweepSpec
    from embshard.cluster.sweep_run import _claim_folder
    from embshard.config import load_job_config
    from embshard.datasets.synth import synthesize
    from embshard.errors import ConfigError
    from embshard.trainer.pep import check_pep_out

    data = tmp_path / "data"
    synthesize(data, rows=2000, seed=0, max_cardinality=100)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\n")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for argv, message in (
        (["data", "synth", "--out", str(data / "sub"), "--rows", "100"], f"--out {data / 'sub'}: inside the dataset"),
        (["data", "synth", "--out", str(data / "train" / "x"), "--rows", "100"], "inside the dataset"),
        (["plan", str(config), "--out", str(data)], f"plan {data / 'plan.json'}: inside the dataset {data}"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    cfg = load_job_config(config, [f"output_dir={data / 'run'}"])
    with pytest.raises(ConfigError, match=rf"^output_dir {data / 'run'}: inside the dataset {data}"):
        plan_for_training(cfg)
    with pytest.raises(ConfigError, match=rf"^pep.out {data}: inside the dataset {data}"):
        check_pep_out(load_job_config(config, [f"pep.out={data}"]))
    with pytest.raises(ConfigError, match=rf"^--out {data / 'sweep'}: inside the dataset {data}"):
        _claim_folder(data / "sweep", data / "sweep", SweepSpec(["uniform"], [1.0], 1), cfg, False, "a" * 64)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    # Another tool's dataset.json makes no embshard dataset of its folder.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "dataset.json").write_text('{"name": "not ours"}')
    assert main(["data", "synth", "--out", str(tmp_path / "theirs" / "ours"), "--rows", "100"]) == 0


def test_output_read_by_a_reader_that_stops_is_no_traceback(tmp_path):
    # `embshard config --reference | head -c 0`: a BrokenPipeError traceback, exit 1.
    import subprocess
    import sys
    from pathlib import Path

    embshard = Path(sys.executable).parent / "embshard"
    proc = subprocess.Popen([str(embshard), "config", "--reference"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


def test_an_empty_resume_flag_is_one_line(tmp_path, capsys):
    # `--resume "$CKPT"` with CKPT unset trained from scratch without a word.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg), "--resume", ""]) == 2
    assert capsys.readouterr().err.strip() == "embshard: error: --resume: an empty path (an unset shell variable?)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["plan", "c.yaml"], ["search", "autodim", "c.yaml"], ["export", "ck"],
                                  ["sweep", "c.yaml"], ["sweep-merge", "a", "b"], ["data", "synth"],
                                  ["data", "convert", "criteo", "train.txt"]])
def test_an_empty_out_flag_is_refused_not_read_as_the_current_folder(argv, capsys):
    # `--out ''` was the current folder: "/home/me: a directory ...", or a sweep (or, in an empty
    # folder, a dataset) written into it.
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", ""])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: argument --out: an empty path (an unset shell variable?)")


@pytest.mark.parametrize("argv", [["plan", "c.yaml"], ["search", "autodim", "c.yaml"], ["export", "ck"],
                                  ["sweep", "c.yaml"], ["sweep-merge", "a", "b"], ["data", "synth"],
                                  ["data", "convert", "criteo", "train.txt"]])
def test_an_out_that_is_not_utf8_is_refused_before_any_work(argv, capsys):
    # A name of other bytes was a UnicodeEncodeError traceback, from the staging folder's name or,
    # in a parent folder's, from pyarrow after the whole conversion.
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", os.fsdecode(b"/tmp/d\xff/c_\xffx")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: argument --out: /tmp/d\\xff/c_\\xffx: not valid UTF-8; embshard writes only under paths in UTF-8 "
        "(Parquet and object stores take no other): rename it")


def test_an_empty_method_is_refused_not_read_as_the_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "c.yaml", "--method", ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: argument --method: an empty name (an unset shell variable?)")


@pytest.mark.parametrize("argv, name", [(["data", "convert", "criteo", "", "--out", "d"], "SRC"),
                                        (["data", "profile", ""], "DIR")])
def test_an_empty_data_path_is_refused_not_read_as_the_current_folder(argv, name, capsys):
    # `data profile ''` wrote profile/ into the current folder; `convert criteo ''` read every file there.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: argument {name}: an empty path (an unset shell variable?)")


def test_an_out_that_ends_with_a_slash_names_a_folder(tmp_path, capsys):
    # `plan --out x.json/` wrote the file x.json (Path drops the slash), and `search autodim
    # --out d/` would have written its decisions as the file d.
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\n"
                                    f"output_dir: {tmp_path / 'run'}\n", max_cardinality=50)
    assert main(["plan", str(cfg), "--out", f"{tmp_path / 'x.json'}/"]) == 0
    assert (tmp_path / "x.json" / "plan.json").is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["search", "autodim", str(cfg), "--out", f"{tmp_path / 'd'}/"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"argument --out: {tmp_path / 'd'}/: ends with '/', so it names a folder; name the file to write")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("verb", [["train"], ["search", "autodim"], ["prune", "pep"]])
def test_a_run_whose_workers_were_stopped_ends_interrupted_not_done(verb, tmp_path, capsys, monkeypatch):
    # Workers signalled without the driver's asking (a pod's SIGTERM) stopped the run at step 3:
    # `train` and `prune pep` printed its result and ended 0, so a job system took a part of a run
    # for the whole (and `search autodim` said so only through a check of its own).
    # Only Ray's part is left out: the workers' summary is what a stopped run's rank 0 writes.
    import embshard.cluster.launch as launch

    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\nautodim:\n  candidates: [4, 8]\n"
                                    f"output_dir: {tmp_path / 'run'}\n", max_cardinality=300)

    def stopped_workers(cfg, method, registered, output) -> bool:
        summary = {"steps": 3, "preempted": True, "checkpoint": str(output / "ckpt" / "step-000003"),
                   "decisions": None, "pep": {}}
        (output / launch.SUMMARY_FILE).write_text(json.dumps(summary))
        return False  # the driver asked for no stop

    monkeypatch.setattr(launch, "init_ray", lambda cfg: None)
    monkeypatch.setattr(launch.console, "route_worker_output", lambda: None)
    monkeypatch.setattr(launch, "_fit", stopped_workers)
    assert main([*verb, str(cfg)]) == 130
    out, err = capsys.readouterr()
    assert "validation" not in out and "decisions ->" not in out
    assert err.strip().splitlines()[-1] == (
        f"embshard: stopped by SIGTERM to its workers (a preempted pod?) after step 3, before its end; "
        f"checkpoint {tmp_path / 'run' / 'ckpt' / 'step-000003'}; run the same command again to continue")
    # Run again as it says: its summary is of a stopped run, no finished one to keep (it was refused).
    assert main([*verb, str(cfg)]) == 130


def test_a_prune_run_refuses_to_train_over_a_finished_run(tmp_path, capsys, monkeypatch):
    # Into a finished `train` run's folder it replaced the run's summary and plan, exit 0.
    import embshard.cluster.launch as launch

    run = tmp_path / "run"
    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\noutput_dir: {run}\n", max_cardinality=300)
    run.mkdir()
    (run / "summary.json").write_text('{"steps": 9}')
    monkeypatch.setattr(launch, "init_ray", lambda cfg: pytest.fail("pruned over a finished run"))
    assert main(["prune", "pep", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().endswith(over_a_finished_run(run))
    assert (run / "summary.json").read_text() == '{"steps": 9}'


def test_a_prune_run_that_missed_a_target_ends_with_an_error(tmp_path, capsys, monkeypatch):
    # `prune pep` said "target 0.05: not reached" among its other lines and ended 0, so a script's
    # next step (a retrain on target-0.05's decisions) failed later on a file never written.
    # Only Ray's part is left out: the workers' summary is what rank 0 of such a run writes.
    import embshard.cluster.launch as launch

    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\noutput_dir: {tmp_path / 'run'}\n",
                          max_cardinality=300)
    reached = {"0.5": {"step": 40, "nonzero": 1200, "dir": str(tmp_path / "run" / "pep" / "target-0.5")}}

    def pruned(missed):
        def fit(cfg, method, registered, output) -> bool:
            summary = {"steps": 90, "valid_auc": 0.61, "pep": {"reached": reached, "missed": missed,
                                                                "kept_fraction": 0.31}}
            (output / launch.SUMMARY_FILE).write_text(json.dumps(summary))
            return False
        return fit

    monkeypatch.setattr(launch, "init_ray", lambda cfg: None)
    monkeypatch.setattr(launch.console, "route_worker_output", lambda: None)
    monkeypatch.setattr(launch, "_fit", pruned([0.05, 0.01]))
    assert main(["prune", "pep", str(cfg), "--targets", "0.5,0.05,0.01"]) == 2
    out, err = capsys.readouterr()
    assert "target 0.5: reached at step 40 (1,200 non-zero)" in out
    assert err.strip().splitlines()[-1] == (
        "embshard: error: targets 0.05, 0.01 not reached in 90 steps (kept 0.310 of the entries at the end); "
        "train longer (train.epochs), or raise pep.weight_decay / pep.threshold_lr (what lifts the "
        "thresholds); the 1 reached are written")
    monkeypatch.setattr(launch, "_fit", pruned([]))
    # Run again as it said (train longer): a run short of a target is no finished one to keep.
    assert main(["prune", "pep", str(cfg), "--targets", "0.5"]) == 0


def test_targets_one_count_passed_together_are_warned_of(tmp_path, capsys, monkeypatch):
    # A prune run whose thresholds rose fast passed 0.5, 0.2 and 0.1 between two counts: the three
    # decisions files were one plan under three names, and a sweep over them trained it three times.
    import embshard.cluster.launch as launch

    cfg = _config_on_data(tmp_path, f"embeddings:\n  dim: 8\noutput_dir: {tmp_path / 'run'}\n",
                          max_cardinality=300)
    at = {"0.5": 20, "0.2": 20, "0.1": 20, "0.05": 40, "0.03": None, "0.02": None}  # None: recorded before steps were
    reached = {t: {"step": step, "nonzero": 100 * (step or 1), "dir": str(tmp_path / f"target-{t}")}
               for t, step in at.items()}

    def fit(cfg, method, registered, output) -> bool:
        summary = {"steps": 90, "valid_auc": 0.61, "pep": {"reached": reached, "missed": [], "kept_fraction": 0.04}}
        (output / launch.SUMMARY_FILE).write_text(json.dumps(summary))
        return False

    monkeypatch.setattr(launch, "init_ray", lambda cfg: None)
    monkeypatch.setattr(launch.console, "route_worker_output", lambda: None)
    monkeypatch.setattr(launch, "_fit", fit)
    assert main(["prune", "pep", str(cfg), "--targets", "0.5,0.2,0.1,0.05,0.03,0.02"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: targets 0.5, 0.2, 0.1 were passed by one count (step 20, 2,000 non-zero), so "
                        "their masks and decisions are the same; count more often (pep.count_every, now 20) or prune "
                        "more slowly (pep.threshold_lr, pep.weight_decay) to tell them apart"]


@pytest.mark.parametrize("tables, shown", [
    ("[" + ", ".join(["1"] * 200_000) + "]", r"\.\.\. \([\d,]+ more characters\)$"),
    ('{"C1\\nembshard: ok: planned": {"dim": 8}}', r"tables\.C1\\nembshard: ok: planned: dataset"),
])
def test_an_error_about_a_files_value_stays_one_readable_line(tmp_path, capsys, tables, shown):
    # A decisions file's 200,000-entry list was echoed whole (a line of 600 KB), and a table key
    # with a line break in it started a second line that read like one of embshard's own.
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "data", rows=1000, seed=0, max_cardinality=50)
    decisions = tmp_path / "d.json"
    decisions.write_text(f'{{"version": 1, "method": "m", "base_dim": 16, "tables": {tables}}}')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path / 'data'}}}\nembeddings: {{policy: decisions, dim: 16, "
                   f"decisions: {decisions}}}\noutput_dir: {tmp_path / 'run'}\n")
    capsys.readouterr()
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embshard: error: ") and len(err) < 2_200, err[:300]
    assert re.search(shown, err.strip()), err[:300]


def test_an_out_no_folder_can_be_made_in_or_a_loop_of_links_is_one_line(tmp_path, capsys):
    # Both were tracebacks: FileNotFoundError from the folder lock's mkdir (/proc takes no folder),
    # and pathlib's "RuntimeError: Symlink loop from ..." where --out was resolved.
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "data", rows=1000, seed=0, max_cardinality=50)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path / 'data'}}}\noutput_dir: {tmp_path / 'run'}\n")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    capsys.readouterr()
    for out, said in (("/proc/embshard-test", r"/proc/embshard-test: no folder can be created there"),
                      ("/proc/embshard-test.json", r"/proc: no file can be created there"),
                      (str(tmp_path / "loop1"), r"loop1/plan\.json: a loop of symbolic links")):
        assert main(["plan", str(cfg), "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(r"^embshard: error: .*" + said, err), err


def test_sigterm_while_the_command_line_loads_is_said_as_an_interrupt(tmp_path):
    # Before the command's own handler was in place (its first second), SIGTERM's default ended
    # the process without a word. The load is held at the CLI's module until the signal comes.
    hold = ("import sys, time\n"
            "class Hold:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'embshard.cluster.cli':\n"
            "            print('loading', flush=True)\n"
            "            time.sleep(60)\n"
            "sys.meta_path.insert(0, Hold())\n"
            "from embshard.cluster.entry import main\n"
            "raise SystemExit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "loading\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "embshard: interrupted"
    # Once the command is done, a stop during the interpreter's exit (Ray's shutdown, atexit
    # callbacks) ends the process at once with the command's status: as KeyboardInterrupt it
    # printed a traceback and exited 0, as the signal's default a finished export exited 130.
    for command, status in (("--help", 0), ("--no-such-flag", 2)):
        for stop in ("SIGINT", "SIGTERM"):
            after = ("import os, signal, time\n"
                     "from embshard.cluster.entry import main\n"
                     "try:\n"
                     "    main()\n"
                     "finally:\n"
                     f"    os.kill(os.getpid(), signal.{stop})\n"
                     "    time.sleep(30)\n")
            done = subprocess.run([sys.executable, "-c", after, command], capture_output=True, text=True, timeout=120)
            assert done.returncode == status and "Traceback" not in done.stderr, (stop, done.returncode, done.stderr)


def test_a_plan_of_other_decisions_than_the_file_names_now_is_refused(tmp_path, capsys):
    # A resume (or a plan file) of decisions d1 with embeddings.decisions now holding d2 trained
    # d1's widths, exit 0, while every checkpoint recorded the config that names d2.
    from embshard.cluster.launch import plan_for_training
    from embshard.config import load_job_config
    from embshard.datasets.synth import synthesize

    synthesize(tmp_path / "data", rows=1000, seed=0, max_cardinality=50)
    decisions = tmp_path / "d.json"

    def write(c2: int) -> None:
        tables = {f"C{i}": {"dim": c2 if i == 2 else 16} for i in range(1, 27)}
        decisions.write_text(json.dumps({"version": 1, "method": "m", "base_dim": 16, "tables": tables}))

    write(8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path / 'data'}}}\nembeddings: {{policy: decisions, dim: 16, "
                   f"decisions: {decisions}}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["plan", str(cfg), "--out", str(tmp_path / "p.json")]) == 0
    run = load_job_config(cfg, [f"sharding.plan_file={tmp_path / 'p.json'}"])
    plan_for_training(run)  # the same decisions: trains
    write(8)  # the same decisions written out again: the same, whatever their layout
    decisions.write_text(json.dumps(json.loads(decisions.read_text()), indent=4))
    plan_for_training(run)
    write(4)
    with pytest.raises(ConfigError, match=rf"^embeddings\.decisions {decisions}: not the decisions "
                                          rf"sharding\.plan_file {tmp_path / 'p.json'} was made from"):
        plan_for_training(run)
    # A plan made where the file was, trained where it is not, reads no file: not refused.
    decisions.unlink()
    plan_for_training(run)
    capsys.readouterr()


def test_train_refuses_to_start_over_a_finished_run_it_would_not_resume(tmp_path, capsys):
    # A search's folder (checkpoints off) lost its summary and plan to a retrain given the same
    # output_dir, without a word.
    from embshard.cluster.launch import check_replaces_no_run
    from embshard.config import CheckpointConfig, JobConfig

    run = tmp_path / "run"
    off = JobConfig(output_dir=str(run), checkpoint=CheckpointConfig(enabled=False))
    check_replaces_no_run(off, overwrite=False)  # nothing there yet
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^output_dir {run}: holds a finished run \(its summary.json\) and "
                                          r"checkpoint.enabled is false, so this run would train from scratch over "
                                          r"it; set another output_dir, or pass --overwrite to replace it$"):
        check_replaces_no_run(off, overwrite=False)
    with pytest.raises(ConfigError, match="it holds no checkpoint to resume"):
        check_replaces_no_run(JobConfig(output_dir=str(run)), overwrite=False)
    check_replaces_no_run(off, overwrite=True)
    # From the command line: one line, before Ray starts.
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {run}\ncheckpoint:\n  enabled: false\n")
    assert main(["train", str(config)]) == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_overwrite_on_a_run_it_resumes_says_it_replaces_nothing(tmp_path, capsys):
    # It resumed from the checkpoints, trained nothing more and exited 0, without a word.
    from dataclasses import replace

    from embshard.cluster.launch import check_replaces_no_run
    from embshard.config import JobConfig

    run = JobConfig(output_dir=str(tmp_path / "run"))
    # Resumed from elsewhere, it does replace the finished run: no note.
    elsewhere = replace(run, checkpoint=replace(run.checkpoint, resume=str(tmp_path / "other")))
    check_replaces_no_run(elsewhere, overwrite=True)
    assert capsys.readouterr().out == ""
    (run.checkpoint_dir / "step-000004").mkdir(parents=True)
    check_replaces_no_run(run, overwrite=False)
    assert capsys.readouterr().out == ""
    check_replaces_no_run(run, overwrite=True)
    assert capsys.readouterr().out.strip() == (
        "note: --overwrite replaces a finished run only where this one would train from scratch; this one resumes "
        f"from its checkpoints (in {run.checkpoint_dir}): for a fresh run, give it another output_dir")


def test_a_local_cluster_keeps_the_drivers_own_health_check_interval():
    # The local cluster's faster look at its workers replaced a RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
    # the user had set: the runtime environment's variables win over the processes' own.
    from embshard.cluster.launch import HEALTH_CHECK_INTERVAL_S_ENV_VAR, LOCAL_HEALTH_CHECK_S, local_cluster_env

    assert local_cluster_env({"EMBSHARD_CRASH_AT": "1:2", "HOME": "/h"}) == {
        HEALTH_CHECK_INTERVAL_S_ENV_VAR: LOCAL_HEALTH_CHECK_S, "EMBSHARD_CRASH_AT": "1:2"}
    assert local_cluster_env({HEALTH_CHECK_INTERVAL_S_ENV_VAR: "5"})[HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "5"
