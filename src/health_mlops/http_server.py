"""How our services meet connections: uvicorn's HTTP protocol with the client certificate in the scope and a
deadline for a connection's first request (`GuardedHttpProtocol`), and a uvicorn server in a daemon thread
(the aggregator's operations port beside its API, the loopback federation in experiments and tests)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from health_mlops.http_edge import ASGIApp
from health_mlops.tls import tls_extension

log = logging.getLogger("health_mlops.http")

# A connection must have sent a whole request head this long after it was made (after the TLS handshake, which
# asyncio bounds itself); idle and slow clients are closed instead of holding a connection forever. Between
# requests on a kept-alive connection, uvicorn's keep-alive timeout applies.
FIRST_REQUEST_TIMEOUT_S = 10.0


class GuardedHttpProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol, with two additions: the ASGI TLS extension in the scope of requests made over
    TLS (`tls.py` says why), and a deadline for the connection's first request."""

    app: Any  # uvicorn's ASGI app; wrapped for this connection when it is over TLS

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._first_request_deadline = asyncio.get_running_loop().call_later(FIRST_REQUEST_TIMEOUT_S,
                                                                            self._close_if_no_request)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            extension = tls_extension(ssl_object)
            app = self.app

            async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
                await app(scope, receive, send)

            self.app = with_tls  # this protocol object serves this one connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._first_request_deadline.cancel()
        super().connection_lost(exc)

    def _close_if_no_request(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            log.info("%s: no request within %.0f s of connecting; closed", self.client, FIRST_REQUEST_TIMEOUT_S)
            self.transport.close()


def protocol_options(tls: ssl.SSLContext | None) -> dict[str, Any]:
    """uvicorn's options for a server of ours: the guarded protocol, and `tls` if given."""
    return {"http": GuardedHttpProtocol, **({} if tls is None else {"ssl_context_factory": lambda *_: tls})}


class BackgroundServer:
    """Serves `app` on `host`:`port` (0: a port the OS picks) until the `with` block ends. With `tls`, it serves
    HTTPS with that context, and the application sees the client certificate (`GuardedHttpProtocol`)."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="auto",
                                **protocol_options(tls))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def started(self) -> bool:
        """Whether it accepts connections."""
        return self._server.started

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
