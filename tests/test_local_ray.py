"""The local in-process Ray cluster that `embshard train` starts. Ray 2.60's GCS, raylet and
worker servers listen on every interface whatever node IP they are given, so what keeps others
out is token auth with a token only the run's process tree holds: a client without it is refused,
even when the environment says RAY_AUTH_MODE=disabled (as the Makefile exports)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Started the way `embshard train` starts it; then one client without the token, one with it.
DRIVER = textwrap.dedent("""
    import os, subprocess, sys
    import ray
    from embshard.cluster.launch import init_ray
    from embshard.config import JobConfig

    init_ray(JobConfig())
    gcs = ray.get_runtime_context().gcs_address
    probe = "import ray, sys; ray.init(address=sys.argv[1]); print('joined', flush=True)"
    # Both give up after 5 tries, a second apart, not Ray's 20: the refused one waited them all out.
    insider = {**os.environ, "RAY_gcs_server_port_wait_time_s": "5"}
    outsider = {k: v for k, v in insider.items() if k != "RAY_AUTH_TOKEN"}
    outsider["RAY_AUTH_MODE"] = "disabled"
    for who, env in (("outsider", outsider), ("insider", insider)):
        r = subprocess.run([sys.executable, "-c", probe, gcs], env=env, capture_output=True, text=True,
                           timeout=180)
        print(who, r.returncode, "joined" in r.stdout, flush=True)
    ray.shutdown()
""")


def test_local_cluster_refuses_clients_without_its_token(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("outsider", "insider")))
    assert results["insider"] == "0 True", done.stdout  # the cluster is up and reachable with the token
    code, joined = results["outsider"].split()
    assert code != "0" and joined == "False", done.stdout
    # The token lives in the process tree only, not in ~/.ray/auth_token (Ray's default).
    assert not (tmp_path / ".ray").exists()


SIGTERM_AFTER_INIT = textwrap.dedent("""
    import os, signal, time
    import ray
    from embshard.cluster.interrupt import sigterm_as_ctrl_c
    from embshard.cluster.launch import init_ray
    from embshard.config import JobConfig

    with sigterm_as_ctrl_c():  # as the CLI runs every verb
        init_ray(JobConfig())
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    ray.shutdown()
""")


def test_sigterm_after_ray_starts_is_still_ctrl_c(tmp_path):
    # ray.init replaced the CLI's handler with Ray's: a `kill` between it and the workers' start
    # was a C++ stack dump and an abort (exit 134), not one line and the staged files removed.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_INIT], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted", (done.returncode, done.stderr[-2000:])
    assert "SIGTERM received" not in done.stderr


STOP_DURING_INIT = textwrap.dedent("""
    import os, signal
    # As a shell starts a command: a SIGINT ignored by the process that ran this one (the test's,
    # after some earlier test) is inherited, and the stop was ignored with it (exit 0, no line).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import ray
    from embshard.cluster.interrupt import sigterm_as_ctrl_c
    from embshard.cluster.launch import init_ray
    from embshard.config import JobConfig

    import ray._private.utils as ray_utils

    real_set = ray_utils.set_sigterm_handler

    def set_then_a_stop(handler):  # the stop arrives once ray.init has put its handler in place
        real_set(handler)
        os.kill(os.getpid(), signal.SIGNAL)

    ray_utils.set_sigterm_handler = set_then_a_stop
    with sigterm_as_ctrl_c():
        try:
            init_ray(JobConfig())
        except KeyboardInterrupt:
            # The local cluster stopped: its node (raylet, agents) is not left running.
            print("interrupted", ray.is_initialized(), ray._private.worker._global_node is None, flush=True)
