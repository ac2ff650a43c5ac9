"""One embshard run per folder: a second one is refused while the first holds it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from embshard.cluster.cli import main
from embshard.cluster.run_lock import LOCK_FILE, FolderInUse, folder_lock


def test_a_held_folder_is_refused_naming_its_holder(tmp_path) -> None:
    folder = tmp_path / "a" / "run"
    with folder_lock(folder):
        assert (folder / LOCK_FILE).is_file()
        with pytest.raises(FolderInUse, match=rf"^{folder}: another embshard run is using it \(pid {os.getpid()} on "
                                              rf"{re.escape(socket.gethostname())} since [\d-]+ [\d:]+: .*\); wait"):
            with folder_lock(folder):
                pass
    # Let go, it leaves nothing it did not need: no lock file, no folder it made and left empty.
    assert not (tmp_path / "a").exists()
    with folder_lock(folder):
        (folder / "kept").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["kept"]


def test_a_killed_holder_leaves_no_lock(tmp_path) -> None:
    # flock(2) dies with its process: nothing stale to clear by hand after a kill -9.
    code = (f"from embshard.cluster.run_lock import folder_lock\nimport os\n"
            f"with folder_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert (tmp_path / LOCK_FILE).exists()  # left behind by the killed process, but not held
    with folder_lock(tmp_path):
        pass


def test_a_second_run_or_plan_on_a_running_runs_folder_is_one_line(tmp_path, capsys) -> None:
    # Two runs on one output_dir resumed from, pruned and superseded each other's checkpoints,
    # shared one stop-request file and printed each other's summary; a `plan` replaced the
    # running run's plan, which its checkpoints copy.
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, rows=2000, max_cardinality=100)
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\ncluster:\n  workers: 1\noutput_dir: {run}\n")
    capsys.readouterr()
    with folder_lock(run):  # what a running `embshard train` holds
        for argv in (["train", str(cfg)], ["plan", str(cfg)]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and re.fullmatch(
                rf"embshard: error: {run}: another embshard run is using it \(pid {os.getpid()} .*\); wait for "
                r"it to end, or give this one another folder", err[0]), err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        assert main(["plan", str(cfg), "--out", str(tmp_path / "elsewhere" / "plan.json")]) == 0
    with folder_lock(tmp_path / "elsewhere"):  # two `plan --out` into one folder
        assert main(["plan", str(cfg), "--out", str(tmp_path / "elsewhere" / "plan.json"), "--overwrite"]) == 2
