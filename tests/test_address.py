"""The probe of a Ray address before Ray is asked: a web server (or anything but gRPC) on the port
held `ray.init` for good; a gRPC server (what Ray's GCS and Ray Client are) passes."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import ray

from embshard.cluster import address
from embshard.cluster.launch import init_ray
from embshard.config import ClusterConfig, JobConfig
from embshard.errors import ConfigError


@pytest.fixture
def web_server() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Takes every connection and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_grpc_server_passes_and_anything_else_is_named(web_server: str, silent_server: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert address.no_ray_at(f"127.0.0.1:{port}") is None
    finally:
        server.stop(None)
    assert address.no_ray_at(web_server) == \
        "it answered '<!DOCTYPE HTML>', which no Ray (gRPC) server says"
    assert address.no_ray_at(f"http://{web_server}") is None  # the job API is HTTP: dialled alone
    assert address.no_ray_at(f"ray://{web_server}") is None  # an ingress ending TLS may answer so
    monkeypatch.setattr(address, "DIAL_SECONDS", 1)
    assert address.no_ray_at(silent_server) == "it took the connection and said nothing for 1 s: no Ray there"
    monkeypatch.setenv("RAY_USE_TLS", "1")  # a TLS server answers the preface with an alert, or not at all
    assert address.no_ray_at(silent_server) is None


def test_train_at_a_web_servers_port_is_one_line_at_once(web_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was asked to join"))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^cluster.address {web_server}: no Ray answers there \(it answered "
                                          r"'<!DOCTYPE HTML>', which no Ray \(gRPC\) server says\); start the"):
        init_ray(JobConfig(cluster=ClusterConfig(address=web_server)))
    assert time.monotonic() - started < address.DIAL_SECONDS


@pytest.mark.parametrize("given, why", [("127.0.0.1:abc", "port 'abc' is no number from 1 to 65535"),
                                        ("127.0.0.1", "no port: host:port, ray://host:port, or auto"),
                                        ("ray://head:99999", "port '99999' is no number from 1 to 65535")])
def test_train_at_no_ray_address_at_all_is_one_line_naming_it(given: str, why: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Handed to Ray: "crashed: ValueError: Unable to parse port number from abc", of a rewritten host.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was asked to join"))
    with pytest.raises(ConfigError, match=rf"^cluster.address {given}: not a Ray address \({re.escape(why)}"):
        init_ray(JobConfig(cluster=ClusterConfig(address=given)))
    # Forms Ray takes pass: a scheme without a port (gRPC dials 443), IPv6 with a port or without.
    for fine in ("auto", "local", "ray://head", "ray://[::1]", "anyscale://cluster", "[::1]:6379", "ray://[::1]:10001"):
        assert address.malformed(fine) is None, fine


@pytest.mark.parametrize("given", ["http://127.0.0.1:abc", "http://127.0.0.1:8265/some path"])
def test_a_job_api_address_no_url_takes_is_one_line(given: str) -> None:
    # http.client's InvalidURL escaped as a 40-line traceback.
    from embshard.cluster.jobs import JobError, _check_answers

    with pytest.raises(JobError, match=rf"^{given}: cannot reach the Ray job API \("):
        _check_answers(given)
