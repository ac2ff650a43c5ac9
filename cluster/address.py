"""Whether a Ray server answers at an address, asked before Ray is: Ray retries a GCS address for
over two minutes (printing C++ warnings meanwhile), Ray Client a `ray://` one for 30 s, and the job
API's client a GCS port 41 s, where a refused dial answers at once. A server that takes the
connection but is no Ray (a web server on the port) held `ray.init` for good, its warnings
repeating every 35 s."""

from __future__ import annotations

import os
import socket

PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")
DIAL_SECONDS = 10
# HTTP/2's client connection preface and an empty SETTINGS frame. Ray's GCS is a gRPC server, which
# answers with a SETTINGS frame of its own before any call (and any token check).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4  # the frame type, the fourth byte of a frame's header


def _split(address: str) -> tuple[str, str, str | None]:
    """(scheme, host, port) of `[scheme://]host[:port][/]`; port None where none is given (an
    IPv6 host's colons inside its brackets are no port's)."""
    scheme, _, rest = address.rpartition("://")
    rest = rest.rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon or "]" in port:
        return scheme, rest, None
    return scheme, host, port


def malformed(address: str) -> str | None:
    """Why `address` is no Ray address at all, or None: a port given that is no number from 1 to
    65535, or a bare host (Ray's "Invalid address format"). `auto`, `local` and a scheme without a
    port pass: Ray Client hands `ray://host` to gRPC, which dials 443 (an ingress)."""
    scheme, host, port = _split(address)
    if address in ("auto", "local") or (scheme and port is None):
        return None
    if port is None or not host:
        return "no port: host:port, ray://host:port, or auto for the cluster this machine has joined"
    if not port.isdecimal() or not 0 < int(port) < 65536:
        return f"port {port!r} is no number from 1 to 65535"
    return None


def no_ray_at(address: str) -> str | None:
    """Why no Ray server answers at `host:port`, `ray://host:port` or `http(s)://host:port`:
    the dial failed, or (a GCS `host:port`) what answered is no gRPC server. None when it
    answered, or when this cannot tell ("auto", a form Ray resolves itself, no port given, an
    address reached through a proxy, a cluster whose gRPC is TLS)."""
    scheme, host, port = _split(address)
    if not host or port is None or not port.isdecimal() or scheme not in ("", "ray", "http", "https"):
        return None
    if scheme and any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # the client reaches it through the proxy, which a plain dial does not
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=DIAL_SECONDS) as dialled:
            # A GCS address only: a ray:// one may sit behind an ingress that ends TLS, and speak HTTP first.
            if not scheme and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
                return _not_grpc(dialled)
    except (OSError, OverflowError) as e:  # OverflowError: a port above 65535
        return getattr(e, "strerror", None) or str(e) or type(e).__name__
    return None


def _not_grpc(dialled: socket.socket) -> str | None:
    dialled.sendall(_HTTP2_PREFACE)
    answer = b""
    try:
        while len(answer) < 9:  # a frame header (and what else came, to quote)
            more = dialled.recv(64)
            if not more:
                break
            answer += more
    except TimeoutError:
        if not answer:
            return f"it took the connection and said nothing for {DIAL_SECONDS} s: no Ray there"
    if len(answer) >= 9 and answer[3] == _SETTINGS_FRAME:
        return None
    if not answer:
        return "it closed the connection without a word: no Ray (gRPC) server does"
    said = repr(answer.split(b"\n")[0].rstrip(b"\r")[:40].decode("latin-1"))
    return f"it answered {said}, which no Ray (gRPC) server says"
