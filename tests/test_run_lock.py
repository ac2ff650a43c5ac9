"""One embshard run per folder: a second one is refused while the first holds it."""

from __future__ import annotations

import json
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



def test_a_lock_file_that_cannot_be_removed_leaves_the_runs_own_error_in_place(tmp_path) -> None:
    # A checkpoint folder made read-only under a run: its "Permission denied" on the checkpoint
    # was replaced by the lock file's own, naming `.embshard-run.lock`. (Root ignores permission
    # bits: the lock path made a folder fails its unlink the same way.)
    def unremovable_lock() -> None:
        (tmp_path / LOCK_FILE).unlink()
        (tmp_path / LOCK_FILE).mkdir()

    with pytest.raises(PermissionError, match="step-000005.tmp"):
        with folder_lock(tmp_path):
            unremovable_lock()
            raise PermissionError(13, "Permission denied", str(tmp_path / "step-000005.tmp"))
    (tmp_path / LOCK_FILE).rmdir()
    with folder_lock(tmp_path):  # and a run that ended well ends well
        unremovable_lock()


def test_a_holder_s_long_command_line_is_cut_short() -> None:
    # A Ray worker holding a run's lock was named by its whole command line: 1,000 characters of flags.
    from embshard.process_locks import COMMAND_SHOWN, describe_holder

    record = {"pid": 7, "host": "h", "since": 0, "command": "default_worker.py " + "--flag=x " * 200}
    said = describe_holder(record)
    assert said.endswith(" ...") and len(said) < COMMAND_SHOWN + 60
    assert describe_holder(record | {"command": "embshard sweep c.yaml"}).endswith(": embshard sweep c.yaml")


def test_a_killed_holder_leaves_no_lock(tmp_path) -> None:
    # flock(2) dies with its process: nothing stale to clear by hand after a kill -9.
    code = (f"from embshard.cluster.run_lock import folder_lock\nimport os\n"
            f"with folder_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert (tmp_path / LOCK_FILE).exists()  # left behind by the killed process, but not held
    with folder_lock(tmp_path):
        pass


def _tiny_config(tmp_path, run) -> str:
    from embshard.datasets.synth import synthesize

    data = tmp_path / "data"
    if not data.exists():
        synthesize(data, rows=2000, max_cardinality=100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {data}\nembeddings:\n  dim: 8\ncluster:\n  workers: 1\noutput_dir: {run}\n")
    return str(cfg)


def test_a_second_run_or_plan_on_a_running_runs_folder_is_one_line(tmp_path, capsys) -> None:
    # Two runs on one output_dir resumed from, pruned and superseded each other's checkpoints,
    # shared one stop-request file and printed each other's summary; a `plan` replaced the
    # running run's plan, which its checkpoints copy.
    run = tmp_path / "run"
    cfg = _tiny_config(tmp_path, run)
    capsys.readouterr()
    with folder_lock(run):  # what a running `embshard train` holds
        for argv in (["train", cfg], ["plan", cfg]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and re.fullmatch(
                rf"embshard: error: {run}: another embshard run is using it \(pid {os.getpid()} .*\); wait for "
                r"it to end, or give this one another folder", err[0]), err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
        assert main(["plan", cfg, "--out", str(tmp_path / "elsewhere" / "plan.json")]) == 0
    with folder_lock(tmp_path / "elsewhere"):  # two `plan --out` into one folder
        assert main(["plan", cfg, "--out", str(tmp_path / "elsewhere" / "plan.json"), "--overwrite"]) == 2


def test_a_checkpoint_folder_is_locked_by_the_run_that_writes_it(tmp_path) -> None:
    # A second run naming the first's checkpoints (inside the first's output_dir) as its own went
    # ahead; one folder reached by two names (a link) refused the run that held it.
    from embshard.cluster.run_lock import run_lock
    from embshard.config import CheckpointConfig, JobConfig

    first = JobConfig(output_dir=str(tmp_path / "a"))
    second = JobConfig(output_dir=str(tmp_path / "b"),
                       checkpoint=CheckpointConfig(dir=str(tmp_path / "a" / "checkpoints")))
    with run_lock(first):
        with pytest.raises(FolderInUse, match=rf"^{tmp_path / 'a' / 'checkpoints'}: another embshard run"):
            with run_lock(second):
                pass
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a").mkdir()
    through_link = CheckpointConfig(dir=str(tmp_path / "link"))
    with run_lock(JobConfig(output_dir=str(tmp_path / "a"), checkpoint=through_link)):
        pass


def test_a_file_system_without_locks_is_said_and_runs(tmp_path, monkeypatch, capsys) -> None:
    # NFSv3 without a lock daemon: ENOLCK was a traceback from every verb that locks.
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with folder_lock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_FILE).exists()
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'run'}: its file system takes no locks (No locks available)" in err


def test_a_worker_sees_its_run_end_or_die(tmp_path) -> None:
    # The workers of a driver killed with SIGKILL published and pruned checkpoints for seconds
    # after; each now checks, before it writes and publishes, that its run still holds the folders.
    from embshard.cluster.run_lock import RunEnded, owner_check, run_owner

    assert run_owner([tmp_path]) is None and owner_check(None) is None  # no lock held: nothing to check
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "boot": ""}))
    assert run_owner([tmp_path]) is None  # a stale file (its boot: not this machine's now) is no owner
    with folder_lock(tmp_path):
        check = owner_check(run_owner([tmp_path]))
        assert check is not None
        check()  # held by the run it started under
    with pytest.raises(RunEnded, match=r"the run this worker started under has ended; nothing more is written"):
        check()
    code = ("from embshard.cluster.run_lock import folder_lock, run_owner\nimport json, pathlib, sys\n"
            f"folder = pathlib.Path({str(tmp_path)!r})\n"
            "with folder_lock(folder):\n"
            "    sys.stdout.write(json.dumps(run_owner([folder])) + '\\n'); sys.stdout.flush(); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        check = owner_check(json.loads(holder.stdout.readline()))
        assert check is not None
        check()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, unheld
        holder.wait()
    with pytest.raises(RunEnded, match=r"the run this worker started under was killed \(its lock is free\)"):
        check()
    with folder_lock(tmp_path), pytest.raises(RunEnded, match=rf"another holds it \(pid {os.getpid()} on "):
        check()


def test_a_worker_on_another_machine_trusts_the_lock_record_not_a_free_lock(tmp_path) -> None:
    # Some mounts lock within one machine only (NFS local_lock=flock, Lustre localflock): a worker
    # on another would find the driver's lock free and stop a live run's checkpoints. Two machines
    # may share a host name: the boot id tells them apart.
    from embshard.cluster.run_lock import RunEnded, owner_check

    driver = {"pid": 1, "host": socket.gethostname(), "boot": "another machine's boot", "since": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps({**driver, "command": "embshard train"}))
    check = owner_check({"folders": {str(tmp_path): driver}})  # unheld here, as it looks from elsewhere
    assert check is not None
    check()
    (tmp_path / LOCK_FILE).write_text(json.dumps({**driver, "pid": 2, "since": 1, "command": "embshard train"}))
    with pytest.raises(RunEnded, match="another holds it"):
        check()
    (tmp_path / LOCK_FILE).unlink()
    with pytest.raises(RunEnded, match="has ended"):
        check()


def test_a_folder_of_the_user_s_own_files_is_refused_as_output_dir(tmp_path, capsys) -> None:
    # A run wrote its plan, checkpoints and logs into a folder of the user's, replacing their own
    # `plan/plan.json` without a word.
    run = tmp_path / "mine"
    (run / "plan").mkdir(parents=True)
    (run / "plan" / "plan.json").write_text('{"mine": 1}')
    (run / "notes.txt").write_text("precious")
    cfg = _tiny_config(tmp_path, run)
    capsys.readouterr()
    search = ["search", "autodim", cfg, "--set", "autodim.candidates=[4,8]"]
    for argv in (["train", cfg], ["prune", "pep", cfg], search):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"embshard: error: output_dir: {run} holds files that are not an embshard run's (notes.txt); "
                       "a run writes its plan, checkpoints and logs there under fixed names: give it a new or empty "
                       f"folder (or, if an embshard run wrote them, create {run / '.embshard-run'} to say so)"], \
            (argv, err)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["notes.txt", "plan", "plan/plan.json"]
    assert (run / "plan" / "plan.json").read_text() == '{"mine": 1}'


