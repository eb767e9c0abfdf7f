"""A uvicorn server in a daemon thread: the aggregator's operations port beside its API, and the loopback
federation's aggregator in experiments and tests."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from health_mlops.tls import TlsScopeProtocol


class BackgroundServer:
    """Serves `app` on `host`:`port` (0: a port the OS picks) until the `with` block ends. With `tls`, it serves
    HTTPS with that context, and the application sees the client certificate (`tls.TlsScopeProtocol`)."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        options: dict[str, Any] = {} if tls is None else {"http": TlsScopeProtocol,
                                                           "ssl_context_factory": lambda *_: tls}
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="auto", **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