""")


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_while_ray_starts_is_ctrl_c_and_stops_the_cluster(tmp_path, stop):
    # Ray's handler while ray.init ran is sys.exit(15): `embshard train` killed 0.3-2.5 s after its
    # plan was written ended with exit 15, no line, and Ray's agents left running. A Ctrl-C there
    # must stop the local cluster too.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}
    script = STOP_DURING_INIT.replace("signal.SIGNAL", f"signal.{stop}")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted False True", (done.returncode,
                                                                                     done.stderr[-2000:])


def test_ray_that_cannot_start_on_a_full_disk_says_so(tmp_path, monkeypatch):
    # Ray's session folder on a full disk: "crashed: RuntimeError: Timed out waiting for file
    # .../gcs_server_port_...", exit 1. Here Ray fails for real (its folder under a file), and
    # only the disk's free space is faked.
    import shutil

    import ray

    from embshard import errors
    from embshard.cluster.launch import init_ray
    from embshard.config import JobConfig
    from embshard.errors import EnvironmentProblem

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "file" / "tmp"))
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(EnvironmentProblem, match=rf"^{tmp_path / 'file' / 'tmp' / 'ray'}: Ray cannot start its local "
                                                 r"cluster there: the disk is full \(0 bytes free\) \(NotADirectory"):
        init_ray(JobConfig())
    assert not ray.is_initialized()


def test_a_run_without_an_address_starts_a_local_cluster_whatever_ray_address_says(tmp_path):
    # Ray joined RAY_ADDRESS when no address was given: the job API's http address, which the
    # README has users export for `embshard submit`, ended `embshard train` as a crash (exit 1).
    script = textwrap.dedent("""
        import ray
        from embshard.cluster.launch import init_ray
        from embshard.config import JobConfig

        init_ray(JobConfig())
        print("joined", ray.is_initialized(), ray.get_runtime_context().gcs_address, flush=True)
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path), "RAY_ADDRESS": "http://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    joined = next(line for line in done.stdout.splitlines() if line.startswith("joined")).split()
    assert joined[1] == "True" and not joined[2].endswith(":1"), done.stdout
    assert ("note: RAY_ADDRESS=http://127.0.0.1:1 (the job API's, for embshard submit) is not joined: a run joins a "
            "cluster given by --address, else starts a local one") in done.stderr
    # A cluster's own address: which one was meant is the user's to say (Ray's crash line, exit 1).
    refused = subprocess.run([sys.executable, "-c", script], env={**env, "RAY_ADDRESS": "10.0.0.1:6379"}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert ("ConfigError: RAY_ADDRESS=10.0.0.1:6379 names a Ray cluster, and cluster.address is not set: to join it, "
            "set cluster.address") in refused.stderr, refused.stderr


UNPLACEABLE = textwrap.dedent("""
    import os, signal, sys, threading
    from embshard.cluster import launch
    from embshard.cluster.interrupt import sigterm_as_ctrl_c
    from embshard.config import ClusterConfig, DataConfig, JobConfig, MetricsConfig
    from embshard.datasets.synth import synthesize
    from embshard.errors import Interrupted

    synthesize("data", rows=2000, seed=0, max_cardinality=50)
    launch.init_ray(JobConfig())  # sized for one job of two workers: 2 CPUs here
    cfg = JobConfig(output_dir="run", data=DataConfig(path="data", batch_size=64), cluster=ClusterConfig(workers=5),
                    metrics=MetricsConfig(enabled=False))
    launch.plan_for_training(cfg)
    launch.SLOW_START_SECONDS = 1.0
    said = launch.placement_wait

    def placement_wait(cfg):
        note = said(cfg)
        print("note", note, flush=True)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C, once said
        return note

    launch.placement_wait = placement_wait
    with sigterm_as_ctrl_c():
        try:
            launch.train_on_ray(cfg)
        except Interrupted as e:
            print("stopped", e, flush=True)
""")


def test_a_group_ray_cannot_place_is_said_and_the_first_ctrl_c_ends_it(tmp_path):
    # Five workers on a two-CPU cluster: Ray Train waited for good without a word, and the first
    # Ctrl-C said "finishing the step and writing a checkpoint" of a step no worker would take.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", UNPLACEABLE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("note", "stopped")))
    assert re.search(r"no worker has started after 1 s: Ray cannot place 5 workers of CPU 1 each on this cluster "
                     r"\(CPU \d+ in all\) and waits for nodes to join", lines.get("note", "")), done.stderr[-2000:]
    assert lines.get("stopped") == "interrupted before any worker started: nothing was trained", done.stderr[-2000:]
    assert "finishing the step" not in done.stderr
