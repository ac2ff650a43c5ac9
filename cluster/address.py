"""Whether anything listens at a Ray address, asked with one TCP dial before Ray is: Ray retries a
GCS address for over two minutes (printing C++ warnings meanwhile), Ray Client a `ray://` one for
30 s, and the job API's client a GCS port 41 s, where a refused dial answers at once."""

from __future__ import annotations

import os
import socket

PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")
DIAL_SECONDS = 10


def nothing_listens(address: str) -> str | None:
    """Why a dial to `host:port`, `ray://host:port` or `http(s)://host:port` failed; None when it
    answered, or when a dial cannot tell ("auto", a form Ray resolves itself, no port given, an
    address reached through a proxy)."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or scheme not in ("", "ray", "http", "https"):
        return None
    if scheme and any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # the client reaches it through the proxy, which a plain dial does not
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=DIAL_SECONDS).close()
    except (OSError, OverflowError) as e:  # OverflowError: a port above 65535
        return getattr(e, "strerror", None) or str(e) or type(e).__name__
    return None
