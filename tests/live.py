"""A real ``catsdogs serve`` (uvicorn, with the command's own settings) in a thread on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from catsdogs.config import ServeConfig

START_TIMEOUT_S = 30
"""Seconds the server gets to load the model and start listening."""


@contextmanager
def live_server(cfg: ServeConfig, predictor: Any = None) -> Iterator[str]:
    """Serve ``cfg`` as ``catsdogs serve`` would, on a free loopback port; yield its base URL."""
    import uvicorn

    from catsdogs.serve.app import create_app
    from catsdogs.serve.connections import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets NODELAY
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = dataclasses.replace(cfg, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn_config(create_app(cfg, predictor), cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
