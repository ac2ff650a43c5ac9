"""`embshard submit|status|logs|stop`: an `embshard train` run as a Ray job.

The job's entrypoint is `embshard train` run by this very interpreter (`sys.executable -m
embshard.cluster.cli`) in this working directory, attached to the cluster (`--address auto`).
So it assumes the cluster's head node shares this machine's filesystem and venv: a local
`ray start --head`, or a container image with the same paths (the Helm chart's RayJob). Relative
paths in the config then mean what they mean here.

Auth: Ray 2.60 turns token auth on by default; `ray start`, this client and the job's driver
must agree. The job inherits RAY_AUTH_MODE from the submitting shell; its token comes from the
cluster's own environment (tests/test_jobs.py starts its head with a fresh one).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from embshard.cluster.address import no_ray_at
from embshard.errors import EXIT_INTERRUPTED, EmbshardError, Interrupted, first_line

FORWARDED_ENV = ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")
# A head answers HTTP before its job agent is up; until then Ray refuses with this text and asks
# to try again. A submit right after `ray start` (or a head pod's restart) waits that out.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_SECONDS = 30.0
CONNECT_SECONDS = 30.0  # for the job API's first answer, and each answer after it
STATUS_HINT_SECONDS = 5.0
TOKEN_ADVICE = "RAY_AUTH_MODE and RAY_AUTH_TOKEN (or its file) must be those the cluster was started with"


class JobError(EmbshardError):
    """The Ray job API is unreachable or refused a request."""


def _bounded_client(address: str):
    """Ray's job client, each request bounded by CONNECT_SECONDS: its requests have no timeout, and
    a dashboard that took a request and never answered (a job agent stuck) held status, logs,
    stop and submit for good."""
    from ray.job_submission import JobSubmissionClient

    class BoundedJobSubmissionClient(JobSubmissionClient):
        request_seconds = CONNECT_SECONDS

        def _do_request(self, *args, **kwargs):  # Ray's one door to requests (pinned Ray, see requirements/)
            kwargs.setdefault("timeout", self.request_seconds)
            return super()._do_request(*args, **kwargs)

    return BoundedJobSubmissionClient(address)


def _request_failures() -> tuple[type[Exception], ...]:
    """What a job API request raises when it fails on its way (the API's own refusals are
    RuntimeErrors, which each caller words)."""
    import requests
    from ray.exceptions import AuthenticationError

    return requests.RequestException, AuthenticationError


def request_error(address: str, e: Exception, what: str) -> JobError:
    """The one line for a request that failed: a token refused, no answer in time, or `what` failed."""
    import requests
    from ray.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):
        return JobError(f"{address}: the Ray job API refused this client's token ({first_line(e)}); {TOKEN_ADVICE}")
    if isinstance(e, requests.Timeout):
        return JobError(f"{address}: {what}: no answer within {CONNECT_SECONDS:.0f} s ({first_line(e)})")
    return JobError(f"{address}: {what} ({first_line(e)})")


def client(address: str):
    if (why := no_ray_at(address)) is not None:
        # Ray Client waited its 30 s for a dial refused at once, and a GCS address 41 s.
        raise JobError(f"{address}: cannot reach the Ray job API (no Ray answers there: {why})")
    # A ray:// address connects through Ray Client first, which printed its INFO line and a
    # timeout warning above the one line below that says the same.
    # (Ray sets its loggers' levels as it connects: only logging.disable holds them.)
    if address.startswith(("http://", "https://")):
        _check_answers(address)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.INFO)
            return _bounded_client(address)
    except Exception as e:  # noqa: BLE001 - requests/Ray raise many kinds; all mean "unreachable"
        raise request_error(address, e, "cannot reach the Ray job API") from None
    finally:
        logging.disable(logging.NOTSET)


def _check_answers(address: str) -> None:
    """JobError unless the job API's address gives an HTTP answer (any: a refusal of a missing
    token is one) within CONNECT_SECONDS: the client's own version check has no timeout, and a
    server that took the connection and never answered held the command for good."""
    try:
        urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=CONNECT_SECONDS).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, a timeout, a malformed URL
        # (http.client's InvalidURL, of a port that is no number or a space in the path, is neither.)
        raise JobError(f"{address}: cannot reach the Ray job API ({first_line(e)})") from None


def train_entrypoint(config: Path, overrides: list[str], workers: int | None) -> str:
    args = [sys.executable, "-m", "embshard.cluster.cli", "train", str(config), "--address", "auto"]
    if workers:
        args += ["--workers", str(workers)]
    for item in overrides:
        args += ["--set", item]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


def submit(address: str, config: Path, overrides: list[str], workers: int | None) -> str:
    if not config.is_file():
        raise JobError(f"{config}: config file not found")
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith("EMBSHARD_")}
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return jobs.submit_job(
                entrypoint=train_entrypoint(config, overrides, workers),
                runtime_env={"env_vars": env},
                metadata={"embshard_config": str(config)},
            )
        except _request_failures() as e:
            raise request_error(address, e, "job submission") from None
        except RuntimeError as e:
            if AGENT_NOT_READY not in str(e) or time.monotonic() > deadline:
                raise JobError(f"{address}: job submission refused ({first_line(e)})") from None
            time.sleep(2)


def follow(address: str, job_id: str) -> str:
    """Stream the job's logs until it ends; its final status (SUCCEEDED, FAILED, STOPPED)."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        ended = _final_status(jobs, job_id)
        if ended is not None:  # a stop right after the job's end said that it went on
            raise Interrupted(f"stopped following {job_id}, which has ended: {ended}") from None
        raise Interrupted(f"stopped following {job_id}; the job goes on on the cluster "
                          f"(`embshard stop {job_id} --address {address}` stops it)") from None
    except BrokenPipeError:
        raise  # the reader of the output went away, not the cluster (the CLI says nothing)
    except Exception as e:  # noqa: BLE001 - aiohttp's and Ray's: "closed unexpectedly", a reset
        # A 32-line traceback through asyncio when the head went away mid-run.
        raise JobError(f"{address}: lost the log stream of {job_id} ({first_line(e)}): the cluster or its "
                       f"dashboard went away; `embshard status {job_id} --address {address}` says whether the "
                       "job goes on") from None
    return str(_call(address, job_id, "get_job_status", jobs))


