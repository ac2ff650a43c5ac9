"""A real Prometheus server on 127.0.0.1 for tests (Debian's `prometheus` package, 2.x).

    with PrometheusServer(config) as prom:          # config: dict, YAML text or a file path
        prom.query("up")                            # -> the `data` of /api/v1/query
        prom.wait_for('embshard_train_samples_total > 0', timeout=60)

`config` is written to a temp folder (with any `files` given, e.g. rule or file-SD files, next
to it, so relative paths in the config resolve there). The server listens on a free port of
127.0.0.1 only, stores its TSDB in the temp folder and is stopped (then killed) on exit.
`promtool()` runs `promtool` with the same PATH lookup. `require_prometheus()` skips a test
when the binaries are absent (`bash deploy/install-prometheus.sh` installs them).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["PrometheusServer", "PromQLError", "require_prometheus", "promtool", "free_port"]


class PromQLError(RuntimeError):
    """The server answered status=error; `error_type` is e.g. "bad_data" for a parse error."""

    def __init__(self, expr: str, error_type: str, error: str) -> None:
        super().__init__(f"{error_type}: {error} (expr: {expr})")
        self.expr, self.error_type, self.error = expr, error_type, error


def require_prometheus(*binaries: str) -> None:
    """pytest.skip unless every binary (default: prometheus and promtool) is on PATH."""
    import pytest

    for b in binaries or ("prometheus", "promtool"):
        if shutil.which(b) is None:
            pytest.skip(f"{b} not installed (run: bash deploy/install-prometheus.sh, needs root + apt)")


def promtool(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        raise FileNotFoundError("promtool not on PATH")
    return subprocess.run([exe, *args], input=input, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(
        self,
        config: Mapping[str, Any] | str | Path | None = None,
        *,
        files: Mapping[str, str | Path] | None = None,
        port: int | None = None,
        startup_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._config = config if config is not None else {"global": {"scrape_interval": "15s"}}
        self._files = dict(files or {})
        self._port = port
        self._startup_timeout = startup_timeout
        self._extra_args = tuple(extra_args)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self.port: int = 0
        self.dir: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusServer":
        exe = shutil.which("prometheus")
        if exe is None:
            raise FileNotFoundError("prometheus not on PATH (bash deploy/install-prometheus.sh)")
        self._tmp = tempfile.TemporaryDirectory(prefix="embshard-prom-")
        self.dir = Path(self._tmp.name)
        for name, src in self._files.items():
            dst = self.dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copyfile(src, dst)
            else:
                dst.write_text(src)
        cfg_path = self.dir / "prometheus.yml"
        if isinstance(self._config, Mapping):
            cfg_path.write_text(yaml.safe_dump(dict(self._config), sort_keys=False))
        elif isinstance(self._config, Path):
            shutil.copyfile(self._config, cfg_path)
        else:
            cfg_path.write_text(str(self._config))
        last_err = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = self._port or free_port()
            log = open(self.dir / "prometheus.log", "w")
            self._proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={cfg_path}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    *self._extra_args,
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            )
            log.close()
            if self._wait_ready():
                return self
            last_err = self.log()[-2000:]
            self._terminate()
            if "address already in use" not in last_err or self._port:
                break
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{last_err}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text() if self.dir else ""
        except OSError:
            return ""

    # ------------------------------------------------------------------ HTTP API

    def api(self, path: str, params: Mapping[str, Any] | None = None, *, method: str = "GET") -> Any:
        """Call /api/v1/<path>; returns `data`, raises PromQLError on status=error."""
        query = urllib.parse.urlencode(params or {})
        url = f"{self.url}/api/v1/{path}"
        if method == "GET":
            req = urllib.request.Request(f"{url}?{query}" if query else url)
        else:
            req = urllib.request.Request(
                url, data=query.encode(), method=method,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422/503 still carry a JSON error body
            try:
                body = json.loads(e.read())
            except ValueError:
                raise RuntimeError(f"{url}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PromQLError(str((params or {}).get("query", path)), body.get("errorType", "?"), body.get("error", ""))
        return body.get("data")

    def query(self, expr: str, time: float | None = None) -> dict[str, Any]:
        """Instant query; returns {"resultType": ..., "result": [...]}."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        return self.api("query", params, method="POST")

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, expr: str, timeout: float = 60.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll `expr` until it returns a non-empty result; returns that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)["result"]
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} within {timeout}s; targets: {self.targets()}")
            time.sleep(interval)
