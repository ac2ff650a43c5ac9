"""The lease on a checkpoint folder in a bucket: a second run is refused while the first renews
it, a killed run's lease lapses and is taken, and a run whose lease was taken writes no more."""

from __future__ import annotations

import json
import time

import pytest

from embshard.cluster import run_lease
from embshard.cluster.run_lease import LEASE_FILE, LeaseHeld, LeaseLost, check_leases, held_leases
from embshard.cluster.run_lock import owner_check, run_lock, run_owner
from embshard.config import CheckpointConfig, JobConfig
from embshard.datasets.storage import location
from embshard.errors import StorageError

A = {"pid": 11, "host": "a", "boot": "x"}
B = {"pid": 22, "host": "b", "boot": "y"}


@pytest.fixture(autouse=True)
def fast_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_lease, "LEASE_BEAT_SECONDS", 0.2)
    monkeypatch.setattr(run_lease, "SETTLE_SECONDS", 0.05)


def test_a_second_run_is_refused_while_the_first_renews_its_lease(s3) -> None:
    folder = location(s3.uri("ck"))
    with run_lease.run_lease(folder, A) as held:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"^{folder}: another embshard run is using it \(pid 11 on a since .*; "
                                            r"its lease is renewed every 0 s\); wait for it to end"):
            with run_lease.run_lease(folder, B):
                pytest.fail("two runs held one folder")
        assert time.monotonic() - started < 0.2 * run_lease.LAPSE_BEATS
        assert json.loads((folder / LEASE_FILE).read_text())["run"] == held["run"]
    assert s3.keys("ck/") == []  # let go at the end


def test_a_killed_runs_lease_lapses_and_is_taken(s3, capsys: pytest.CaptureFixture[str]) -> None:
    folder = location(s3.uri("ck"))
    dead = {**B, "run": "dead", "since": 0, "command": "embshard train", "beat": 4}
    (folder / LEASE_FILE).write_text(json.dumps(dead))
    started = time.monotonic()
    with run_lease.run_lease(folder, A) as held:
        assert time.monotonic() - started >= 0.2 * run_lease.LAPSE_BEATS  # watched before taking it
        assert json.loads((folder / LEASE_FILE).read_text())["run"] == held["run"] != "dead"
    assert "another run's lease is there (pid 22 on b since" in capsys.readouterr().err


def test_a_run_whose_lease_was_taken_writes_no_more(s3, capsys: pytest.CaptureFixture[str]) -> None:
    folder = location(s3.uri("ck"))
    with run_lease.run_lease(folder, A) as held:
        leases = held_leases([folder], A)
        assert leases == {str(folder): held["run"]} and held_leases([folder], B) == {}
        check_leases(leases)
        time.sleep(0.5)  # renewed meanwhile
        assert json.loads((folder / LEASE_FILE).read_text())["beat"] >= 1
        # Gone for a moment (deleted by hand, a store's hiccup): still this run's, written again.
        (folder / LEASE_FILE).unlink()
        time.sleep(0.5)
        assert json.loads((folder / LEASE_FILE).read_text())["run"] == held["run"]
        # Another run that started with this one, its lease written last.
        (folder / LEASE_FILE).write_text(json.dumps({**B, "run": "other", "since": 0, "command": "x", "beat": 0}))
        with pytest.raises(LeaseLost, match=rf"^{folder}: the run this worker started under no longer holds its "
                                            r"lease: another holds it \(pid 22 on b"):
            check_leases(leases)
        time.sleep(0.5)
    assert json.loads((folder / LEASE_FILE).read_text())["run"] == "other"  # the other's, kept and not renewed
    assert "another run took this run's lease; this run ends at its next checkpoint" in capsys.readouterr().err


def test_a_run_holds_its_bucket_checkpoint_folder_and_its_workers_check_it(s3, tmp_path) -> None:
    cfg = JobConfig(output_dir=str(tmp_path / "run"), checkpoint=CheckpointConfig(dir=s3.uri("ck")))
    with run_lock(cfg):
        assert s3.keys("ck/") == [f"ck/{LEASE_FILE}"]
        owner = run_owner([tmp_path / "run", cfg.checkpoint_dir])
        assert owner is not None and list(owner["leases"]) == [s3.uri("ck")]
        check = owner_check(owner)
        assert check is not None
        check()
        (cfg.checkpoint_dir / LEASE_FILE).unlink()
        with pytest.raises(LeaseLost, match=r"no longer holds its lease: it was let go; nothing more is written"):
            check()
    assert s3.keys("ck/") == []


def test_a_missing_bucket_is_named_as_the_checkpoint_folder(s3, tmp_path) -> None:
    cfg = JobConfig(output_dir=str(tmp_path / "run"), checkpoint=CheckpointConfig(dir="s3://no-such-bucket-ck/run"))
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-ck/run: the bucket does not exist$"):
        with run_lock(cfg):
            pytest.fail("the run went on")


def test_a_ctrl_c_as_the_lease_settles_lets_it_go(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    # It stayed, and the next run waited the whole lapse for a run that never trained.
    folder = location(s3.uri("ck"))

    reads = []
    real = run_lease._read

    def interrupted_at_the_check(path):  # type: ignore[no-untyped-def]
        reads.append(path)
        if len(reads) == 2:  # the first looks for another's lease, the second for this one's, settled
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(run_lease, "_read", interrupted_at_the_check)
    with pytest.raises(KeyboardInterrupt):
        with run_lease.run_lease(folder, A):
            pytest.fail("the lease was held")
    assert s3.keys("ck/") == []
