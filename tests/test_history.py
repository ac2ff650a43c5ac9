"""Runs' records over time: AutoDim's softmax(alpha) per field and PEP's non-zero count, written as
JSON lines while a (one-rank) search or prune run trains, and kept consistent across a resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import profiled_synth

from embshard.cluster.launch import plan_for_training
from embshard.config import (
    AutodimConfig,
    CheckpointConfig,
    DataConfig,
    EmbeddingsConfig,
    JobConfig,
    ModelConfig,
    PepConfig,
    TrainConfig,
)
from embshard.errors import DataError
from embshard.trainer.history import StepHistory, read_history


def test_history_appends_and_a_restart_drops_the_steps_it_repeats(tmp_path):
    path = tmp_path / "out" / "h.jsonl"
    first = StepHistory(path)
    for step in (0, 2, 4, 6):
        first.write({"step": step, "x": step * 10})
    assert [r["x"] for r in read_history(path)] == [0, 20, 40, 60]

    resumed = StepHistory(path)  # a start resumed from the step-4 checkpoint
    resumed.write({"step": 4, "x": -1})
    resumed.write({"step": 6, "x": -2})
    assert [(r["step"], r["x"]) for r in read_history(path)] == [(0, 0), (2, 20), (4, -1), (6, -2)]


def test_a_torn_last_line_is_dropped_and_a_broken_one_named(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"step": 0}\n{"step": 2}\n{"st')  # killed mid-write
    assert [r["step"] for r in read_history(path)] == [0, 2]
    StepHistory(path).write({"step": 3})
    assert [r["step"] for r in read_history(path)] == [0, 2, 3]

    path.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(DataError, match=r"h.jsonl: line 2 is not a step record"):
        StepHistory(path).write({"step": 5})
    assert path.read_text() == '{"step": 0}\nnot json\n'  # what could not be read is left as it was


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return profiled_synth(tmp_path_factory.mktemp("history") / "data", rows=1200, max_cardinality=60, seed=0)


def small_job(dataset: Path, out: Path, max_steps: int, **sections) -> JobConfig:
    return JobConfig(
        output_dir=str(out),
        data=DataConfig(path=str(dataset), batch_size=64, eval_batch_size=256, prefetch=1),
        model=ModelConfig(dense_arch=[8], over_arch=[8]),
        embeddings=EmbeddingsConfig(dim=8),
        train=TrainConfig(max_steps=max_steps, progress=False, eval_max_batches=1),
        checkpoint=CheckpointConfig(every_steps=2),
        **sections,
    )


def test_autodim_search_records_alpha_over_time(dataset, tmp_path, process_group):
    from embshard.trainer.loop import run_worker

    candidates = [2, 4, 8]
    search = AutodimConfig(candidates=candidates, alpha_every=1, pretrain_steps=1, alpha_lr=0.1, history_every=2)
    cfg = small_job(dataset, tmp_path / "run", 5, autodim=search)
    plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "autodim")
    summary = run_worker(cfg, method="autodim")
    path = Path(summary["alpha_history"])
    records = read_history(path)
    assert [r["step"] for r in records] == [0, 2, 4, 5]  # every 2 steps, and the end
    assert [r["alpha_steps"] for r in records] == [0, 1, 3, 4]
    fields = sorted(summary["dims"])
    for r in records:
        assert sorted(r["alpha"]) == fields and r["candidates"] == candidates
        assert all(len(p) == 3 and math.isclose(sum(p), 1.0, abs_tol=1e-4) for p in r["alpha"].values())
        assert r["tau"] == search.temperature(r["step"])
    assert all(p == pytest.approx([1 / 3] * 3) for p in records[0]["alpha"].values())  # alpha starts equal
    assert records[-1]["alpha"] == {f: pytest.approx(p, abs=1e-6) for f, p in summary["alpha"].items()}
    assert records[-1]["alpha"] != records[0]["alpha"]

    longer = run_worker(replace(cfg, train=replace(cfg.train, max_steps=8)), method="autodim")
    assert longer["resumed_from"].endswith("step-000005")  # the end's checkpoint
    assert [r["step"] for r in read_history(path)] == [0, 2, 4, 5, 6, 8]  # one file across the resume


def test_prune_run_records_nonzeros_over_time(dataset, tmp_path, process_group):
    from embshard.trainer.loop import run_worker
    from embshard.trainer.pep import NONZERO_HISTORY_FILE

    cfg = small_job(dataset, tmp_path / "run", 4, pep=PepConfig(targets=[1e-6], count_every=1, s_init=-4.0))
    plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "pep")
    summary = run_worker(cfg, method="pep")
    records = read_history(cfg.pep_dir / NONZERO_HISTORY_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    dense = sum(json.loads((cfg.pep_dir / "pep.json").read_text())["tables"].values()) * 8
    for r in records:
        assert r["dense"] == dense and sum(r["tables"].values()) == r["nonzero"]
        assert r["kept_fraction"] == pytest.approx(r["nonzero"] / dense)
    assert records[0]["nonzero"] < dense  # sigmoid(-4) already cuts small entries
    assert records[-1]["kept_fraction"] == pytest.approx(summary["pep"]["kept_fraction"])
    # The record names whose run it is: another run into this pep.out replaced it and its history.
    from embshard.errors import ConfigError
    from embshard.trainer.pep import check_pep_out

    check_pep_out(cfg)  # this run's own, again (a resume)
    other = replace(cfg, output_dir=str(tmp_path / "other"), pep=replace(cfg.pep, out=str(cfg.pep_dir)))
    with pytest.raises(ConfigError, match=rf"^pep.out {cfg.pep_dir}: holds the prune run of output_dir "
                                          rf"{Path(cfg.output_dir).resolve()} \(its pep.json\); set pep.out"):
        check_pep_out(other)


def _prune_killed_at_step_2(rank: int, world: int, cfg: JobConfig) -> None:
    import os

    from embshard.trainer.faults import ENV
    from embshard.trainer.loop import run_worker

    os.environ[ENV] = "0:2"  # os._exit(1), as a kill -9 would, before any target is reached
    run_worker(cfg, method="pep")


@pytest.mark.slow
def test_a_prune_run_killed_before_its_first_target_still_claims_pep_out(dataset, tmp_path):
    # The record was written at the first target or at the end only: another run could then take
    # the folder and replace the first one's non-zero history.
    import torch.multiprocessing as mp
    from distributed import run_ranks

    from embshard.errors import ConfigError
    from embshard.trainer.pep import NONZERO_HISTORY_FILE, check_pep_out

    cfg = small_job(dataset, tmp_path / "run", 6, pep=PepConfig(targets=[1e-6], count_every=1))
    plan_for_training(replace(cfg, cluster=replace(cfg.cluster, workers=1)), "pep")
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_prune_killed_at_step_2, 1, cfg)
    assert [r["step"] for r in read_history(cfg.pep_dir / NONZERO_HISTORY_FILE)] == [1, 2]
    assert json.loads((cfg.pep_dir / "pep.json").read_text())["targets"] == {}
    check_pep_out(cfg)  # its own resume
    other = replace(cfg, output_dir=str(tmp_path / "other"), pep=replace(cfg.pep, out=str(cfg.pep_dir)))
    with pytest.raises(ConfigError, match="holds the prune run of output_dir"):
        check_pep_out(other)


def test_a_run_removes_only_its_own_file_sd_list_and_never_a_file_of_another_kind(dataset, tmp_path,
                                                                                   process_group, monkeypatch):
    # A Prometheus config named as metrics.file_sd was overwritten, then deleted; and of two runs
    # sharing one path, the first to end deleted the other's list.
    import socket

    from embshard.cluster.launch import plan_for_training
    from embshard.config import MetricsConfig
    from embshard.errors import ConfigError
    from embshard.trainer import loop
    from embshard.trainer.loop import run_worker
    from embshard.trainer.metrics import read_file_sd_targets

    sd = tmp_path / "sd" / "job.json"
    sd.parent.mkdir()
    sd.write_text("global:\n  scrape_interval: 15s\n")
    base = small_job(dataset, tmp_path / "run", 2)
    cfg = replace(base, cluster=replace(base.cluster, workers=1),
                  metrics=MetricsConfig(enabled=True, port_base=0, file_sd=str(sd)))
    with pytest.raises(ConfigError, match=rf"^metrics\.file_sd: {sd} exists and is no file-SD target list"):
        plan_for_training(cfg)
    assert sd.read_text() == "global:\n  scrape_interval: 15s\n"
    sd.unlink()
    plan_for_training(cfg)
    write = loop.write_file_sd

    def then_another_run_writes(path, targets, labels):
        write(path, targets, labels)
        write(path, ["127.0.0.1:1"], {"job": "other"})  # a second run of the same config, since

    monkeypatch.setattr(loop, "write_file_sd", then_another_run_writes)
    run_worker(cfg)
    assert read_file_sd_targets(sd) == ["127.0.0.1:1"]  # the other run's list stays
    monkeypatch.undo()
    cfg = replace(cfg, train=replace(cfg.train, max_steps=4),
                  metrics=replace(cfg.metrics, bind="0.0.0.0"))  # noqa: S104 - no traffic: only the target's name
    listed = []
    monkeypatch.setattr(loop, "write_file_sd", lambda path, targets, labels: (listed.extend(targets),
                                                                              write(path, targets, labels)))
    sd.unlink()
    run_worker(cfg)
    # A wildcard bind is reached at the node's address (it was always 127.0.0.1), and the run's own
    # list goes with it.
    assert [t.rsplit(":", 1)[0] for t in listed] == [socket.gethostbyname(socket.gethostname())]
    assert not sd.exists()
