"""How our services meet connections: uvicorn's HTTP protocol with the client certificate in the scope and limits
on what a client may make a server hold (`GuardedHttpProtocol`), and a uvicorn server in a daemon thread (the
aggregator's operations port beside its API, the loopback federation in experiments and tests)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from health_mlops.trust.tls import tls_extension
from health_mlops.web.edge import KIB, ASGIApp

log = logging.getLogger("health_mlops.http")

# Every request's head (request line and headers) must arrive whole within this time of its first byte (of the
# connection being made, for the first request): idle and slow clients are closed instead of holding a
# connection. Between requests on a kept-alive connection, uvicorn's keep-alive timeout applies.
REQUEST_HEAD_TIMEOUT_S = 10.0
# A request head larger than this, or with more headers, is answered 431 and the connection closed: the parser
# would otherwise hold the whole head (256 MiB of headers grew a server by 4 GB). The largest we send is a bearer
# token and a few short headers.
MAX_HEAD_BYTES = 64 * KIB
MAX_HEADERS = 100
# A request body must keep coming: less than this many bytes in a window (while the server reads) closes the
# connection. Our largest bodies (a batch of patients, an update) arrive in seconds on loopback or a LAN.
BODY_WINDOW_S = 10.0
MIN_BODY_BYTES_PER_WINDOW = 10 * KIB
HEAD_REFUSED = b"request head over 64 KiB or over 100 headers"
STATUS_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
              b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(HEAD_REFUSED), HEAD_REFUSED))


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the ASGI TLS extension in the scope of requests made over TLS (`trust/tls.py`
    says why) and limits on each request: its head's size, header count and time to arrive, and its body's
    rate."""

    app: Any  # uvicorn's ASGI app; wrapped for this connection when it is over TLS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # bytes received now belong to a request head
        self._head_bytes = 0
        self._header_count = 0
        self._head_too_large = False
        self._head_deadline: asyncio.TimerHandle | None = None
        self._body_watch: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._start_head_deadline()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            extension = tls_extension(ssl_object)
            app = self.app

            async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
                await app(scope, receive, send)

            self.app = with_tls  # this protocol object serves this one connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        in_head_before = self._in_head
        super().data_received(data)
        if self._head_too_large:
            self._refuse_head()
        elif in_head_before and self._in_head:  # the whole chunk was head: a head ends at most one chunk late
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()
        elif not self._in_head:
            self._body_bytes += len(data)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        if self._head_deadline is None:
            self._start_head_deadline()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._head_too_large = True
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_too_large:
            return
        self._in_head = False
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        if not (self.parser.should_upgrade() and self._should_upgrade()):  # a WebSocket is not a body
            self._body_bytes = 0
            self._body_watch = self.loop.call_later(BODY_WINDOW_S, self._check_body_rate)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0
        if self._body_watch is not None:
            self._body_watch.cancel()
            self._body_watch = None

    def _start_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._close_slow_head)

    def _stop_timers(self) -> None:
        for timer in (self._head_deadline, self._body_watch):
            if timer is not None:
                timer.cancel()

    def _close_slow_head(self) -> None:
        self._head_deadline = None
        if self._in_head and not self.transport.is_closing():
            log.info("%s: no whole request head within %.0f s; closed", self.client, REQUEST_HEAD_TIMEOUT_S)
            self.transport.close()

    def _check_body_rate(self) -> None:
        self._body_watch = None
        if self._in_head or self.transport.is_closing():
            return
        if self._body_bytes < MIN_BODY_BYTES_PER_WINDOW and not self.flow.read_paused:
            log.info("%s: request body under %d bytes in %.0f s; closed", self.client, MIN_BODY_BYTES_PER_WINDOW,
                     BODY_WINDOW_S)
            self.transport.close()
            return
        self._body_bytes = 0
        self._body_watch = self.loop.call_later(BODY_WINDOW_S, self._check_body_rate)

    def _refuse_head(self) -> None:
        self._stop_timers()
        if not self.transport.is_closing():
            log.info("%s: request head over %d bytes or %d headers; 431, closed", self.client, MAX_HEAD_BYTES,
                     MAX_HEADERS)
            self.transport.write(STATUS_431)
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
