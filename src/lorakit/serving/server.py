"""Running the app under uvicorn on a socket we bind ourselves (so port 0 works and the real
port can be announced before the first request)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from .extra_check import ServeError


def run(app: Any, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve `app` until Ctrl-C (or SIGTERM); then stop taking connections, finish the requests
    in flight and the queued rows (the app's lifespan drains the batcher), and return."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    announce(f"http://{shown}:{sock.getsockname()[1]}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