def test_a_run_marks_its_folder_and_takes_an_earlier_embshard_s(tmp_path) -> None:
    from embshard.cluster.run_lock import RUN_MARKER, run_lock
    from embshard.config import JobConfig, ShardingConfig
    from embshard.errors import ConfigError

    # An empty folder a run wrote nothing into is left empty; one it wrote into is marked, and
    # then takes whatever a run writes.
    empty = tmp_path / "empty"
    empty.mkdir()
    with run_lock(JobConfig(output_dir=str(empty))):
        assert (empty / RUN_MARKER).is_file()
    assert list(empty.iterdir()) == []
    with run_lock(JobConfig(output_dir=str(empty))):
        (empty / "anything-a-later-version-writes").write_text("x")
    with run_lock(JobConfig(output_dir=str(empty))):
        pass
    # A run folder of an embshard that did not mark its folders goes on, and is marked: by its
    # entries, or by its plan beside its log (with the folders of runs it was given to hold, as
    # configs/pep-movielens.yaml's retrain in `mixed`).
    earlier, older = tmp_path / "earlier", tmp_path / "older"
    for name in ("checkpoints", "logs", "ray"):
        (earlier / name).mkdir(parents=True)
    (earlier / "summary.json").write_text("{}")
    for name in ("plan", "logs", "mixed"):
        (older / name).mkdir(parents=True)
    (older / "plan" / "plan.json").write_text("{}")
    for folder in (earlier, older):
        with run_lock(JobConfig(output_dir=str(folder))):
            pass
        assert (folder / RUN_MARKER).is_file()
    # Nor are hidden entries (NFS's, an interrupted write's) or what the config itself names there.
    for name in ("mine", "theirs"):
        (tmp_path / name / "plans").mkdir(parents=True)
        (tmp_path / name / ".nfs000000001").write_text("x")
        (tmp_path / name / "plans" / "a.json").write_text("{}")
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    with run_lock(JobConfig(output_dir=str(mine), sharding=ShardingConfig(plan_file=str(mine / "plans" / "a.json")))):
        pass
    with pytest.raises(ConfigError, match=r"holds files that are not an embshard run's \(plans\)"):
        with run_lock(JobConfig(output_dir=str(theirs))):
            pass


