"""`embshard submit` against a real `ray start --head` on this machine: the job trains, its logs
stream back, and the exit status is the job's. The head needs a token, as a cluster on a network
should: Ray 2.60 rewrites `--node-ip-address=127.0.0.1` to the host's address and its servers
listen on every interface, so a token is what keeps other hosts' clients out."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from embshard.datasets.synth import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def gcs_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def head(env, gcs_port) -> Iterator[str]:
    port, dashboard = gcs_port, free_port()
    # A short folder of its own, not pytest's: Ray's sockets live in it, and under pytest-xdist
    # (/tmp/pytest-of-USER/pytest-N/popen-gwN/...) the dashboard's passed the 107 bytes AF_UNIX
    # allows; its module died, and the head never answered.
    temp = Path(tempfile.mkdtemp(prefix="embshard-ray-"))
    # `python -m` rather than the `ray` script: a venv that shares another's site-packages has none.
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
             "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus=4", "--disable-usage-stats",
             # Its own agent port: the default (52365) belongs to any other Ray on this machine,
             # and an agent that cannot bind it never accepts jobs.
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={temp}", "--block"]
    # --block in a session of its own: the teardown stops this head's processes and no others
    # (`ray stop --force` would stop every Ray cluster of the user on this machine).
    said = temp / "ray-start.log"
    with said.open("wb") as out:
        proc = subprocess.Popen(start, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_http(url, proc, said, timeout=120)
        yield url
    finally:
        _stop_session(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_http(url: str, proc: subprocess.Popen, said: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}: {said.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:  # answering (e.g. 401 without the token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _stop_session(proc: subprocess.Popen) -> None:
    """The head's whole session is killed: its GCS, raylet, dashboard and workers share it (the
    jobs' entrypoints have ended by then). SIGTERM would have `ray start --block` stop them one
    by one with grace periods, about 30 s on 2 cores, for a cluster whose state nothing reads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole session is gone
        return
    proc.wait(timeout=30)


def embshard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "embshard"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_real_gcs_passes_the_address_probe(head, gcs_port):
    # The probe sends HTTP/2's opening and expects gRPC's SETTINGS frame, before any token check.
    from embshard.cluster.address import no_ray_at

    assert no_ray_at(f"127.0.0.1:{gcs_port}") is None


