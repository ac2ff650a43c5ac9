"""Whether anything listens at a Ray address, asked with one TCP dial before Ray is: Ray retries a
GCS address for over two minutes (printing C++ warnings meanwhile), and Ray Client a `ray://` one
for 30 s, where a refused dial answers at once."""

from __future__ import annotations

import os
import socket

PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")
DIAL_SECONDS = 10


def nothing_listens(address: str) -> str | None:
    """Why a dial to `host:port` or `ray://host:port` failed; None when it answered, or when a dial
    cannot tell ("auto", a form Ray resolves itself, a `ray://` address behind a gRPC proxy)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        return None
    if address.startswith("ray://") and any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # gRPC reaches a Ray client server through the proxy, which a plain dial does not
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=DIAL_SECONDS).close()
    except (OSError, OverflowError) as e:  # OverflowError: a port above 65535
        return getattr(e, "strerror", None) or str(e) or type(e).__name__
    return None