def test_a_file_where_a_run_s_folder_goes_is_said_as_such(tmp_path, capsys) -> None:
    # mkdir's own word: "<path>: File exists" of the very folder the config names.
    afile = tmp_path / "afile"
    afile.write_text("x")
    for run, said in ((afile, f"{afile}: a file is there, not a folder"),
                      (afile / "run", f"{afile}: a file is there, not a folder (so {afile / 'run'} cannot be made)")):
        cfg = _tiny_config(tmp_path, run)
        capsys.readouterr()
        assert main(["train", cfg]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"embshard: error: {said}"]
    assert afile.read_text() == "x"
    # Inside the run's folder, where its plan, log or Ray storage goes: "File exists" after the
    # plan, or (ray) a crash in Ray's controller; the folder was marked a run's all the same.
    for name in ("plan", "logs", "ray"):
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / name).write_text("x")
        cfg = _tiny_config(tmp_path, run)
        capsys.readouterr()
        assert main(["train", cfg]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"embshard: error: {run / name}: a file is there, not a folder; a run writes its {name} folder there: "
            "move the file away, or give the run another output_dir"]
        assert sorted(p.name for p in run.iterdir()) == [name]


def test_nothing_but_a_plan_goes_into_a_runs_plan_folder(tmp_path) -> None:
    # An export there was copied into each of the run's checkpoints (its whole weights, every step).
    from embshard.cluster.run_lock import run_lock
    from embshard.config import JobConfig
    from embshard.datasets.outdir import check_file_output, check_output
    from embshard.datasets.synth import synthesize
    from embshard.errors import DataError
    from embshard.trainer.export import EXPORT, ExportError

    run = tmp_path / "run"
    with run_lock(JobConfig(output_dir=str(run))):
        (run / "plan").mkdir()  # a run's folder, marked as it wrote there
    said = re.escape(f"{run / 'plan'}, which holds its own files alone; write it elsewhere")
    with pytest.raises(ExportError, match=rf"--out {re.escape(str(run / 'plan' / 'x'))}: inside the plan folder "
                                          rf"of a run \(every checkpoint of that run copies it\) {said}"):
        check_output(run / "plan" / "x", False, EXPORT)
    with pytest.raises(DataError, match=said):
        synthesize(run / "plan" / "data", rows=100, max_cardinality=10)
    with pytest.raises(DataError, match=said):  # a decisions file would ride along too
        check_file_output(run / "plan" / "decisions.json", False, "decisions file", lambda p: None)
    check_file_output(run / "plan" / "plan.json", False, "plan", lambda p: None, plan_file=True)  # its own
    check_output(run / "elsewhere", False, EXPORT)


def test_a_prometheus_target_list_is_one_runs(tmp_path) -> None:
    # A second run with the same metrics.file_sd replaced the first's targets, and removed the
    # file as it ended while the first still served: unscraped for the rest of its run, exit 0.
    from dataclasses import replace

    from conftest import held_elsewhere

    from embshard.cluster.run_lock import run_lock
    from embshard.config import ClusterConfig, JobConfig, MetricsConfig
    from embshard.errors import EnvironmentProblem

    listed = tmp_path / "file_sd" / "default.json"

    def run(name: str, enabled: bool = True) -> JobConfig:
        return JobConfig(output_dir=str(tmp_path / name), metrics=MetricsConfig(enabled=enabled, file_sd=str(listed)))

    config = tmp_path / "a.yaml"
    config.write_text(f"output_dir: {tmp_path / 'a'}\nmetrics:\n  enabled: true\n  file_sd: {listed}\n")
    with held_elsewhere(f"run_lock(load_job_config({str(config)!r}))"):
        with pytest.raises(FolderInUse, match=rf"^metrics\.file_sd {re.escape(str(listed))}: another embshard "
                                              r"process is writing it \(.*\); wait for it to end, or write elsewhere "
                                              r"\(a Prometheus target list is one run's\)$"):
            with run_lock(run("b")):
                pass
        with run_lock(run("c", enabled=False)):  # no metrics: no list of its own
            pass
    with run_lock(run("b")):
        pass
    # A list no folder can be made for is refused before Ray starts, but a Ray Client driver's, a
    # path on the cluster's machines where rank 0 writes it.
    nowhere = JobConfig(output_dir=str(tmp_path / "d"), metrics=MetricsConfig(enabled=True, file_sd="/proc/e/x.json"))
    with pytest.raises(EnvironmentProblem, match=r"/proc/e"):
        with run_lock(nowhere):
            pass
    with run_lock(replace(nowhere, cluster=ClusterConfig(address="ray://head:10001"))):
        pass