def test_submit_streams_logs_and_exit_status(head, env, tmp_path):
    data = tmp_path / "data"
    synthesize(data, rows=6000, max_cardinality=2000)
    common = ["--set", f"data.path={data}", "--set", f"output_dir={tmp_path / 'run'}",
              "--set", "data.batch_size=512", "--set", "train.progress=false"]
    done = embshard(env, "submit", "configs/default.yaml", "--address", head, "--workers", "2", *common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "validation AUC" in done.stdout and "SUCCEEDED" in done.stdout
    job_id = done.stdout.split()[1]
    assert "SUCCEEDED" in embshard(env, "status", job_id, "--address", head).stdout
    assert "validation AUC" in embshard(env, "logs", job_id, "--address", head).stdout
    failed = embshard(env, "submit", "configs/default.yaml", "--address", head,
                      "--set", f"data.path={tmp_path / 'missing'}", "--set", f"output_dir={tmp_path / 'bad'}")
    # The job's own exit status (2: bad input) was 1, so a script could not tell bad input, a
    # crash and a preempted run (130) apart.
    assert failed.returncode == 2 and "FAILED" in failed.stdout


def test_submit_refuses_a_config_that_does_not_load_before_it_reaches_the_cluster(tmp_path, capsys):
    # It was a job that failed on the cluster, exit 1, after a round trip.
    from embshard.cluster.cli import main

    config = tmp_path / "job.yaml"
    config.write_text("train:\n  epchs: 2\n")
    assert main(["submit", str(config), "--address", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"embshard: error: {config}: train.epchs: unknown field") and "\n" not in err


def test_an_unreachable_ray_client_address_is_one_line(monkeypatch):
    # A ray:// address goes through Ray Client, which printed its INFO line and a timeout warning
    # above ours (after 30 s: the fake below stands for that client).
    import logging
    import warnings

    import ray.job_submission

    from embshard.cluster import jobs

    seen = {}

    class Client:
        def __init__(self, address: str) -> None:
            seen["disabled"] = logging.root.manager.disable
            logging.getLogger("ray.client_builder").info("Passing the following kwargs to ray.init()")
            warnings.warn("Ray Client connection timed out", UserWarning, stacklevel=2)
            raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # the probe gets gRPC's answer
    address = f"ray://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with pytest.raises(jobs.JobError, match=rf"^{re.escape(address)}: cannot reach the Ray job API "
                                                    r"\(ConnectionError: ray client connection timeout\)$"):
                jobs.client(address)
    finally:
        server.stop(None)
    assert not shown and seen["disabled"] == logging.INFO and logging.root.manager.disable == logging.NOTSET


def test_a_job_api_that_takes_the_connection_and_never_answers_is_one_line(monkeypatch):
    # The client's version check waited for good.
    from embshard.cluster import jobs

    monkeypatch.setattr(jobs, "CONNECT_SECONDS", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel takes the connection; nothing ever reads or answers
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(jobs.JobError, match=rf"^{re.escape(address)}: cannot reach the Ray job API \(.*"
                                                r"timed out"):
            jobs.client(address)


def test_a_failed_jobs_status_leaves_out_the_log_ray_appends(monkeypatch):
    # The whole log, already streamed, was printed again in the status line.
    from types import SimpleNamespace

    from embshard.cluster import jobs

    message = "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\nx\ny"
    monkeypatch.setattr(jobs, "_call", lambda *a: SimpleNamespace(status="FAILED", message=message))
    assert jobs.status("http://h:1", "j") == "j: FAILED (Job entrypoint command failed with exit code 2)"


def test_submit_exits_with_what_ended_the_job(monkeypatch):
    # Every failure was exit 1: a preempted or stopped run (130) read like a crash.
    from types import SimpleNamespace

    from embshard.cluster import jobs

    for code, final, want in ((None, "SUCCEEDED", 0), (2, "FAILED", 2), (130, "FAILED", 130), (None, "FAILED", 1),
                              (None, "STOPPED", 130), (-9, "FAILED", 1)):
        monkeypatch.setattr(jobs, "_call", lambda *a, c=code: SimpleNamespace(driver_exit_code=c))
        assert jobs.exit_status("http://h:1", "j", final) == want, (code, final)


def test_a_ray_client_address_nothing_listens_at_is_said_without_ray_clients_wait(monkeypatch):
    # Ray Client waited its 30 s for a dial that is refused at once.
    import ray.job_submission

    from embshard.cluster import jobs

    def never(address: str) -> None:
        raise AssertionError("Ray Client was asked")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", never)
    address = f"ray://127.0.0.1:{free_port()}"
    with pytest.raises(jobs.JobError, match=rf"^{re.escape(address)}: cannot reach the Ray job API \(no Ray "
                                            r"answers there: Connection refused\)$"):
        jobs.client(address)


class _Dashboard:
    """A job API that answers its version, then holds every job request (`hold`) or refuses its
    token (403, as a head started with another token does)."""

    def __init__(self, hold: bool) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import ray

        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/api/version"):
                    self.answer(200, json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "x"}))
                elif hold:
                    release.wait(30)
                else:
                    self.answer(403, "Invalid authentication token")

            do_POST = do_GET

            def answer(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_job_request_the_api_never_answers_or_whose_token_it_refuses_is_one_line(monkeypatch, tmp_path):
    # Only the version check had a timeout: status, logs, stop and submit waited for good on a
    # dashboard whose job agent was stuck. A refused token read "cannot reach the Ray job API".
    from embshard.cluster import jobs

    monkeypatch.setattr(jobs, "CONNECT_SECONDS", 1.0)
    config = tmp_path / "job.yaml"
    config.write_text("name: x\n")
    held, refusing = _Dashboard(hold=True), _Dashboard(hold=False)
    try:
        for call in (lambda a: jobs.status(a, "raysubmit_x"), lambda a: jobs.logs(a, "raysubmit_x"),
                     lambda a: jobs.stop(a, "raysubmit_x"), lambda a: jobs.submit(a, config, [], None)):
            with pytest.raises(jobs.JobError, match=rf"^{re.escape(held.address)}: .*no answer within 1 s"):
                call(held.address)
            with pytest.raises(jobs.JobError, match=rf"^{re.escape(refusing.address)}: the Ray job API refused this "
                                                    r"client's token \(.*\); RAY_AUTH_MODE and RAY_AUTH_TOKEN"):
                call(refusing.address)
    finally:
        held.close()
        refusing.close()


def test_a_log_stream_lost_with_the_head_is_one_line(monkeypatch):
    # The head killed mid-run: a 32-line traceback through asyncio, exit 1, no word of the job.
    from types import SimpleNamespace

    from embshard.cluster import jobs

    async def tail_job_logs(job_id):
        yield "step 124\n"
        raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    monkeypatch.setattr(jobs, "client", lambda address: SimpleNamespace(tail_job_logs=tail_job_logs))
    with pytest.raises(jobs.JobError, match=r"^http://h:1: lost the log stream of j \(RuntimeError: WebSocket "
                                            r"connection closed unexpectedly with close code 1006\): the cluster or "
                                            r"its dashboard went away; `embshard status j --address http://h:1`"):
        jobs.follow("http://h:1", "j")