def _final_status(jobs, job_id: str) -> str | None:
    """The job's status when it has ended; None when it goes on or cannot be asked (within a few
    seconds: the user who pressed Ctrl-C waits for it)."""
    jobs.request_seconds = STATUS_HINT_SECONDS
    try:
        final = jobs.get_job_status(job_id)
    except Exception:  # noqa: BLE001 - only a hint for the line: whatever failed, say the usual
        return None
    return str(final) if final.is_terminal() else None


def status(address: str, job_id: str) -> str:
    info = _call(address, job_id, "get_job_info")
    # Ray appends the job's last 20,000 characters of log to a failure's message: printed after
    # the streamed log, the whole log twice.
    message = (info.message or "").split(", last available logs", 1)[0]
    return f"{job_id}: {info.status}" + (f" ({message})" if message else "")


def exit_status(address: str, job_id: str, final: str) -> int:
    """What `embshard submit` exits with: the job's own exit status where Ray has it (2 bad
    input, 130 stopped before its end: a preempted pod's run to start again), else 0 for a
    success, 130 for `embshard stop`, and 1 for any other end (a driver that never started)."""
    if final == "SUCCEEDED":
        return 0
    if final == "STOPPED":  # `embshard stop`: the run checkpointed and stopped; Ray keeps no exit status
        return EXIT_INTERRUPTED
    code = _call(address, job_id, "get_job_info").driver_exit_code
    return code if isinstance(code, int) and 0 < code < 256 else 1


def logs(address: str, job_id: str) -> str:
    return _call(address, job_id, "get_job_logs")


def stop(address: str, job_id: str) -> bool:
    return _call(address, job_id, "stop_job")


def _call(address: str, job_id: str, method: str, jobs=None):
    try:
        return getattr(jobs or client(address), method)(job_id)
    except _request_failures() as e:
        raise request_error(address, e, f"job {job_id}") from None
    except RuntimeError as e:
        raise JobError(f"job {job_id} at {address}: {first_line(e)}") from None
